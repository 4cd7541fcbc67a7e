"""SNLI results and ablations for docs/results.md (issue: real results against the paper).

    python scripts/snli_results.py                       # the full protocol (needs a GPU to finish in hours)
    python scripts/snli_results.py --budget gpu --jobs 18  # the one-GPU budget of docs/results.md
    python scripts/snli_results.py --budget reduced      # the reduced CPU budget

Protocol: fine-tune a MiniLM-L6 teacher on SNLI train (dev for model selection), then
distill a 4-layer, 312-wide student with LRC-BERT and with each ablation, at the same
budget, for each seed; evaluate every model on SNLI test. Writes one JSON per run under
OUTPUT, then OUTPUT/table.md and the dev-accuracy plot OUTPUT/dev_curve.png from all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from lrc_bert.runs import run_evaluate, run_training
from lrc_bert.config import build_config
from lrc_bert.demo import default_teacher_model

# Each ablation is a set of config overrides on top of the LRC-BERT defaults.
VARIANTS = {
    "LRC-BERT": {},
    "KD only (soft + hard)": {"stages": [{"fraction": 1.0, "weights": {"soft": 1.0, "hard": 3.0}}], "perturb_eps": 0.0},
    "TinyBERT-style hidden MSE instead of COS-NCE": {
        "stages": [{"fraction": 0.8, "weights": {"hidden_mse": 1.0}},
                   {"fraction": 0.2, "weights": {"hidden_mse": 1.0, "soft": 1.0, "hard": 3.0}}]},
    "LRC-BERT without COS-NCE": {"stages": [{"fraction": 1.0, "weights": {"soft": 1.0, "hard": 3.0}}]},
    "LRC-BERT without the two stages": {"stages": [{"fraction": 1.0,
                                                    "weights": {"cos_nce": 1.0, "soft": 1.0, "hard": 3.0}}]},
    "LRC-BERT without gradient perturbation": {"perturb_eps": 0.0},
}

BUDGETS = {
    "full": dict(teacher_steps=None, teacher_epochs=3, student_epochs=3, limit_train=None, limit_eval=None, seeds=3,
                 max_length=128, eval_steps=2000),
    # What fits one ~10-minute call on one H100: every run in parallel, bf16, dynamic padding.
    "gpu": dict(teacher_steps=None, teacher_epochs=1, teacher_batch=128, teacher_lr=1e-4, student_steps=1000,
                student_batch=64, student_lr=3e-4, limit_train=None, limit_eval=None, seeds=3, max_length=None,
                eval_steps=250, precision="bf16"),
    # Checks the script end to end in a minute (tiny data and steps); numbers mean nothing.
    "smoke": dict(teacher_steps=4, teacher_epochs=None, student_steps=4, limit_train=64, limit_eval=32, seeds=2,
                  max_length=32, eval_steps=2),
    "reduced": dict(teacher_steps=300, teacher_epochs=None, student_epochs=None, student_steps=300, limit_train=9600,
                    limit_eval=1000, seeds=1, max_length=64, eval_steps=50),
}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "CPU")
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "snli"))
    parser.add_argument("--output", default=str(ROOT / "runs" / "snli_results"))
    parser.add_argument("--teacher-model", default=None, help="pretrained teacher (default: the installed MiniLM-L6)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--reduced", action="store_true", help="same as --budget reduced")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant names")
    parser.add_argument("--jobs", type=int, default=1, help="student runs at once (each its own process)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # "variant::seed": one run (for --jobs)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from OUTPUT")
    args = parser.parse_args(argv)
    budget_name = "reduced" if args.reduced else args.budget
    budget = BUDGETS[budget_name]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(task="snli", data_dir=args.data_dir, max_length=budget["max_length"], eval_batch_size=256,
                  limit_train=budget["limit_train"], limit_eval=budget["limit_eval"], eval_steps=budget["eval_steps"],
                  save_steps=10**9, logging_steps=50, tensorboard=False, precision=budget.get("precision", "fp32"))
    teacher_dir = out / "teacher"
    if args.run:
        name, seed = args.run.split("::")
        _student_run(out, teacher_dir, name, int(seed), budget, common, args.data_dir)
        return 0
    if not args.report_only:
        if not (teacher_dir / "model").is_dir():
            start = time.time()
            run_training(build_config(None, **common, model=args.teacher_model or default_teacher_model(),
                                      output=str(teacher_dir), batch_size=budget.get("teacher_batch", 32),
                                      learning_rate=budget.get("teacher_lr", 5e-5),
                                      max_steps=budget.get("teacher_steps"),
                                      epochs=budget.get("teacher_epochs") or 3.0), "finetune")
            _record(out / "teacher.json", "teacher (MiniLM-L6)", 0, teacher_dir / "model", common, args.data_dir,
                    time.time() - start, teacher_dir)
        runs = [(name, seed) for name in args.variants.split(",") for seed in range(budget["seeds"])
                if not (out / f"{_slug(name)}-seed{seed}.json").is_file()]
        if args.jobs <= 1:
            for name, seed in runs:
                _student_run(out, teacher_dir, name, seed, budget, common, args.data_dir)
        else:
            _parallel(runs, args, budget_name)
    report(out, budget, budget_name)
    return 0


def _student_run(out, teacher_dir, name, seed, budget, common, data_dir):
    run_dir = out / f"{_slug(name)}-seed{seed}"
    start = time.time()
    run_training(build_config(None, **common, **VARIANTS[name], teacher=str(teacher_dir / "model"),
                              output=str(run_dir), seed=seed, batch_size=budget.get("student_batch", 16),
                              learning_rate=budget.get("student_lr", 1e-4), max_steps=budget.get("student_steps"),
                              epochs=budget.get("student_epochs") or 3.0), "distill")
    _record(out / f"{_slug(name)}-seed{seed}.json", name, seed, run_dir / "student", common, data_dir,
            time.time() - start, run_dir)


def _parallel(runs, args, budget_name) -> None:
    """Each run in its own process, ``--jobs`` at a time; a failed run is reported, not fatal."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < args.jobs:
            name, seed = pending.pop(0)
            log = open(Path(args.output) / f"{_slug(name)}-seed{seed}.log", "w")
            cmd = [sys.executable, __file__, "--budget", budget_name, "--output", args.output, "--data-dir",
                   args.data_dir, "--run", f"{name}::{seed}"]
            active.append(((name, seed), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in list(active):
            (name, seed), proc, log = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                print(f"{name} seed {seed}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}",
                      flush=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _record(path, name, seed, model_dir, common, data_dir, seconds, run_dir):
    metrics = run_evaluate(build_config(None, task="snli", model=str(model_dir), data_dir=data_dir,
                                        max_length=common["max_length"], eval_batch_size=128), "test")
    curve = [(r["step"], r["dev/accuracy"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval"]
    path.write_text(json.dumps({"name": name, "seed": seed, "test_accuracy": metrics["test/accuracy"],
                                "train_seconds": seconds, "device": device_name(), "dev_curve": curve}) + "\n")


def report(out: Path, budget: dict, budget_name: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    teacher = next((r for r in runs if r["name"].startswith("teacher")), None)
    if teacher is None:
        return
    rows = []
    for name in VARIANTS:
        mine = [r for r in runs if r["name"] == name]
        if not mine:
            continue
        accs = [100 * r["test_accuracy"] for r in mine]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        rows.append((name, mean, std, len(accs), 100 * mean / (100 * teacher["test_accuracy"]),
                     statistics.mean(r["train_seconds"] for r in mine) / 60, mine[0]["device"]))
    lines = ["| model | SNLI test accuracy (mean ± std) | seeds | retention of the teacher | train min per run | device |",
             "|---|---|---|---|---|---|",
             f"| teacher: MiniLM-L6 fine-tuned | {100 * teacher['test_accuracy']:.2f} | 1 | 100% | "
             f"{teacher['train_seconds'] / 60:.1f} | {teacher['device']} |"]
    for name, mean, std, n, ret, minutes, device in rows:
        std_text = "n/a (1 seed)" if n == 1 else f"{std:.2f}"
        lines.append(f"| student: {name} | {mean:.2f} ± {std_text} | {n} | {ret:.1f}% | {minutes:.1f} | {device} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out / "dev_curve.png")  # docs/results_dev_curve.png is a copy of the run it reports
    print("\n".join(lines))


def _plot(runs, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("LRC-BERT", "KD only (soft + hard)"):
        for r in (r for r in runs if r["name"] == name):
            steps, accs = zip(*r["dev_curve"]) if r["dev_curve"] else ((), ())
            ax.plot(steps, [100 * a for a in accs], "o-", label=f"{name} (seed {r['seed']})")
    ax.set_xlabel("training step")
    ax.set_ylabel("SNLI dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
