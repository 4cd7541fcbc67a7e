"""`lrc-bert augment` with a tiny random masked LM, offline: deterministic for a seed, labels,
row count and layout kept, the other files copied, and bad settings refused."""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")

from lrc_bert import cli  # noqa: E402
from trainer_fixtures import SNLI_SAMPLE, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("mlm")
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def run(mlm, output, *extra) -> int:
    return cli.main(["augment", "--task", "snli", "--data-dir", str(SNLI_SAMPLE), "--output", str(output), "--mlm",
                     str(mlm), "--n-aug", "3", "--p", "0.5", "--top-k", "4", "--device", "cpu", *extra])


def test_augmentation_keeps_labels_rows_and_layout_and_is_deterministic(mlm, tmp_path):
    assert run(mlm, tmp_path / "a") == 0 and run(mlm, tmp_path / "b") == 0
    text = (tmp_path / "a" / "train.tsv").read_text()
    assert text == (tmp_path / "b" / "train.tsv").read_text()  # the same seed, the same file
    assert run(mlm, tmp_path / "c", "--seed", "7") == 0
    assert (tmp_path / "c" / "train.tsv").read_text() != text
    original = (SNLI_SAMPLE / "train.tsv").read_text().splitlines()
    lines = text.splitlines()
    assert lines[0] == original[0]  # the header
    rows, source = [line.split("\t") for line in lines[1:]], [line.split("\t") for line in original[1:]]
    assert len(rows) == 4 * len(source)  # each original, then its 3 variants
    changed = 0
    for i, row in enumerate(source):
        group = rows[4 * i:4 * i + 4]
        assert group[0] == row  # the original is kept
        for variant in group[1:]:
            assert len(variant) == 4 and variant[0] == row[0] and variant[3] == row[3]  # id and label kept
            assert len(variant[1].split()) == len(row[1].split())  # one word for one word
            changed += variant[1] != row[1] or variant[2] != row[2]
    assert changed > len(source)  # p = 0.5: most variants differ
    for name in ("dev.tsv", "test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (SNLI_SAMPLE / name).read_bytes()


@pytest.mark.parametrize("flags,match", [(["--n-aug", "0"], "--n-aug must be"), (["--p", "0"], "--p must be in"),
                                         (["--p", "1.5"], "--p must be in")])
def test_bad_augmentation_settings_are_refused(mlm, tmp_path, capsys, flags, match):
    assert run(mlm, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
