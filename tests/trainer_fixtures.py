"""Tiny offline models and data for the trainer tests: nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import torch

SNLI_SAMPLE = Path(__file__).resolve().parent / "data" / "snli_sample"
SNLI_DEMO = Path(__file__).resolve().parents[1] / "data" / "snli_demo"  # 4,000 training pairs, shipped
SNLI_LABELS = ("entailment", "neutral", "contradiction")


def build_tokenizer(folder: Path):
    """A WordPiece tokenizer whose vocabulary is the words of the SNLI sample and the demo data.

    Built through ``tokenizers`` and handed over as ``tokenizer_object``: under transformers 5,
    ``BertTokenizerFast(vocab_file=...)`` ignores the file and maps every word to [UNK], which
    would leave the trainer tests training on inputs with no content. Checked below.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import AutoTokenizer, BertTokenizerFast

    words = set()
    for file in [*SNLI_SAMPLE.glob("*.tsv"), *SNLI_DEMO.glob("*.tsv")]:
        for line in file.read_text().splitlines()[1:]:
            for text in line.split("\t")[1:3]:
                words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    ids = {token: i for i, token in enumerate(vocab)}
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    backend = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    tokenizer.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    encoded = reloaded("A man is riding a horse.", "Two dogs play.")["input_ids"]
    expected = [ids[w] for w in ("[CLS]", "a", "man", "is", "riding", "a", "horse", ".", "[SEP]", "two", "dogs", "play",
                                 ".", "[SEP]")]
    assert encoded == expected, f"the test tokenizer lost its vocabulary: {encoded} != {expected}"
    assert len(reloaded) == len(vocab)
    return reloaded


def build_teacher(folder: Path, id2label=None, seed: int = 0, layers: int = 2, width: int = 32):
    """A random 2-layer, 32-wide BERT classifier saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer(folder)
    id2label = id2label if id2label is not None else dict(enumerate(SNLI_LABELS))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * width, max_position_embeddings=64,
                        num_labels=len(id2label), id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    return folder


def tiny_distill_settings(teacher: Path, output: Path, **overrides) -> dict:
    settings = dict(task="snli", teacher=str(teacher), output=str(output), data_dir=str(SNLI_SAMPLE),
                    batch_size=8, eval_batch_size=16, max_length=32, learning_rate=1e-3, max_steps=10,
                    eval_steps=100, save_steps=100, logging_steps=1, student_layers=2, student_hidden=16,
                    student_heads=2, student_intermediate=32, seed=7, tensorboard=False, loss_backend="torch")
    settings.update(overrides)
    return settings
