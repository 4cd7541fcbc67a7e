"""Where one training step's time goes (the paper configuration): a torch.profiler table of
the fused bf16 + cache step, and the step time with pieces switched off.

    python bench/profile_distill_step.py [--size paper|small|smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import bench_distill as bd
import common


def step_ms(trainer, device, steps=20) -> float:
    it = trainer.batches(0)
    for _ in range(3):
        trainer.optimizer_step(*next(it))
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.optimizer_step(*next(it))
    common.synchronize(device)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    from transformers import BertForSequenceClassification

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    teacher_cfg, _ = bd.bert_configs(args.size)
    teacher = BertForSequenceClassification(teacher_cfg).to(device).eval()
    _, _, vocab, batch, seq = bd.SIZES[args.size]
    train_set = bd.synthetic_train_set(512, vocab, seq)
    with tempfile.TemporaryDirectory() as tmp:
        cache = bd.write_cache(args.size, teacher, device, train_set, Path(tmp) / "cache", "bf16")
        variants = {"fused bf16 + cache": {}, "  without perturbation": {"perturb_eps": 0.0},
                    "  stage 1 (COS-NCE only)": {"stage1_fraction": 1.0}}
        for name, overrides in variants.items():
            trainer = bd.make_trainer(args.size, teacher, device, "bf16", "auto", cache, False, train_set, **overrides)
            print(f"{name}: {step_ms(trainer, device):.1f} ms/step", flush=True)
        trainer = bd.make_trainer(args.size, teacher, device, "bf16", "auto", cache, False, train_set)
        it = trainer.batches(0)
        for _ in range(3):
            trainer.optimizer_step(*next(it))
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                trainer.optimizer_step(*next(it))
            common.synchronize(device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        print(table)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
