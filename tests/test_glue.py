"""`lrc-bert glue` end to end on a fake GLUE folder in the official layouts (tiny models, offline):
one task of each kind (single sentence, pair, regression, MNLI), the table, the submission
files, resuming after kill -9, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from lrc_bert import cli  # noqa: E402
from glue_fixtures import build_base_model, build_glue_folder  # noqa: E402

TINY = ["--max-steps", "4", "--batch-size", "8", "--max-length", "32", "--eval-steps", "100", "--save-steps", "2",
        "--student-layers", "2", "--student-hidden", "16", "--student-heads", "2", "--student-intermediate", "32",
        "--loss-backend", "torch", "--learning-rate", "1e-3", "--latency-repeats", "2", "--logging-steps", "2"]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return build_glue_folder(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base"))


def argv(base, glue_dir, output, tasks="cola,mrpc,stsb,mnli", *extra):
    config = Path(output).parent / "no-tensorboard.yaml"
    config.write_text("tensorboard: false\n")
    return ["glue", "--teacher-base", str(base), "--output", str(output), "--data-dir", str(glue_dir), "--tasks",
            tasks, "--config", str(config), *TINY, *extra]


@pytest.fixture(scope="module")
def finished(base, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "glue"
    assert cli.main(argv(base, glue_dir, out, "cola,mrpc,stsb,mnli", "--predict-test")) == 0
    return out


def test_the_table_has_every_task_with_its_own_metric(finished):
    results = json.loads((finished / "results.json").read_text())
    assert results["columns"] == ["CoLA", "MRPC F1", "MRPC acc", "STS-B P", "STS-B S", "MNLI-m", "MNLI-mm"]
    assert results["tasks"] == ["cola", "mrpc", "stsb", "mnli"] and results["failed"] == {}
    for row in ("teacher", "student"):
        assert all(isinstance(v, float) for v in results["rows"][row].values()), results["rows"][row]
        assert all(-100 <= v <= 100 for v in results["rows"][row].values())
    # the GLUE score averages each task's metrics first (MNLI: matched and mismatched), then the tasks
    rows, scores = results["rows"]["teacher"], results["task_scores"]["teacher"]
    assert scores["mrpc"] == pytest.approx((rows["MRPC F1"] + rows["MRPC acc"]) / 2)
    assert scores["mnli"] == pytest.approx((rows["MNLI-m"] + rows["MNLI-mm"]) / 2)
    assert results["glue_score"]["teacher"] == pytest.approx(sum(scores.values()) / 4)
    per_task = json.loads((finished / "cola" / "result.json").read_text())
    assert "dev/matthews_corrcoef" in per_task["teacher_metrics"] and per_task["variant"] == "LRC-BERT1"
    assert {"dev_matched/accuracy", "dev_mismatched/accuracy"} <= set(
        json.loads((finished / "mnli" / "result.json").read_text())["student_metrics"][0])
    table = (finished / "results.md").read_text()
    for column in results["columns"]:
        assert column in table
    assert "| teacher |" in table and "student (LRC-BERT1)" in table and "retention" in table
    assert results["models"]["teacher"]["parameters"] > results["models"]["student"]["parameters"]


def test_the_submission_files_have_the_leaderboards_names_columns_and_labels(finished, glue_dir):
    folder = finished / "glue_submission"
    names = sorted(p.name for p in folder.glob("*.tsv"))
    assert names == ["AX.tsv", "CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "MRPC.tsv", "STS-B.tsv"]
    spelled = {"CoLA.tsv": {"0", "1"}, "MRPC.tsv": {"0", "1"},
               "MNLI-m.tsv": {"entailment", "neutral", "contradiction"},
               "MNLI-mm.tsv": {"entailment", "neutral", "contradiction"}, "AX.tsv": {"entailment", "neutral",
                                                                                  "contradiction"}}
    tests = {"CoLA.tsv": "CoLA/test.tsv", "MRPC.tsv": "MRPC/test.tsv", "STS-B.tsv": "STS-B/test.tsv",
             "MNLI-m.tsv": "MNLI/test_matched.tsv", "MNLI-mm.tsv": "MNLI/test_mismatched.tsv",
             "AX.tsv": "diagnostic/diagnostic.tsv"}
    for name in names:
        lines = (folder / name).read_text().splitlines()
        assert lines[0] == "index\tprediction"
        rows = [line.split("\t") for line in lines[1:]]
        source = (glue_dir / tests[name]).read_text().splitlines()[1:]
        assert [r[0] for r in rows] == [line.split("\t")[0] for line in source]  # every test row, in order
        values = [r[1] for r in rows]
        if name == "STS-B.tsv":
            assert all(0.0 <= float(v) <= 5.0 for v in values)
        else:
            assert set(values) <= spelled[name], (name, set(values))
    with zipfile.ZipFile(finished / "glue_submission.zip") as archive:
        assert sorted(archive.namelist()) == names


def test_a_rerun_skips_finished_tasks(finished, base, glue_dir, capsys):
    before = (finished / "cola" / "result.json").stat().st_mtime_ns
    assert cli.main(argv(base, glue_dir, finished, "cola,mrpc,stsb,mnli")) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier; skipped") == 4
    assert (finished / "cola" / "result.json").stat().st_mtime_ns == before


def test_a_run_killed_mid_task_resumes_that_task(base, glue_dir, tmp_path, capsys):
    out = tmp_path / "glue"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lrc_bert import cli, trainer
        real = trainer.Trainer.save
        def save(self, *args, **kwargs):
            path = real(self, *args, **kwargs)
            if self.cfg.task == "mrpc" and self.cfg.output.endswith("student") and self.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-task: after the student's first checkpoint
            return path
        trainer.Trainer.save = save
        sys.exit(cli.main({argv(base, glue_dir, out, "cola,mrpc")!r}))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "cola" / "result.json").is_file() and not (out / "mrpc" / "result.json").exists()
    assert (out / "mrpc" / "student" / "checkpoints" / "step-00000002").is_dir()
    assert cli.main(argv(base, glue_dir, out, "cola,mrpc")) == 0
    printed = capsys.readouterr().out
    assert "[cola] task: finished earlier; skipped" in printed
    assert "[mrpc] teacher: done earlier" in printed
    assert "[mrpc] student: resuming from its last checkpoint" in printed
    rows = [json.loads(line) for line in (out / "mrpc" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [2, 4]  # one run's records, resumed at step 2


def test_a_missing_task_folder_is_named(base, glue_dir, tmp_path, capsys):
    assert cli.main(argv(base, glue_dir, tmp_path / "out", "cola,rte")) == 2
    err = capsys.readouterr().err
    assert "rte: the task folder" in err and "RTE" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "cola").exists()  # checked before any work


def test_a_test_file_without_an_index_column_is_named(base, tmp_path, capsys):
    glue_dir = build_glue_folder(tmp_path / "glue", tasks=("cola",))
    lines = (glue_dir / "CoLA" / "test.tsv").read_text().splitlines()
    (glue_dir / "CoLA" / "test.tsv").write_text("\n".join(["id\tsentence", *lines[1:]]) + "\n")
    assert cli.main(argv(base, glue_dir, tmp_path / "out", "cola", "--predict-test")) == 2
    err = capsys.readouterr().err
    assert "CoLA/test.tsv" in err and "'index'" in err and "Traceback" not in err


def test_a_failed_task_is_reported_and_the_others_go_on(base, tmp_path, capsys):
    glue_dir = build_glue_folder(tmp_path / "glue", tasks=("cola", "mrpc"))
    train = glue_dir / "MRPC" / "train.tsv"
    train.write_text(train.read_text() + "1\t7\t8\tonly three fields\n")  # a short row, named at its line
    out = tmp_path / "out"
    assert cli.main(argv(base, glue_dir, out, "mrpc,cola")) == 1
    printed = capsys.readouterr().out
    assert "[mrpc] failed:" in printed and "train.tsv, line" in printed
    assert (out / "cola" / "result.json").is_file()  # the run went on
    assert "Failed tasks: mrpc" in (out / "results.md").read_text()
    assert cli.main(argv(base, glue_dir, tmp_path / "fast", "mrpc,cola", "--fail-fast")) == 1
    assert not (tmp_path / "fast" / "cola").exists()
