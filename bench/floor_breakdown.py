"""Where the CPU one pass spends its time over the single-read floor, part by part.

    python bench/floor_breakdown.py                        # COS-NCE, the paper's shape
    python bench/floor_breakdown.py --loss info_nce --runs 5

Every round times, back to back and each right after the floor's sum (so each starts cold, as
in training, where the previous step has evicted the caches):

* ``floor``: a large ``torch.sum`` over the inputs' bytes (bench_cos_nce.py's x floor);
* ``forward only``: the op under ``torch.no_grad()`` (the inputs read once, no gradient work);
* ``kernel``: the extension's reduced one pass alone, with the student's gradient (no Python
  validation, no autograd);
* ``op``: ``torch.autograd.grad(cos_nce_loss(...), student)``, what bench_cos_nce.py times.

Each part's x floor is the median over the rounds of its time over that round's floor, scaled
to the true minimum bytes as in bench_cos_nce.py. ``op`` minus ``kernel`` is the per-call cost
outside the kernel (Python, autograd); ``kernel`` minus ``forward only``, roughly, the gradient
work. ``--runs`` repeats the whole measurement in new rounds, since on a shared machine one run's
median moves by more than the margins measured; with more than one run, a last line gives each
column's median over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lrc_kernels as lk
from lrc_kernels.ops._build import extension_for

EXPLICIT = 1  # csrc/common/negative_mode.h


def measure(loss: str, batch: int, num_neg: int, dim: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, dim, generator=g).requires_grad_()
    teacher, negatives = torch.randn(batch, dim, generator=g), torch.randn(batch, num_neg, dim, generator=g)
    input_bytes = 4 * (2 * batch * dim + batch * num_neg * dim)
    floor_scale = (input_bytes + 4 * batch * dim) / input_bytes  # to the true minimum: + grad(student)
    floor_buffer = torch.rand(input_bytes // 4)
    fn = lk.cos_nce_loss if loss == "cos_nce" else lk.info_nce_loss
    extension = extension_for(student.device)

    def forward_only():
        with torch.no_grad():
            fn(student, teacher, negatives, backend="cpp")

    def kernel():
        extension.one_pass_reduced(student.detach(), teacher, negatives, None, EXPLICIT, loss == "info_nce",
                                   1e-8, 0.1, True, True)

    def op():
        torch.autograd.grad(fn(student, teacher, negatives, backend="cpp"), student)

    parts = {"forward only": forward_only, "kernel": kernel, "op": op}
    for call in parts.values():  # builds, caches, first-touch faults
        call()
    ratios = {name: [] for name in parts}
    times = {name: [] for name in ("floor", *parts)}
    for _ in range(rounds):
        for name, call in parts.items():
            start = time.perf_counter()
            floor_buffer.sum()
            middle = time.perf_counter()
            call()
            end = time.perf_counter()
            times["floor"].append(middle - start)
            times[name].append(end - middle)
            ratios[name].append((end - middle) / ((middle - start) * floor_scale))
    result = {f"{name} ms": 1e3 * statistics.median(values) for name, values in times.items()}
    result.update({f"{name} x floor": statistics.median(values) for name, values in ratios.items()})
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=("cos_nce", "info_nce"), default="cos_nce")
    parser.add_argument("--shape", default="16,15,98304", help="B,K,D (default: the paper's shape)")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per run")
    parser.add_argument("--runs", type=int, default=1, help="independent runs, each its own medians")
    args = parser.parse_args(argv)
    try:
        batch, num_neg, dim = (int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be B,K,D, got {args.shape!r}")
    if min(batch, num_neg, dim) < 1 or args.rounds < 1 or args.runs < 1:
        parser.error("B, K, D, --rounds and --runs must all be >= 1")
    print(f"{args.loss}, B={batch} K={num_neg} D={dim}, fp32, {torch.get_num_threads()} threads; "
          f"medians of {args.rounds} interleaved rounds per run")
    header = ["floor ms", "forward only x floor", "kernel x floor", "op x floor", "op - kernel ms"]
    print("run | " + " | ".join(header))
    runs = []
    for run in range(args.runs):
        r = measure(args.loss, batch, num_neg, dim, args.rounds)
        runs.append([r["floor ms"], r["forward only x floor"], r["kernel x floor"], r["op x floor"],
                     r["op ms"] - r["kernel ms"]])
        print(f"{run + 1} | " + " | ".join(f"{v:.3f}" for v in runs[-1]), flush=True)
    if len(runs) > 1:  # each column's median over the runs: one run samples one phase of a shared machine
        print("median | " + " | ".join(f"{statistics.median(col):.3f}" for col in zip(*runs)))


if __name__ == "__main__":
    main()
