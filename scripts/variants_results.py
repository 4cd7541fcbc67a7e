"""LRC-BERT against LRC-BERT₁ on SNLI, full and small data (docs/results.md, "The two variants").

    python scripts/variants_results.py                   # the full protocol (a GPU: hours)
    python scripts/variants_results.py --budget cpu      # the 2-core CPU budget of docs/results.md
    python scripts/variants_results.py --budget smoke    # the pipeline end to end in a few minutes

Protocol:
1. the general corpus: the unique sentences of SNLI train, labels dropped (an in-domain stand-in
   for the paper's Wikipedia), one document per line;
2. the teacher: MiniLM-L6 fine-tuned on SNLI train (dev picks the checkpoint);
3. general distillation (``lrc-bert general-distill``) of a 4 x 312 student from MiniLM-L6 as it
   is, the general encoder, on that corpus; one general student, shared by every seed;
4. task distillation for each seed, at the same budget: LRC-BERT (``--student-init`` the general
   student, its projections included) and LRC-BERT₁ (a random init), on all of SNLI train and on
   its first 2,500 pairs (the size of RTE); the same dev and test sets.

Every model is scored on SNLI test. One JSON per run under OUTPUT, then OUTPUT/table.md and
OUTPUT/dev_curve.png. Independent runs go ``--jobs`` at a time, each its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from lrc_bert.config import build_config
from lrc_bert.demo import default_teacher_model
from lrc_bert.general import VALIDATION_KEY, run_general_distill
from lrc_bert.runs import run_evaluate, run_training
from lrc_bert.tasks import get_task, tsv_rows
from snli_results import device_name

VARIANTS = ("LRC-BERT", "LRC-BERT₁")
DATA = {"full": None, "small": 2500}  # training pairs (None: all of SNLI train)

BUDGETS = {
    # The paper-like protocol: 3 epochs everywhere, L = 128.
    "full": dict(teacher=dict(epochs=3.0, batch_size=32, learning_rate=5e-5),
                 general=dict(epochs=3.0, batch_size=256, learning_rate=3e-4, max_length=128, eval_steps=2000),
                 student=dict(epochs=3.0, batch_size=32, learning_rate=3e-4, eval_steps=2000),
                 small_student=dict(epochs=20.0, batch_size=32, learning_rate=3e-4, eval_steps=200),
                 limit_eval=None, seeds=3, jobs_threads=None),
    # Two CPU cores: every stage short, one thread per process, two processes at a time.
    "cpu": dict(teacher=dict(max_steps=400, batch_size=32, learning_rate=1e-4, eval_steps=100),
                general=dict(max_steps=600, batch_size=32, learning_rate=3e-4, max_length=64, eval_steps=150),
                student=dict(max_steps=300, batch_size=16, learning_rate=3e-4, eval_steps=75),
                small_student=dict(max_steps=300, batch_size=16, learning_rate=3e-4, eval_steps=75),
                limit_eval=None, seeds=3, jobs_threads=1),
    # The script end to end; the numbers mean nothing.
    "smoke": dict(teacher=dict(max_steps=6, batch_size=8, learning_rate=5e-5, eval_steps=3),
                  general=dict(max_steps=6, batch_size=8, learning_rate=3e-4, max_length=32, eval_steps=3),
                  student=dict(max_steps=6, batch_size=8, learning_rate=3e-4, eval_steps=3),
                  small_student=dict(max_steps=6, batch_size=8, learning_rate=3e-4, eval_steps=3),
                  limit_eval=64, seeds=2, jobs_threads=1),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "snli"))
    parser.add_argument("--output", default=str(ROOT / "runs" / "variants_results"))
    parser.add_argument("--teacher-model", default=None, help="pretrained encoder (default: the installed MiniLM-L6)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--jobs", type=int, default=1, help="independent runs at once (each its own process)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from OUTPUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    args.teacher_model = args.teacher_model or default_teacher_model()
    if args.run:
        _one_run(args, args.run)
        return 0
    if not args.report_only:
        # run -> the runs it needs: LRC-BERT₁ starts once the teacher is done, LRC-BERT also
        # needs the general student (which uses the encoder as it is, so it runs beside the teacher).
        needs = {"teacher": (), "general": ()}
        for data in DATA:
            for variant in VARIANTS:
                for seed in range(BUDGETS[args.budget]["seeds"]):
                    needs[f"{variant}::{data}::{seed}"] = ("teacher", "general") if variant == "LRC-BERT" else ("teacher",)
        _schedule(needs, args)
    report(out)
    return 0


def _result(out: Path, run: str) -> Path:
    """The JSON a finished run leaves."""
    if run in ("teacher", "general"):
        return out / f"{run}.json"
    variant, data, seed = run.split("::")
    return out / f"{_name(variant, data, int(seed))}.json"


def _name(variant: str, data: str, seed: int) -> str:
    return f"{'lrc-bert' if variant == 'LRC-BERT' else 'lrc-bert-1'}-{data}-seed{seed}"


def _common(args, budget: dict, stage: dict) -> dict:
    return dict(task="snli", data_dir=args.data_dir, group_by_length=True, eval_batch_size=256,
                limit_eval=budget["limit_eval"], save_steps=10**9, logging_steps=25, tensorboard=False,
                overwrite_output=True, **stage)


def _one_run(args, run: str) -> None:
    budget = BUDGETS[args.budget]
    out = Path(args.output)
    start = time.time()
    if run == "teacher":
        cfg = build_config(None, **_common(args, budget, budget["teacher"]), model=args.teacher_model,
                           output=str(out / "teacher"))
        cfg.max_length = None  # dynamic padding (build_config reads None as "not given")
        run_training(cfg, "finetune")
        _record(out / "teacher.json", "teacher (MiniLM-L6)", 0, out / "teacher" / "model", args.data_dir,
                time.time() - start, out / "teacher")
        return
    if run == "general":
        stage = dict(budget["general"])
        cfg = build_config(None, teacher=args.teacher_model, corpus=[str(general_corpus(args.data_dir, out))],
                           output=str(out / "general"), save_steps=10**9, logging_steps=25, tensorboard=False,
                           overwrite_output=True, validation_fraction=0.01, seed=0, **stage)
        final = run_general_distill(cfg)
        curve = [(r["step"], r[VALIDATION_KEY]) for r in _metrics(out / "general") if r["type"] == "eval"]
        (out / "general.json").write_text(json.dumps({
            "name": "general distillation", "train_seconds": time.time() - start, "device": device_name(),
            "validation_loss": final.get(VALIDATION_KEY), "validation_curve": curve,
            "settings": {k: cfg.to_dict()[k] for k in ("max_steps", "epochs", "batch_size", "learning_rate",
                                                       "max_length", "num_negatives", "representation")}}) + "\n")
        return
    variant, data, seed = run.split("::")
    seed = int(seed)
    stage = budget["student" if data == "full" else "small_student"]
    run_dir = out / _name(variant, data, seed)
    init = dict(student_init=str(out / "general" / "student")) if variant == "LRC-BERT" else {}
    cfg = build_config(None, **_common(args, budget, stage), teacher=str(out / "teacher" / "model"),
                       output=str(run_dir), seed=seed, limit_train=DATA[data], **init)
    cfg.max_length = None
    run_training(cfg, "distill")
    _record(out / f"{run_dir.name}.json", variant, seed, run_dir / "student", args.data_dir, time.time() - start,
            run_dir)
    record = json.loads((out / f"{run_dir.name}.json").read_text())
    (out / f"{run_dir.name}.json").write_text(json.dumps({**record, "data": data}) + "\n")


def general_corpus(data_dir: str, out: Path) -> Path:
    """The unique premises and hypotheses of SNLI train, in first-seen order, one per line."""
    path = out / "corpus" / "snli_train_sentences.txt"
    if path.is_file():
        return path
    task = get_task("snli")
    seen: dict[str, None] = {}
    rows = tsv_rows(Path(data_dir) / "train.tsv")
    _, header = next(rows)
    columns = [header.index(name) for name in task.tsv_text]
    for _, row in rows:
        for column in columns:
            seen.setdefault(" ".join(row[column].split()), None)
    seen.pop("", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(seen) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _record(path: Path, name: str, seed: int, model_dir: Path, data_dir: str, seconds: float, run_dir: Path):
    """Test accuracy (dynamic padding), the dev curve and the training time of one run."""
    cfg = build_config(None, task="snli", model=str(model_dir), data_dir=data_dir, eval_batch_size=128)
    cfg.max_length = None
    metrics = run_evaluate(cfg, "test")
    curve = [(r["step"], r["dev/accuracy"]) for r in _metrics(run_dir) if r["type"] == "eval"]
    path.write_text(json.dumps({"name": name, "seed": seed, "test_accuracy": metrics["test/accuracy"],
                                "train_seconds": seconds, "device": device_name(), "dev_curve": curve}) + "\n")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _schedule(needs: dict, args) -> None:
    """Each run in its own process, ``--jobs`` at a time, once the runs it needs are done. A run
    already done (its JSON exists) is skipped; a failed run is reported, and the runs that need
    it are skipped, not started."""
    out = Path(args.output)
    threads = BUDGETS[args.budget]["jobs_threads"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads and args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    pending = [run for run in needs if not _result(out, run).is_file()]
    active, failed = [], set()
    while pending or active:
        for run in [r for r in pending if failed & set(needs[r])]:
            pending.remove(run)
            failed.add(run)
            print(f"{run}: skipped (needs {', '.join(sorted(failed & set(needs[run])))}, which failed)", flush=True)
        ready = [r for r in pending if all(_result(out, d).is_file() for d in needs[r])]
        while ready and len(active) < max(1, args.jobs):
            run = ready.pop(0)
            pending.remove(run)
            log = open(out / f"{run.replace('::', '-')}.log", "w")
            cmd = [sys.executable, __file__, "--budget", args.budget, "--output", args.output, "--data-dir",
                   args.data_dir, "--teacher-model", args.teacher_model, "--run", run]
            active.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        if not active and pending and not ready:
            raise SystemExit(f"cannot start {pending}: what they need is neither done nor running")
        time.sleep(2)
        for item in list(active):
            run, proc, log = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                if proc.returncode == 0 and _result(out, run).is_file():
                    print(f"{run}: done", flush=True)
                else:
                    failed.add(run)
                    print(f"{run}: FAILED ({proc.returncode}; see {log.name})", flush=True)


def report(out: Path) -> None:
    teacher_path, general_path = out / "teacher.json", out / "general.json"
    if not teacher_path.is_file():
        return
    teacher = json.loads(teacher_path.read_text())
    general = json.loads(general_path.read_text()) if general_path.is_file() else None
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("lrc-bert-*.json"))]
    lines = ["| training data | model | SNLI test accuracy (mean ± std) | seeds | retention of the teacher | "
             "train min per run | device |", "|---|---|---|---|---|---|---|",
             f"| all 95k pairs | teacher: MiniLM-L6 fine-tuned | {100 * teacher['test_accuracy']:.2f} | 1 | 100% | "
             f"{teacher['train_seconds'] / 60:.1f} | {teacher['device']} |"]
    means = {}
    for data in DATA:
        for variant in VARIANTS:
            mine = [r for r in runs if r["name"] == variant and r.get("data") == data]
            if not mine:
                continue
            accs = [100 * r["test_accuracy"] for r in mine]
            mean = means[data, variant] = statistics.mean(accs)
            std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "n/a (1 seed)"
            label = "all 95k pairs" if DATA[data] is None else f"first {DATA[data]:,} pairs"
            lines.append(f"| {label} | student: {variant} | {mean:.2f} ± {std} | {len(accs)} | "
                         f"{mean / (100 * teacher['test_accuracy']):.1%} | "
                         f"{statistics.mean(r['train_seconds'] for r in mine) / 60:.1f} | {mine[0]['device']} |")
    if general:
        lines.append(f"\nGeneral distillation (shared by every LRC-BERT run): {general['train_seconds'] / 60:.1f} min "
                     f"on {general['device']}; held-out COS-NCE loss {general['validation_loss']:.4f}.")
    for data in DATA:
        if (data, "LRC-BERT") in means and (data, "LRC-BERT₁") in means:
            lines.append(f"LRC-BERT − LRC-BERT₁, {data} data: "
                         f"{means[data, 'LRC-BERT'] - means[data, 'LRC-BERT₁']:+.2f} points.")
    per_seed = [f"{r['name']} {r['data']} seed {r['seed']}: {100 * r['test_accuracy']:.2f}" for r in runs]
    (out / "table.md").write_text("\n".join(lines) + "\n\nPer seed: " + "; ".join(per_seed) + "\n")
    _plot(runs, out / "dev_curve.png")
    print("\n".join(lines))


def _plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(DATA), figsize=(11, 4), sharey=True)
    colors = {"LRC-BERT": "tab:blue", "LRC-BERT₁": "tab:orange"}
    for ax, data in zip(axes, DATA):
        for variant in VARIANTS:
            for i, r in enumerate(r for r in runs if r["name"] == variant and r.get("data") == data):
                steps, accs = zip(*r["dev_curve"]) if r["dev_curve"] else ((), ())
                ax.plot(steps, [100 * a for a in accs], "o-", color=colors[variant], alpha=0.8, markersize=3,
                        label=variant if i == 0 else None)
        ax.set_title("all of SNLI train" if DATA[data] is None else f"first {DATA[data]:,} training pairs")
        ax.set_xlabel("task-distillation step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("SNLI dev accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
