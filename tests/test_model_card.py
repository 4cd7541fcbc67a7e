"""Every export carries a Hugging Face model card: YAML metadata, then the run in words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("datasets")

from lrc_bert import runs  # noqa: E402
from lrc_bert.config import build_config  # noqa: E402
from trainer_fixtures import SNLI_SAMPLE, build_teacher, tiny_distill_settings  # noqa: E402


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def best_record(output: Path) -> dict:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in rows if r.get("event") == "done"][-1]
    return next(r for r in rows if r["type"] == "eval" and r["step"] == done["best_step"])


def test_distill_and_finetune_exports_carry_a_model_card(tmp_path):
    teacher = build_teacher(tmp_path / "teacher")
    first = tmp_path / "lrc1"
    runs.run_training(build_config(None, **tiny_distill_settings(teacher, first, max_steps=4, eval_steps=2)),
                      "distill")
    meta, body = card(first / "student")
    assert meta["library_name"] == "transformers" and meta["datasets"] == ["stanfordnlp/snli"]
    assert meta["base_model"] == str(teacher) and "lrc-bert" in meta["tags"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "dev"
    assert result["metrics"] == [{"type": "accuracy", "value": pytest.approx(best_record(first)["dev/accuracy"])}]
    assert "LRC-BERT1: task distillation only" in body and str(teacher) in body and '"seed": 7' in body

    second = tmp_path / "lrc"  # from a pretrained student: the LRC-BERT variant
    runs.run_training(build_config(None, **tiny_distill_settings(teacher, second, max_steps=2,
                                                                 student_init=str(first / "student"))), "distill")
    assert f"LRC-BERT: task distillation from the pretrained student {first / 'student'}" in card(second / "student")[1]

    ft = tmp_path / "ft"
    runs.run_training(build_config(None, task="snli", model=str(teacher), output=str(ft), data_dir=str(SNLI_SAMPLE),
                                   batch_size=8, max_length=32, max_steps=2, tensorboard=False), "finetune")
    meta, body = card(ft / "model")
    assert "base_model" not in meta and "# SNLI model (fine-tuning)" in body
