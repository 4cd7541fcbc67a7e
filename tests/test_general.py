"""General distillation (LRC-BERT's pre-training stage) on tiny models, offline: the tokenised
corpus cache, packing, training, the export and its projections, LRC-BERT in distill, exact
resume, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from lrc_bert import cli, runs  # noqa: E402
from lrc_bert.config import build_config  # noqa: E402
from lrc_bert.corpus import CorpusSource, PackedCorpus, tokenize_corpus  # noqa: E402
from lrc_bert.general import run_general_distill  # noqa: E402
from glue_fixtures import build_base_model  # noqa: E402
from trainer_fixtures import SNLI_SAMPLE, build_teacher, tiny_distill_settings  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The unique sentences of the SNLI sample, labels dropped: one document per line."""
    sentences = set()
    for split in ("train", "dev", "test"):
        for line in (SNLI_SAMPLE / f"{split}.tsv").read_text().splitlines()[1:]:
            sentences.update(line.split("\t")[1:3])
    file = tmp_path_factory.mktemp("corpus") / "snli_sentences.txt"
    file.write_text("\n".join(sorted(sentences)) + "\n")
    return file


def settings(base, corpus, output, **overrides) -> dict:
    values = dict(teacher=str(base), output=str(output), corpus=[str(corpus)], max_length=16, batch_size=8,
                  max_steps=20, eval_steps=10, save_steps=10, logging_steps=1, student_layers=2, student_hidden=16,
                  student_heads=2, student_intermediate=32, learning_rate=1e-3, validation_fraction=0.1,
                  tensorboard=False, loss_backend="torch", seed=3)
    values.update(overrides)
    return values


def general(base, corpus, output, resume=False, on_step=None, **overrides):
    return run_general_distill(build_config(None, **settings(base, corpus, output, **overrides)), resume=resume,
                               on_step=on_step)


def records(output: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_packing_puts_cls_and_sep_in_place_and_keeps_every_token(base, corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    folder = tokenize_corpus(CorpusSource([str(corpus)]), tokenizer, tmp_path)
    packed = PackedCorpus(folder, 16, tokenizer.cls_token_id, tokenizer.sep_token_id)
    flat = np.fromfile(folder / "tokens.bin", dtype=json.loads((folder / "meta.json").read_text())["dtype"])
    documents = [line for line in corpus.read_text().splitlines() if line]
    expected = [t for doc in documents for t in (*tokenizer(doc, add_special_tokens=False)["input_ids"],
                                                 tokenizer.sep_token_id)]
    assert flat.tolist() == expected  # documents in order, each closed by [SEP]
    assert len(packed) == len(expected) // 14
    batch = packed[[0, 1, len(packed) - 1]]
    assert batch["input_ids"].shape == (3, 16)
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (batch["input_ids"][:, -1] == tokenizer.sep_token_id).all()
    assert batch["input_ids"][1, 1:15].tolist() == expected[14:28] and batch["attention_mask"].all()
    train, held = packed.split(0.1)
    assert len(train) + len(held) == len(packed) and len(held) == -(-len(packed) // 10)
    assert torch.equal(held[[0]]["input_ids"], packed[[len(train)]]["input_ids"])


def test_the_tokenised_corpus_is_reused_and_rebuilt_when_corpus_or_tokenizer_change(base, corpus, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    first = tokenize_corpus(CorpusSource([str(corpus)]), tokenizer, tmp_path)
    built = (first / "tokens.bin").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lrc_bert"):
        again = tokenize_corpus(CorpusSource([str(corpus)]), tokenizer, tmp_path)
    assert again == first and (first / "tokens.bin").stat().st_mtime_ns == built and "reused" in caplog.text
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus.read_text() + "one more sentence .\n")
    assert tokenize_corpus(CorpusSource([str(changed)]), tokenizer, tmp_path) != first
    other = build_base_model(tmp_path / "other_tokenizer")
    tokenizer_b = AutoTokenizer.from_pretrained(other)
    tokenizer_b.add_tokens(["zzzword"])
    assert tokenize_corpus(CorpusSource([str(corpus)]), tokenizer_b, tmp_path) not in (first,)
    meta = json.loads((first / "meta.json").read_text())
    assert meta["tokens_per_second"] > 0 and meta["documents"] == len(corpus.read_text().split("\n")) - 1


def test_general_distillation_learns_and_exports_a_student_with_its_projections(base, corpus, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "general"
    general(base, corpus, out, max_steps=40, perturb_eps=0.0, eval_steps=20)
    cos = [r["cos_nce"] for r in records(out)]
    assert len(cos) == 40 and sum(cos[-5:]) / 5 < sum(cos[:5]) / 5 - 0.05, cos
    evals = [r["validation/cos_nce"] for r in records(out, "eval")]
    assert len(evals) == 2 and all(0 < v < 4 for v in evals)
    student = AutoModel.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.lrc_bert["method"] == "general-distill"
    assert AutoTokenizer.from_pretrained(out / "student").get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    with safe_open(str(out / "student" / "lrc_projections.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["pairs"]) == [[1, 1], [2, 2]]
    run = [r for r in records(out, "event") if r.get("event") == "run"][0]
    assert run["method"] == "general-distill"


def test_lrc_bert_starts_distill_from_the_general_student_and_its_projections(base, corpus, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "general"
    general(base, corpus, out, max_steps=10, eval_steps=5)
    teacher = build_teacher(tmp_path / "teacher")  # the same tiny tokenizer; a task head
    saved = load_file(out / "student" / "lrc_projections.safetensors")

    def distill(name, **extra):
        cfg = build_config(None, **tiny_distill_settings(teacher, tmp_path / name, max_steps=1, learning_rate=1e-12,
                                                         student_init=str(out / "student"), **extra))
        runs.run_training(cfg, "distill")
        return load_file(tmp_path / name / "checkpoints" / "step-00000001" / "projections.safetensors")

    loaded = distill("lrc")
    assert all(torch.allclose(loaded[k], saved[k], atol=1e-9) for k in saved)  # lr 1e-12: the loaded weights
    fresh = distill("reinit", reinit_projections=True)
    assert not torch.allclose(fresh["0.weight"], saved["0.weight"])
    rows = [json.loads(line) for line in (tmp_path / "lrc" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "run" and rows[0]["variant"] == "LRC-BERT"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "lrc" / "student").lrc_bert["variant"] == "LRC-BERT"


def test_general_distillation_resumes_bit_identically(base, corpus, tmp_path):
    common = dict(max_steps=12, save_steps=4, eval_steps=6)
    full = general(base, corpus, tmp_path / "full", **common)

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        general(base, corpus, tmp_path / "resumed", on_step=interrupt, **common)
    assert general(base, corpus, tmp_path / "resumed", resume=True, **common) == full
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000012" / "student.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000012" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_corpus_input_is_named_before_training(base, corpus, tmp_path, capsys):
    def fails(corpus_path, *extra):
        code = cli.main(["general-distill", "--teacher", str(base), "--output", str(tmp_path / "run"), "--corpus",
                         str(corpus_path), "--max-length", "16", "--batch-size", "4", "--max-steps", "2",
                         "--no-tensorboard", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        return err

    assert "does not exist" in fails(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "the corpus is empty" in fails(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"a first line\ncaf\xe9 au lait\n")
    assert "latin1.txt, line 2: not UTF-8 (byte 0xe9 at byte offset 16 of the file)" in fails(latin)
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "image.txt: a NUL byte at byte offset 8: this looks like a binary file" in fails(binary)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_student_init_with_another_vocabulary_or_unfitting_projections_is_refused(base, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "general"
    general(base, corpus, out, max_steps=2, eval_steps=2)
    teacher = build_teacher(tmp_path / "teacher")
    other = tmp_path / "other_vocab"
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    tokenizer.add_tokens(["zzzword"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out / "student")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary"):
        runs.run_training(build_config(None, **tiny_distill_settings(teacher, tmp_path / "a", student_init=str(other))),
                          "distill")
    wide_teacher = build_teacher(tmp_path / "wide_teacher", width=48)  # projections 16 -> 48, saved 16 -> 32
    with pytest.raises(ValueError, match="lrc_projections.safetensors.*--reinit-projections"):
        runs.run_training(build_config(None, **tiny_distill_settings(wide_teacher, tmp_path / "b",
                                                                     student_init=str(out / "student"))), "distill")
