"""Losses that carry their own settings: the `losses:` YAML section, the shortcut flags, a plug-in
loss from outside the package, and COS-NCE per layer in metrics.jsonl."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from lrc_bert import cli, runs  # noqa: E402
from lrc_bert.config import build_config, validate  # noqa: E402
from lrc_bert.losses import LOSSES, build_losses  # noqa: E402
from trainer_fixtures import build_teacher, tiny_distill_settings  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_teacher(tmp_path_factory.mktemp("teacher"))


def records(output: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_settings_come_from_the_losses_section_and_flags_win(tmp_path):
    config = yaml_file(tmp_path, """
        temperature: 3.0
        losses:
          soft: {weight: [0.5, 2.0], temperature: 2.0}
          cos_nce: {backend: torch}
    """)
    cfg = build_config(config)
    losses = build_losses(cfg, ["soft", "cos_nce"])
    assert losses["soft"].temperature == 2.0  # the losses section wins over the older key
    assert losses["cos_nce"].backend == "torch"
    assert [s["weights"]["soft"] for s in cfg.stage_plan()] == [0.5, 2.0]
    flagged = build_config(config, temperature=1.5, beta=4.0)  # flags on the command line win
    assert build_losses(flagged, ["soft"])["soft"].temperature == 1.5
    assert [s["weights"]["soft"] for s in flagged.stage_plan()] == [0.0, 4.0]
    assert build_losses(build_config(None, temperature=1.7), ["soft"])["soft"].temperature == 1.7


@pytest.mark.parametrize("text,match", [
    ("losses: {soft: {temprature: 2.0}}", r"losses.soft: unknown settings \['temprature'\]; soft takes"),
    ("losses: {soft: {temperature: -1}}", r"losses.soft: temperature must be a finite number > 0"),
    ("losses: {soft: {weight: [1, 2, 3]}}", r"losses.soft.weight: one number, or one per stage"),
    ("losses: {sofft: {weight: 1}}", r"unknown loss 'sofft'"),
    ("losses: {cos_nce: {backend: tpu}}", r"losses.cos_nce: backend must be one of"),
    ("plugins: [no_such_module_here]", r"plugins: cannot import 'no_such_module_here'"),
])
def test_bad_loss_settings_are_named(teacher, tmp_path, text, match):
    settings = tiny_distill_settings(teacher, tmp_path / "run")
    del settings["loss_backend"]  # a --loss-backend flag would replace the YAML's backend
    cfg = build_config(yaml_file(tmp_path, text), **settings)
    with pytest.raises(ValueError, match=match):
        validate(cfg, "distill")


def test_a_plugin_loss_from_outside_the_package_trains_with_its_own_setting(teacher, tmp_path, monkeypatch):
    plugin = tmp_path / "plugins" / "my_losses.py"
    plugin.parent.mkdir()
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar

        from lrc_bert.losses import register_loss


        @register_loss("logit_norm")
        @dataclass
        class LogitNorm:
            """A toy regulariser: scale * mean squared student logit."""
            scale: float = 1.0
            needs_representations: ClassVar[bool] = False

            def __call__(self, x):
                return self.scale * x.student_logits.float().pow(2).mean()
    '''))
    monkeypatch.syspath_prepend(str(plugin.parent))
    config = yaml_file(tmp_path, """
        plugins: [my_losses]
        stage1_fraction: 0.5
        losses:
          logit_norm: {weight: [0, 1], scale: 1000.0}
    """)
    out = tmp_path / "run"
    try:
        runs.run_training(build_config(config, **tiny_distill_settings(teacher, out, max_steps=8, perturb_eps=0.0)),
                          "distill")
    finally:
        LOSSES.pop("logit_norm", None)
    rows = records(out)
    assert all("logit_norm" not in r for r in rows[:4]) and all("logit_norm" in r for r in rows[4:])
    # The setting reached the loss: with scale 1000 the part dominates stage 2's total.
    for r in rows[4:]:
        assert r["logit_norm"] > 0
        assert r["loss"] == pytest.approx(r["cos_nce"] + r["soft"] + 3 * r["hard"] + r["logit_norm"], rel=1e-5)


def test_cos_nce_is_logged_per_layer(teacher, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["distill", "--task", "snli", "--teacher", str(teacher), "--output", str(out), "--data-dir",
                     str(tiny_distill_settings(teacher, out)["data_dir"]), "--batch-size", "8", "--max-length", "32",
                     "--student-layers", "2", "--student-hidden", "16", "--student-heads", "2",
                     "--student-intermediate", "32", "--no-tensorboard", "--loss-backend", "torch",
                     "--logging-steps", "1", "--max-steps", "3", "--perturb-eps", "0"]) == 0
    for r in records(out):
        assert {"cos_nce/layer1", "cos_nce/layer2"} <= set(r)
        assert r["cos_nce"] == pytest.approx(r["cos_nce/layer1"] + r["cos_nce/layer2"], rel=1e-6)
        assert 0 < r["cos_nce/layer1"] < 4
