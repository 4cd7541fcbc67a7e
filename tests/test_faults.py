"""The trainer under hostile use: reused run folders, diverging losses, damaged checkpoints,
kill -9 mid-write, a full disk, malformed data files, impossible settings, and a head with
another label count. Every error names what is wrong, and nothing is lost or exported broken."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from lrc_bert import checkpoint as ckpt  # noqa: E402
from lrc_bert import cli, runs  # noqa: E402
from lrc_bert.config import build_config  # noqa: E402
from lrc_bert.losses import LOSSES, register_loss  # noqa: E402
from lrc_bert.tasks import DataError, get_task, load_split  # noqa: E402
from lrc_bert.trainer import MAX_CONSECUTIVE_SKIPPED_STEPS, FiniteGuard  # noqa: E402
from trainer_fixtures import SNLI_DEMO, SNLI_SAMPLE, build_teacher, tiny_distill_settings  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_teacher(tmp_path_factory.mktemp("teacher"))


def distill(teacher, output, resume=False, on_step=None, **overrides):
    cfg = build_config(None, **tiny_distill_settings(teacher, output, **overrides))
    return runs.run_training(cfg, "distill", resume=resume, on_step=on_step)


def distill_argv(teacher, output, *extra):
    return ["distill", "--task", "snli", "--teacher", str(teacher), "--output", str(output), "--data-dir",
            str(SNLI_SAMPLE), "--batch-size", "8", "--max-length", "32", "--student-layers", "2",
            "--student-hidden", "16", "--student-heads", "2", "--student-intermediate", "32",
            "--no-tensorboard", "--loss-backend", "torch", "--logging-steps", "1", *extra]


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ 1. reusing a run folder


def test_new_run_into_a_used_folder_is_refused_then_overwritten_on_request(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(distill_argv(teacher, out, "--max-steps", "6", "--save-steps", "2")) == 0
    old_checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert old_checkpoints == ["step-00000004", "step-00000006"]
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    assert cli.main(distill_argv(teacher, out, "--max-steps", "3", "--save-steps", "1")) == 2
    line = one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite-output" in line
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == old_checkpoints  # untouched

    assert cli.main(distill_argv(teacher, out, "--max-steps", "3", "--save-steps", "1", "--overwrite-output")) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    steps = [r["step"] for r in records(out) if r["type"] == "train"]
    assert steps == [1, 2, 3]  # one run's records, not two
    assert (out / "notes.txt").read_text() == "the user's own file"  # only the run's artifacts go


def test_resume_on_other_data_is_refused_naming_the_difference(teacher, tmp_path):
    out = tmp_path / "run"
    distill(teacher, out, max_steps=4, save_steps=2)
    changed = tmp_path / "data"
    shutil.copytree(SNLI_SAMPLE, changed)
    lines = (changed / "train.tsv").read_text().splitlines(keepends=True)
    fields = lines[5].split("\t")
    fields[2] = "A completely different hypothesis ."
    lines[5] = "\t".join(fields)
    (changed / "train.tsv").write_text("".join(lines))
    with pytest.raises(ValueError, match="training data differ.*fingerprint"):
        distill(teacher, out, resume=True, max_steps=4, save_steps=2, data_dir=str(changed))


# ------------------------------------------------------------------ 2. non-finite losses


@pytest.fixture
def nan_loss_after():
    """A loss (registered like any plug-in) that is finite for its first ``calls`` calls, then NaN."""

    @register_loss("nan_after")
    @dataclass
    class NanAfter:
        calls: int = 0
        needs_representations: ClassVar[bool] = False
        seen: ClassVar[list] = []

        def __call__(self, x):
            self.seen.append(1)
            value = x.student_logits.float().mean() * 0
            return value + (float("nan") if len(self.seen) > self.calls else 0.0)

    yield NanAfter
    LOSSES.pop("nan_after", None)


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(teacher, tmp_path, nan_loss_after, capsys):
    out = tmp_path / "run"
    config = tmp_path / "losses.yaml"  # steps 1-5 finite, step 6 NaN
    config.write_text("losses: {nan_after: {weight: 1.0, calls: 5}}\nstage1_fraction: 1.0\nperturb_eps: 0.0\n")
    code = cli.main(distill_argv(teacher, out, "--config", str(config), "--max-steps", "12", "--save-steps", "4",
                                 "--eval-steps", "4", "--logging-steps", "3"))
    assert code == 1
    line = one_error_line(capsys)
    assert "step 6" in line and "nan_after" in line and "step-00000004" in line
    assert not (out / "student").exists()  # nothing exported
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000004"]  # the NaN steps never reached a checkpoint
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoints" / "step-00000004" / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    best = load_file(out / "checkpoints" / "best" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in best.values())
    assert records(out)[-1]["event"] == "diverged"


def test_an_infinite_learning_rate_and_nan_epochs_are_settings_errors(teacher, tmp_path, capsys):
    for flags, name in [(["--learning-rate", "inf"], "learning_rate"), (["--epochs", "nan"], "epochs"),
                        (["--warmup-ratio", "nan"], "warmup_ratio"), (["--temperature", "inf"], "temperature")]:
        assert cli.main(distill_argv(teacher, tmp_path / "run", *flags)) == 2
        line = one_error_line(capsys)
        assert name in line and "finite" in line
    assert not (tmp_path / "run").exists()


def test_a_huge_learning_rate_diverges_loudly(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(distill_argv(teacher, out, "--learning-rate", "1e30", "--max-steps", "20", "--perturb-eps", "0",
                                 "--stage1-fraction", "0.5", "--logging-steps", "5"))
    assert code == 1
    assert "non-finite" in one_error_line(capsys)
    assert not (out / "student").exists()


def test_fp16_skipped_steps_are_counted_and_only_a_long_run_of_them_fails():
    guard = FiniteGuard(torch.device("cpu"), fp16=True)
    finite, inf = torch.tensor(1.0), torch.tensor(float("inf"))
    for step in range(MAX_CONSECUTIVE_SKIPPED_STEPS - 1):
        guard.record(step, {"loss": finite}, inf)  # overflowed gradients: skipped by the scaler
    guard.record(100, {"loss": finite}, torch.tensor(2.0))
    assert guard.failure(101) is None and guard.skipped_total() == MAX_CONSECUTIVE_SKIPPED_STEPS - 1
    for step in range(MAX_CONSECUTIVE_SKIPPED_STEPS):
        guard.record(200 + step, {"loss": finite}, inf)
    assert "consecutive" in guard.failure(300)
    # fp16 or not, a non-finite loss is a failure, named with its step and part
    guard = FiniteGuard(torch.device("cpu"), fp16=True)
    guard.record(0, {"loss": finite, "hard": finite}, finite)
    guard.record(1, {"loss": torch.tensor(float("nan")), "hard": finite}, finite)
    guard.record(2, {"loss": torch.tensor(float("nan")), "hard": torch.tensor(float("nan"))}, finite)
    assert guard.failure(3) == "step 2: non-finite loss"
    fp32 = FiniteGuard(torch.device("cpu"), fp16=False)
    fp32.record(0, {"loss": finite}, inf)
    assert fp32.failure(1) == "step 1: non-finite grad_norm"


# ------------------------------------------------------------------ 3. verified checkpoints


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "zero":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(64)
        file.write_bytes(bytes(data))
    else:  # flip one bit
        data[len(data) // 2] ^= 0x10
        file.write_bytes(bytes(data))


@pytest.mark.parametrize("how,name", [("truncate", "student.safetensors"), ("zero", "student.safetensors"),
                                      ("flip", "trainer_state.pt"), ("flip", "projections.safetensors")])
def test_a_damaged_latest_checkpoint_is_named_and_resume_falls_back(teacher, tmp_path, how, name, caplog):
    settings = dict(max_steps=8, save_steps=2, eval_steps=100)
    full = distill(teacher, tmp_path / "full", **settings)

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, out, on_step=interrupt, **settings)
    _damage(out / "checkpoints" / "step-00000006" / name, how)
    with pytest.raises(ckpt.CorruptCheckpointError, match=name):
        ckpt.verify_directory(out / "checkpoints" / "step-00000006")
    resumed = distill(teacher, out, resume=True, **settings)
    assert f"step-00000006/{name}" in caplog.text and "falling back to the previous checkpoint step-00000004" \
        in caplog.text
    assert resumed == full  # exact resume from the older checkpoint
    steps = [r["step"] for r in records(out) if r["type"] == "train"]
    assert steps == list(range(1, 9))  # the replayed steps are logged once


def test_resume_with_no_valid_checkpoint_says_how_to_continue(teacher, tmp_path):
    out = tmp_path / "run"
    distill(teacher, out, max_steps=2, save_steps=100)
    _damage(out / "checkpoints" / "step-00000002" / "student.safetensors", "truncate")
    with pytest.raises(ckpt.CorruptCheckpointError, match="student.safetensors.*--overwrite-output"):
        distill(teacher, out, max_steps=2, save_steps=100, resume=True)


def test_kill_9_during_a_checkpoint_write_loses_nothing(teacher, tmp_path):
    out = tmp_path / "run"
    settings = tiny_distill_settings(teacher, out, max_steps=6, save_steps=2, eval_steps=100)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lrc_bert import checkpoint, runs
        from lrc_bert.config import build_config
        real = checkpoint.write_manifest
        def write_manifest(folder):
            if "step-00000004" in str(folder):  # the second checkpoint: killed mid-write
                os.kill(os.getpid(), signal.SIGKILL)
            real(folder)
        checkpoint.write_manifest = write_manifest
        runs.run_training(build_config(None, **{settings!r}), "distill")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-00000002" in names and "step-00000004" not in names
    assert any(n.startswith(".step-00000004.tmp-") for n in names)  # the interrupted write, hidden
    assert ckpt.verify_directory(out / "checkpoints" / "step-00000002")
    final = distill(teacher, out, resume=True, max_steps=6, save_steps=2, eval_steps=100)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned at start
    assert final == distill(teacher, tmp_path / "full", max_steps=6, save_steps=2, eval_steps=100)


def test_a_full_disk_during_a_save_names_the_disk_and_keeps_earlier_checkpoints(teacher, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli.main(distill_argv(teacher, out, "--max-steps", "6", "--save-steps", "2")) == 2
    line = one_error_line(capsys)
    assert "disk is full" in line and "step-00000004" in line and "--resume" in line
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best", "step-00000002"] or names == ["step-00000002"]
    assert ckpt.verify_directory(out / "checkpoints" / "step-00000002")


def test_pruning_renames_before_deleting(tmp_path):
    folder = tmp_path / "checkpoints"
    module = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(folder, step, {"m": module}, {"step": step}, {}, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000003"]
    (folder / ".step-00000001.trash-123").mkdir()  # a prune killed midway
    (folder / ".step-00000009.tmp-456").mkdir()  # a write killed midway
    assert len(ckpt.remove_stale(folder)) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000003"]


# ------------------------------------------------------------------ 4. data errors


def _tsv(folder: Path, body: str, name: str = "train.tsv", raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        shutil.copy(SNLI_SAMPLE / f"{split}.tsv", folder / f"{split}.tsv")
    (folder / name).write_bytes(raw if raw is not None else body.encode())
    return folder


HEADER = "pairID\tsentence1\tsentence2\tgold_label\n"


@pytest.mark.parametrize("case,body,match", [
    ("extra field", HEADER + "1\ta\tb\tneutral\n2\ta\tb\tneutral\textra\n", r"line 3: 5 tab-separated fields, expected 4"),
    ("missing field", HEADER + "1\ta\tb\tneutral\n2\ta\tneutral\n", r"line 3: 3 tab-separated fields, expected 4"),
    ("empty", "", r"train.tsv is empty"),
    ("header only", HEADER, r"train.tsv has a header but no rows"),
])
def test_malformed_tsv_is_named_with_its_line(tmp_path, case, body, match):
    folder = _tsv(tmp_path / "data", body)
    with pytest.raises(DataError, match=match):
        load_split(get_task("snli"), "train", folder)


def test_non_utf8_bytes_are_named_with_line_and_offset(tmp_path):
    good = (HEADER + "1\ta\tb\tneutral\n").encode()
    folder = _tsv(tmp_path / "data", "", raw=good + b"2\tcaf\xe9\tb\tneutral\n")
    offset = len(good) + len(b"2\tcaf")
    with pytest.raises(DataError, match=rf"line 3: not UTF-8 \(byte 0xe9 at byte offset {offset} "):
        load_split(get_task("snli"), "train", folder)


def test_a_utf8_bom_is_accepted(tmp_path):
    folder = _tsv(tmp_path / "data", "", raw=b"\xef\xbb\xbf" + (HEADER + "1\ta cat\tan animal\tentailment\n").encode())
    ds = load_split(get_task("snli"), "train", folder)
    assert ds["text_a"] == ["a cat"] and ds["label"] == [0]


def test_data_errors_reach_the_cli_as_one_line_with_exit_code_2(teacher, tmp_path, capsys):
    folder = _tsv(tmp_path / "data", HEADER + "1\ta\tb\tneutral\n2\ta\tneutral\n", name="dev.tsv")
    argv = distill_argv(teacher, tmp_path / "run", "--max-steps", "2")
    argv[argv.index("--data-dir") + 1] = str(folder)
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert "dev.tsv, line 3" in line


def test_unlabelled_rows_are_reported_not_silently_dropped(tmp_path, caplog):
    folder = _tsv(tmp_path / "data", HEADER + "1\ta\tb\tneutral\n2\tc\td\t-\n")
    import logging

    with caplog.at_level(logging.INFO, logger="lrc_bert"):
        ds = load_split(get_task("snli"), "train", folder)
    assert len(ds) == 1 and "1 unlabelled rows" in caplog.text


# ------------------------------------------------------------------ 5. settings checked before any model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)


@pytest.mark.parametrize("flags,match", [
    (["--max-length", "100"], r"max_length 100 is above the 64 positions"),
    (["--device", "cuda"], r"device: .*cuda"),
    (["--loss-backend", "cuda"], r"loss_backend 'cuda' cannot run on cpu"),
    (["--batch-size", "4", "--grad-accum-steps", "4"], r"each micro-batch holds 1 example"),
])
def test_impossible_settings_fail_before_any_model_loads(teacher, tmp_path, capsys, no_model_loads, flags, match):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(distill_argv(teacher, tmp_path / "run", *flags)) == 2
    line = one_error_line(capsys)
    assert __import__("re").search(match, line), line


# ------------------------------------------------------------------ 6. a head with another label count


def test_finetuning_a_head_with_another_label_count(tmp_path, capsys, caplog):
    two_labels = build_teacher(tmp_path / "binary", id2label={0: "negative", 1: "positive"})
    argv = ["finetune", "--task", "snli", "--model", str(two_labels), "--output", str(tmp_path / "ft"),
            "--data-dir", str(SNLI_SAMPLE), "--max-steps", "2", "--batch-size", "8", "--max-length", "32",
            "--no-tensorboard"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert "2 labels" in line and "3" in line and "--ignore-mismatched-sizes" in line
    assert cli.main([*argv, "--ignore-mismatched-sizes"]) == 0
    assert "re-initialised" in caplog.text
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "ft" / "model").num_labels == 3


# ------------------------------------------------------------------ 13. training on real tokens learns


def test_a_few_hundred_steps_on_the_shipped_snli_data_beat_the_majority_class(tmp_path):
    teacher = build_teacher(tmp_path / "teacher")
    cfg = build_config(None, task="snli", model=str(teacher), output=str(tmp_path / "ft"), data_dir=str(SNLI_DEMO),
                       batch_size=32, max_length=48, learning_rate=1e-3, max_steps=200, eval_steps=1000,
                       save_steps=1000, logging_steps=50, seed=1, tensorboard=False)
    final = runs.run_training(cfg, "finetune")
    labels = [line.split("\t")[3] for line in (SNLI_DEMO / "dev.tsv").read_text().splitlines()[1:]]
    majority = max(labels.count(name) for name in set(labels)) / len(labels)
    assert final["dev/accuracy"] > majority + 0.05, (final, majority)
