"""``lrc-bert glue``: a whole GLUE distillation run in one command.

For each task, in order: fine-tune the base model as the task's teacher (or reuse
``--teachers DIR/<task>/model``), distill a student (from ``--general-student``: LRC-BERT; from
a random init: LRC-BERT1), evaluate both on dev (MNLI matched and mismatched apart) and, with
``--predict-test``, predict the unlabelled test sets. Then ``results.md`` / ``results.json``
hold the paper's Table 1 layout, and ``glue_submission/`` (and its zip) the leaderboard files.

Layout of ``OUTPUT``::

    <task>/teacher/        the finetune run (its export: model/)
    <task>/student[-seedN]/  the distill run(s) (export: student/)
    <task>/result.json     written when the task is finished; a rerun skips such tasks
    results.md, results.json, glue_submission/, glue_submission.zip

A rerun resumes: finished tasks are skipped, a stage with checkpoints resumes from them
(exact resume within a stage), a stage that never checkpointed starts over.

Settings: the defaults, then ``--config`` (``glue.yaml`` is shipped: the settings of every task
and stage, then ``finetune:`` / ``distill:`` sections per stage and ``tasks:`` per task, each
of which may hold its own ``finetune:`` / ``distill:``), then the command-line flags, which
apply to every task and stage.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import FIELDS, PACKAGED_CONFIGS, TrainConfig, build_config
from .tasks import DataError, TaskSpec, get_task, tsv_rows

log = logging.getLogger("lrc_bert")


@dataclass(frozen=True)
class GlueTask:
    name: str  # the task name of lrc-bert (tasks.py)
    folder: str  # its folder in the official GLUE layout
    columns: tuple  # the paper's table: (column title, metric key, split)
    test_files: dict  # submission file stem -> test file, relative to the task folder
    names_in_submission: bool = False  # predictions spelled as label names, else as class ids (or scores)
    index_column: str = "index"


GLUE_TASKS = {t.name: t for t in [
    GlueTask("mnli", "MNLI", (("MNLI-m", "accuracy", "dev_matched"), ("MNLI-mm", "accuracy", "dev_mismatched")),
             {"MNLI-m": "test_matched.tsv", "MNLI-mm": "test_mismatched.tsv", "AX": "../diagnostic/diagnostic.tsv"},
             names_in_submission=True),
    GlueTask("qqp", "QQP", (("QQP F1", "f1", "dev"), ("QQP acc", "accuracy", "dev")), {"QQP": "test.tsv"},
             index_column="id"),
    GlueTask("qnli", "QNLI", (("QNLI", "accuracy", "dev"),), {"QNLI": "test.tsv"}, names_in_submission=True),
    GlueTask("sst2", "SST-2", (("SST-2", "accuracy", "dev"),), {"SST-2": "test.tsv"}),
    GlueTask("cola", "CoLA", (("CoLA", "matthews_corrcoef", "dev"),), {"CoLA": "test.tsv"}),
    GlueTask("stsb", "STS-B", (("STS-B P", "pearson", "dev"), ("STS-B S", "spearman", "dev")), {"STS-B": "test.tsv"}),
    GlueTask("mrpc", "MRPC", (("MRPC F1", "f1", "dev"), ("MRPC acc", "accuracy", "dev")), {"MRPC": "test.tsv"}),
    GlueTask("rte", "RTE", (("RTE", "accuracy", "dev"),), {"RTE": "test.tsv"}, names_in_submission=True),
    GlueTask("wnli", "WNLI", (("WNLI", "accuracy", "dev"),), {"WNLI": "test.tsv"}),
]}
TASK_ORDER = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
HUB_TEST_SPLITS = {"MNLI-m": ("mnli", "test_matched"), "MNLI-mm": ("mnli", "test_mismatched"), "AX": ("ax", "test")}

# What the repository holds of the paper's Table 1 (Fu et al., AAAI 2021): the per-task test
# scores are not in it, so they are not printed; its summary claims are.
PAPER = {"retention": 97.4, "smaller": 7.5, "faster": 9.6}


def glue_score(task_scores: dict) -> Optional[float]:
    """The GLUE benchmark's average: each task's score is the mean of its metrics (MRPC and QQP:
    F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched), and the
    score is the unweighted mean over the tasks, in points."""
    values = [v for v in task_scores.values() if v is not None]
    return statistics.fmean(values) if values else None


def task_score(glue_task: GlueTask, metrics: dict) -> Optional[float]:
    values = [metrics.get(f"{split}/{key}") for _, key, split in glue_task.columns]
    return None if any(v is None for v in values) else 100 * statistics.fmean(values)


# ------------------------------------------------------------------ settings


def load_glue_yaml(path: Optional[str]) -> dict:
    """The glue YAML: run settings, plus ``finetune:``, ``distill:`` and ``tasks:`` sections."""
    if path is None:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file() and (PACKAGED_CONFIGS / f"{file.name}.yaml").is_file():
        file = PACKAGED_CONFIGS / f"{file.name}.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {file} must hold a mapping of settings")
    for name, section in data.get("tasks", {}).items():
        if name not in GLUE_TASKS:
            raise ValueError(f"--config {file}: tasks.{name} is not a GLUE task ({', '.join(TASK_ORDER)})")
        _check_section(file, f"tasks.{name}", section, allow_stages=True)
    _check_section(file, "the top level", {k: v for k, v in data.items() if k != "tasks"}, allow_stages=True)
    return data


def _check_section(file, where: str, section, allow_stages: bool) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"--config {file}: {where} must be a mapping of settings")
    for key, value in section.items():
        if allow_stages and key in ("finetune", "distill"):
            _check_section(file, f"{where}.{key}", value, allow_stages=False)
        elif key not in FIELDS:
            raise ValueError(f"--config {file}: unknown setting {key!r} in {where}")


def stage_config(settings: dict, flags: dict, task_name: str, stage: str, **fixed) -> TrainConfig:
    """Defaults < YAML < YAML stage < YAML task < YAML task stage < flags < what the run fixes."""
    top = {k: v for k, v in settings.items() if k not in ("finetune", "distill", "tasks")}
    per_task = settings.get("tasks", {}).get(task_name, {})
    values = {**top, **settings.get(stage, {}), **{k: v for k, v in per_task.items() if k not in ("finetune", "distill")},
              **per_task.get(stage, {}), **flags, **fixed}
    cfg = build_config(None, **values)
    if values.get("max_length") == 0:  # the flag's spelling of dynamic padding
        cfg.max_length = None
    return cfg


# ------------------------------------------------------------------ test sets


def read_test_file(glue_task: GlueTask, task: TaskSpec, file: Path) -> tuple[list, list]:
    """(indices, texts) of an official GLUE test file; texts are tuples of the task's columns."""
    if not file.is_file():
        raise FileNotFoundError(f"{task.name}: the test file {file} is missing (the GLUE layout has it)")
    rows = tsv_rows(file)
    header = next(rows, (0, None))[1]
    if header is None:
        raise DataError(f"{file} is empty")
    text_columns = task.tsv_text if not file.name.startswith("diagnostic") else ("sentence1", "sentence2")
    index_column = glue_task.index_column if not file.name.startswith("diagnostic") else "index"
    missing = [c for c in (index_column, *text_columns) if c not in header]
    if missing:
        raise DataError(f"{file}: no {', '.join(repr(c) for c in missing)} column (the test file needs "
                        f"{index_column!r} for the submission); found {header}")
    at = [header.index(c) for c in (index_column, *text_columns)]
    indices, texts = [], []
    for _, fields in rows:
        indices.append(fields[at[0]])
        texts.append(tuple(fields[i] for i in at[1:]))
    return indices, texts


def read_hub_test(glue_task: GlueTask, task: TaskSpec, stem: str) -> tuple[list, list]:
    import datasets

    name, split = HUB_TEST_SPLITS.get(stem, (task.name, "test"))
    ds = datasets.load_dataset("glue", name, split=split)
    columns = ("premise", "hypothesis") if name == "ax" else task.hub_text
    return [str(i) for i in ds["idx"]], list(zip(*(ds[c] for c in columns)))


def predict_texts(model_dir: Path, task: TaskSpec, texts: list, max_length: Optional[int], batch_size: int,
                  device) -> list:
    """Class ids in the task's label order (or scores for STS-B) for (text_a[, text_b]) tuples."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .tasks import label_alignment

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    alignment = label_alignment(task, model.config.id2label)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(zip(*texts[start:start + batch_size]))
            inputs = tokenizer(*chunk, truncation=True, padding=True, max_length=max_length or
                               min(tokenizer.model_max_length, model.config.max_position_embeddings),
                               return_tensors="pt").to(device)
            logits = model(**inputs).logits.float()
            out += (logits.squeeze(-1).tolist() if alignment is None else logits[:, alignment].argmax(-1).tolist())
    return out


def submission_value(glue_task: GlueTask, task: TaskSpec, prediction) -> str:
    if task.is_regression:
        return f"{min(5.0, max(0.0, float(prediction))):.3f}"
    return task.labels[prediction] if glue_task.names_in_submission else str(int(prediction))


# ------------------------------------------------------------------ the run


class GlueRun:
    def __init__(self, output: Path, settings: dict, flags: dict, teacher_base: str, data_dir: Optional[str],
                 general_student: Optional[str], teachers: Optional[str], predict_test: bool, seeds: int,
                 fail_fast: bool, latency_repeats: int = 20):
        self.output, self.settings, self.flags = Path(output), settings, flags
        self.teacher_base, self.data_dir, self.general_student = teacher_base, data_dir, general_student
        self.teachers, self.predict_test, self.seeds, self.fail_fast = teachers, predict_test, seeds, fail_fast
        self.latency_repeats = latency_repeats

    def say(self, task: str, stage: str, text: str) -> None:
        print(f"[{task}] {stage}: {text}", flush=True)

    def task_data_dir(self, name: str) -> Optional[str]:
        return None if self.data_dir is None else str(Path(self.data_dir) / GLUE_TASKS[name].folder)

    def check(self, tasks: list) -> None:
        """Before any work: every task folder and file, the models, and each stage's settings."""
        from .config import validate

        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {self.data_dir} is not a directory")
        for name in tasks:
            folder = self.task_data_dir(name)
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"{name}: the task folder {folder} is missing from --data-dir "
                                        f"{self.data_dir} (the GLUE layout: {GLUE_TASKS[name].folder}/train.tsv, ...)")
            if self.predict_test and folder is not None:
                for stem, file in GLUE_TASKS[name].test_files.items():
                    read_test_file(GLUE_TASKS[name], get_task(name), Path(folder) / file)
            validate(self.config(name, "finetune", output=str(self.output / name / "teacher")), "finetune")
        if self.general_student is not None and not Path(self.general_student).exists():
            raise FileNotFoundError(f"--general-student {self.general_student} does not exist")

    def config(self, name: str, stage: str, **fixed) -> TrainConfig:
        base = {"task": name, "data_dir": self.task_data_dir(name)}
        if stage == "finetune":
            base["model"] = self.teacher_base
        return stage_config(self.settings, self.flags, name, stage, **base, **fixed)

    def run_stage(self, name: str, stage: str, cfg: TrainConfig, export: Path) -> None:
        """Train one stage unless its export exists; resume from its checkpoints when there are any."""
        from .checkpoint import list_checkpoints
        from .runs import run_artifacts, run_training

        folder = Path(cfg.output)
        if (export / "config.json").is_file():
            self.say(name, stage, f"done earlier ({export})")
            return
        resume = bool(list_checkpoints(folder / "checkpoints"))
        cfg.overwrite_output = bool(run_artifacts(folder)) and not resume  # nothing resumable was kept
        self.say(name, stage, "resuming from its last checkpoint" if resume else "starting")
        started = time.time()
        run_training(cfg, "finetune" if stage == "teacher" else "distill", resume=resume)
        self.say(name, stage, f"trained in {time.time() - started:.0f} s")

    def run_task(self, name: str) -> dict:
        from .runs import run_evaluate

        task_dir = self.output / name
        result_file = task_dir / "result.json"
        if result_file.is_file():
            self.say(name, "task", "finished earlier; skipped")
            return json.loads(result_file.read_text())
        # 1. the teacher
        given = Path(self.teachers) / name / "model" if self.teachers else None
        if given is not None and (given / "config.json").is_file():
            teacher = given
            self.say(name, "teacher", f"reusing {teacher}")
        else:
            teacher = task_dir / "teacher" / "model"
            self.run_stage(name, "teacher", self.config(name, "finetune", output=str(task_dir / "teacher")), teacher)
        # 2. the student(s)
        students = []
        for seed_index in range(self.seeds):
            folder = task_dir / ("student" if self.seeds == 1 else f"student-seed{seed_index + 1}")
            cfg = self.config(name, "distill", teacher=str(teacher), output=str(folder),
                              student_init=self.general_student)
            if seed_index:
                cfg.seed += seed_index
            self.run_stage(name, "student" + (f" seed {seed_index + 1}" if self.seeds > 1 else ""), cfg,
                           folder / "student")
            students.append(folder / "student")
        # 3. dev metrics
        evaluate = {"task": name, "data_dir": self.task_data_dir(name), "assume_label_order": False}
        for key in ("max_length", "eval_batch_size", "device", "limit_eval", "cache_dir"):
            if key in self.flags:
                evaluate[key] = self.flags[key]
        teacher_metrics = run_evaluate(build_config(None, **evaluate, model=str(teacher)), "dev")
        student_metrics = [run_evaluate(build_config(None, **evaluate, model=str(s)), "dev") for s in students]
        glue_task = GLUE_TASKS[name]
        result = {
            "task": name, "teacher": str(teacher), "students": [str(s) for s in students],
            "variant": "LRC-BERT" if self.general_student else "LRC-BERT1",
            "teacher_metrics": teacher_metrics, "student_metrics": student_metrics,
            "teacher_score": task_score(glue_task, teacher_metrics),
            "student_scores": [task_score(glue_task, m) for m in student_metrics],
        }
        self.say(name, "evaluate", f"teacher {result['teacher_score']:.1f}, student "
                                   f"{statistics.fmean(result['student_scores']):.1f} (dev, GLUE points)")
        # 4. test predictions
        if self.predict_test:
            result["submission"] = self.predict(name, students[0])
        task_dir.mkdir(parents=True, exist_ok=True)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(result_file)
        return result

    def predict(self, name: str, student: Path) -> dict:
        from .runtime import resolve_device

        glue_task, task = GLUE_TASKS[name], get_task(name)
        device = resolve_device(self.flags.get("device", "auto"))
        folder = self.output / "glue_submission"
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for stem, file in glue_task.test_files.items():
            if self.data_dir is not None:
                indices, texts = read_test_file(glue_task, task, Path(self.task_data_dir(name)) / file)
            else:
                indices, texts = read_hub_test(glue_task, task, stem)
            predictions = predict_texts(student, task, texts, self.flags.get("max_length"), 64, device)
            lines = ["index\tprediction", *(f"{i}\t{submission_value(glue_task, task, p)}"
                                            for i, p in zip(indices, predictions))]
            (folder / f"{stem}.tsv").write_text("\n".join(lines) + "\n")
            written[stem] = len(indices)
            self.say(name, "predict", f"{stem}.tsv: {len(indices)} test rows")
        return written

    def run(self, tasks: list) -> int:
        self.check(tasks)
        self.output.mkdir(parents=True, exist_ok=True)
        results, failures = {}, {}
        for name in tasks:
            try:
                results[name] = self.run_task(name)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on (unless --fail-fast)
                failures[name] = f"{type(exc).__name__}: {exc}"
                self.say(name, "failed", failures[name])
                log.debug("task %s failed", name, exc_info=True)
                if self.fail_fast:
                    break
        self.write_results(results, failures)
        if self.predict_test and results:
            self.zip_submission()
        done = ", ".join(results) or "none"
        print(f"\nGLUE: {len(results)} of {len(tasks)} tasks done ({done})"
              + (f"; failed: {', '.join(failures)}" if failures else "")
              + f". Table: {self.output / 'results.md'}", flush=True)
        return 1 if failures else 0

    def zip_submission(self) -> None:
        folder = self.output / "glue_submission"
        with zipfile.ZipFile(self.output / "glue_submission.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.glob("*.tsv")):
                archive.write(file, file.name)

    # ------------------------------------------------------------------ the table

    def model_rows(self, results: dict) -> dict:
        """Parameters and CPU latency (batch 1 and 32, interleaved medians) of a teacher and a student."""
        if not results:
            return {}
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .latency import compare_latency, speedup

        first = next(iter(results.values()))
        models = {"teacher": AutoModelForSequenceClassification.from_pretrained(first["teacher"]),
                  "student": AutoModelForSequenceClassification.from_pretrained(first["students"][0])}
        tokenizer = AutoTokenizer.from_pretrained(first["students"][0])
        length = self.flags.get("max_length") or 128
        out = {name: {"parameters": sum(p.numel() for p in m.parameters())} for name, m in models.items()}
        for batch in (1, 32):
            times = compare_latency(models, tokenizer, batch, length, self.latency_repeats)
            for name in models:
                out[name][f"ms_batch{batch}"] = times[name]["median_ms"]
            out["student"][f"speedup_batch{batch}"] = speedup(times["teacher"], times["student"])
        out["length"] = length
        return out

    def write_results(self, results: dict, failures: dict) -> None:
        columns = [(t, title, key, split) for t in TASK_ORDER if t in results
                   for title, key, split in GLUE_TASKS[t].columns]
        teacher_scores = {t: r["teacher_score"] for t, r in results.items()}
        student_scores = {t: statistics.fmean(r["student_scores"]) for t, r in results.items()}
        rows = {"teacher": {}, "student": {}, "student_std": {}}
        for t, title, key, split in columns:
            r = results[t]
            rows["teacher"][title] = 100 * r["teacher_metrics"][f"{split}/{key}"]
            values = [100 * m[f"{split}/{key}"] for m in r["student_metrics"]]
            rows["student"][title] = statistics.fmean(values)
            rows["student_std"][title] = statistics.stdev(values) if len(values) > 1 else None
        summary = {"teacher": glue_score(teacher_scores), "student": glue_score(student_scores)}
        models = self.model_rows(results)
        payload = {"tasks": list(results), "failed": failures, "columns": [c[1] for c in columns], "rows": rows,
                   "task_scores": {"teacher": teacher_scores, "student": student_scores}, "glue_score": summary,
                   "retention": {t: 100 * student_scores[t] / teacher_scores[t] for t in results
                                 if teacher_scores[t]},
                   "models": models, "paper": PAPER,
                   "variant": "LRC-BERT" if self.general_student else "LRC-BERT1", "seeds": self.seeds}
        (self.output / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        (self.output / "results.md").write_text(render_table(payload))


def _fmt(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def render_table(payload: dict) -> str:
    columns = payload["columns"]
    rows, scores = payload["rows"], payload["glue_score"]
    models = payload.get("models") or {}
    student_name = f"student ({payload['variant']}" + (f", {payload['seeds']} seeds" if payload["seeds"] > 1 else "") + ")"
    head = ["model", *columns, "GLUE score", "parameters", "ms, batch 1", "ms, batch 32"]
    lines = ["# GLUE: teacher and student (dev sets)", "",
             "Scores in points (accuracy, F1, Matthews correlation or Pearson/Spearman, x 100). The GLUE score "
             "is the benchmark's: each task's metrics averaged (MNLI: matched and mismatched), then the tasks.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def model_cells(name):
        m = models.get(name, {})
        return [f"{m['parameters'] / 1e6:.1f}M" if m else "–", _fmt(m.get("ms_batch1")), _fmt(m.get("ms_batch32"))]

    lines.append("| teacher | " + " | ".join(_fmt(rows["teacher"][c]) for c in columns)
                 + f" | {_fmt(scores['teacher'])} | " + " | ".join(model_cells("teacher")) + " |")
    lines.append(f"| {student_name} | " + " | ".join(_fmt(rows["student"][c], rows["student_std"][c]) for c in columns)
                 + f" | {_fmt(scores['student'])} | " + " | ".join(model_cells("student")) + " |")
    per_column = []
    for c in columns:
        t, s = rows["teacher"][c], rows["student"][c]
        per_column.append(f"{100 * s / t:.1f}%" if t else "–")
    overall = (f"{100 * scores['student'] / scores['teacher']:.1f}%" if scores["teacher"] else "–")
    lines.append("| retention | " + " | ".join(per_column) + f" | {overall} | | | |")
    paper = payload["paper"]
    lines.append("| paper, LRC-BERT 4x312 vs BERT-base (GLUE test) | " + " | ".join("n/a" for _ in columns)
                 + f" | retention {paper['retention']}% | {paper['smaller']}x smaller | {paper['faster']}x faster | |")
    lines += ["", "The paper's per-task test scores (its Table 1) are not in this repository, so they are not "
              "printed; its summary claims are (retention of the teacher's GLUE average, size and speed "
              "ratios, against a BERT-base teacher on the GLUE test sets, not these dev sets)."]
    if models:
        s = models["student"]
        ratio = {b: (f"{s[f'speedup_batch{b}']:.1f}x" if s.get(f"speedup_batch{b}") else
                     "not measurable here: the timings' spread was too wide") for b in (1, 32)}
        lines += ["", f"Latency: CPU forward pass at sequence length {models['length']}, the two models timed "
                  f"interleaved, medians. Student speed-up: {ratio[1]} at batch 1, {ratio[32]} at batch 32; "
                  f"{models['teacher']['parameters'] / s['parameters']:.1f}x fewer parameters."]
    if payload["failed"]:
        lines += ["", "Failed tasks: " + "; ".join(f"{t}: {e}" for t, e in payload["failed"].items())]
    return "\n".join(lines) + "\n"


def run_glue(args, flags: dict) -> int:
    tasks = TASK_ORDER if args.tasks in (None, "all") else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"--tasks: {unknown} are not GLUE tasks; choose from all, {', '.join(TASK_ORDER)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    settings = load_glue_yaml(args.config)
    run = GlueRun(Path(args.output), settings, flags, args.teacher_base, args.data_dir, args.general_student,
                  args.teachers, args.predict_test, args.seeds, args.fail_fast, args.latency_repeats)
    return run.run(tasks)
