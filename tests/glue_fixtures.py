"""A fake GLUE folder in the official layouts, built from the shipped SNLI sample."""

from __future__ import annotations

from pathlib import Path

from trainer_fixtures import SNLI_SAMPLE

STSB_SCORE = {"entailment": "4.5", "neutral": "2.5", "contradiction": "0.5"}
BINARY = {"entailment": "1", "neutral": "0", "contradiction": "0"}
MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def snli_rows(split: str) -> list[tuple[str, str, str, str]]:
    lines = (SNLI_SAMPLE / f"{split}.tsv").read_text().splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def build_glue_folder(root: Path, tasks=("cola", "mrpc", "stsb", "mnli")) -> Path:
    """The exact column layouts and header conventions of the official files: CoLA's train/dev
    have no header (its test has one), MNLI has its many columns and label1..label5 on dev."""
    splits = {s: snli_rows(s) for s in ("train", "dev", "test")}
    if "cola" in tasks:
        for split in ("train", "dev"):
            write(root / "CoLA" / f"{split}.tsv",
                  [f"gj04\t{BINARY[g]}\t{'' if BINARY[g] == '1' else '*'}\t{a}" for _, a, _, g in splits[split]])
        write(root / "CoLA" / "test.tsv", ["index\tsentence", *(f"{i}\t{a}" for i, (_, a, _, _) in
                                                                 enumerate(splits["test"]))])
    if "mrpc" in tasks:
        head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
        for split in ("train", "dev"):
            write(root / "MRPC" / f"{split}.tsv",
                  [head, *(f"{BINARY[g]}\t{10 * i}\t{10 * i + 1}\t{a}\t{b}" for i, (_, a, b, g) in
                           enumerate(splits[split]))])
        write(root / "MRPC" / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                          *(f"{i}\t{10 * i}\t{10 * i + 1}\t{a}\t{b}" for i, (_, a, b, _) in
                                            enumerate(splits["test"]))])
    if "stsb" in tasks:
        head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
        for split in ("train", "dev"):
            write(root / "STS-B" / f"{split}.tsv",
                  [head + "\tscore", *(f"{i}\tmain-captions\tMSRvid\t2012test\t{i}\tnone\tnone\t{a}\t{b}\t"
                                       f"{STSB_SCORE[g]}" for i, (_, a, b, g) in enumerate(splits[split]))])
        write(root / "STS-B" / "test.tsv", [head, *(f"{i}\tmain-captions\tMSRvid\t2012test\t{i}\tnone\tnone\t{a}\t{b}"
                                                    for i, (_, a, b, _) in enumerate(splits["test"]))])
    if "mnli" in tasks:
        def mnli(i, pair_id, a, b):
            return f"{i}\t{31193 + i}\t{pair_id}\ttelephone\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}"

        write(root / "MNLI" / "train.tsv", ["\t".join(MNLI_COLUMNS + ["label1", "gold_label"]),
                                           *(f"{mnli(i, p, a, b)}\t{g}\t{g}" for i, (p, a, b, g) in
                                             enumerate(splits["train"]))])
        dev_head = "\t".join(MNLI_COLUMNS + ["label1", "label2", "label3", "label4", "label5", "gold_label"])
        half = len(splits["dev"]) // 2
        for name, rows in (("dev_matched", splits["dev"][:half]), ("dev_mismatched", splits["dev"][half:])):
            write(root / "MNLI" / f"{name}.tsv", [dev_head, *(f"{mnli(i, p, a, b)}\t{g}\t{g}\t{g}\t{g}\t{g}\t{g}"
                                                              for i, (p, a, b, g) in enumerate(rows))])
        for name, rows in (("test_matched", splits["test"][:half]), ("test_mismatched", splits["test"][half:])):
            write(root / "MNLI" / f"{name}.tsv", ["\t".join(MNLI_COLUMNS),
                                                 *(mnli(i, p, a, b) for i, (p, a, b, _) in enumerate(rows))])
        write(root / "diagnostic" / "diagnostic.tsv", ["index\tsentence1\tsentence2",
                                                      *(f"{i}\t{a}\t{b}" for i, (_, a, b, _) in
                                                        enumerate(splits["test"][:10]))])
    return root


def build_base_model(folder: Path, width: int = 32, layers: int = 2) -> Path:
    """A tiny pretrained-encoder stand-in (BertModel, no classification head) with the test tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from trainer_fixtures import build_tokenizer

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=2 * width,
                         max_position_embeddings=64)).save_pretrained(folder)
    return folder
