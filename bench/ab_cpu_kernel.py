"""Interleaved A/B of versions of the CPU kernel source (csrc/cpu/cos_nce_cpu.cpp).

    git show HEAD~3:csrc/cpu/cos_nce_cpu.cpp > /tmp/old.cpp
    python bench/ab_cpu_kernel.py /tmp/old.cpp csrc/cpu/cos_nce_cpu.cpp              # paper shape
    python bench/ab_cpu_kernel.py /tmp/old.cpp csrc/cpu/cos_nce_cpu.cpp --bank 50000 --shape 64,64,768

Each source is built as its own extension; every round then times, back to back, a large
``torch.sum`` over the inputs' bytes (the single-read floor) and the one-pass kernel of each
version (forward with the student's gradient, as in training; ``--no-grad``: the forward
alone, as in inference). Medians of the rounds, and
of each version's ratio to the floor of its own round: on a shared machine the drift between
separate runs is larger than the differences being measured. Also reports whether the
versions give the same bits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

COMMON = Path(__file__).resolve().parents[1] / "csrc" / "common"
EXPLICIT, BANK = 1, 2  # csrc/common/negative_mode.h


def build(source: Path, name: str, build_root: Path):
    """The extension of one source file; its ``#include "../common/..."`` resolves to this checkout."""
    folder = build_root / name
    (folder / "src").mkdir(parents=True, exist_ok=True)
    copy = folder / "src" / "cos_nce_cpu.cpp"
    copy.write_text(source.read_text().replace('"../common/', f'"{COMMON}/'))
    return load(name=f"lrc_ab_{name}", sources=[str(copy)], build_directory=str(folder),
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="kernel sources to compare (the first is the baseline)")
    parser.add_argument("--shape", default="16,15,98304", help="B,K,D (default: the paper's shape)")
    parser.add_argument("--bank", type=int, default=0, help="N: negatives gathered by index from a bank of N rows")
    parser.add_argument("--loss", choices=("cos_nce", "info_nce"), default="cos_nce")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--no-grad", action="store_true", help="the forward alone (inference: no gradient work)")
    parser.add_argument("--fixed-index", action="store_true",
                        help="with --bank: the same index every call (its rows stay in the LLC); by default "
                             "each call draws new negatives, as a training step does")
    args = parser.parse_args()
    missing = [str(s) for s in args.sources if not s.is_file()]
    if missing:
        parser.error(f"no such kernel source: {', '.join(missing)}")
    try:
        batch, num_neg, dim = (int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be B,K,D, got {args.shape!r}")

    with tempfile.TemporaryDirectory() as root:
        versions = {f"v{i}:{s.name}": build(s, f"v{i}", Path(root)) for i, s in enumerate(args.sources)}
        g = torch.Generator().manual_seed(0)
        student, teacher = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
        if args.bank:
            negatives = torch.randn(args.bank, dim, generator=g)
            indices = [torch.randint(0, args.bank, (batch, num_neg), generator=g)
                       for _ in range(1 if args.fixed_index else 64)]
            index, mode = indices[0], BANK
        else:
            negatives = torch.randn(batch, num_neg, dim, generator=g)
            indices, mode = [torch.empty(0, dtype=torch.int64)], EXPLICIT
            index = indices[0]
        input_bytes = 4 * (2 * batch * dim + batch * num_neg * dim)
        floor_buffer = torch.rand(input_bytes // 4)
        calls = {"floor (torch.sum)": floor_buffer.sum}
        arguments = [student, teacher, negatives, index, mode, args.loss == "info_nce", 1e-8, 0.1, not args.no_grad]
        step = iter(range(1 << 62))

        def next_arguments():  # a new index every call: one version's rows must not be another's cache
            arguments[3] = indices[next(step) % len(indices)]
            return arguments

        outputs = []
        for name, ext in versions.items():
            try:  # sources before the row-gradient argument take one argument fewer
                outputs.append(ext.one_pass(*arguments, 1.0))
                calls[name] = (lambda ext=ext: ext.one_pass(*next_arguments(), 1.0))
            except TypeError:
                outputs.append(ext.one_pass(*arguments))
                calls[name] = (lambda ext=ext: ext.one_pass(*next_arguments()))
        for name, out in zip(list(versions)[1:], outputs[1:]):
            same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(out, outputs[0]))
            print(f"{name}: {'the same bits as' if same else 'different bits from'} {next(iter(versions))}")
        times = {name: [] for name in calls}
        ratios = {name: [] for name in versions}
        for _ in range(2):
            for call in calls.values():
                call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            for name in versions:
                ratios[name].append(times[name][-1] / times["floor (torch.sum)"][-1])
        print(f"{args.loss}, B={batch} K={num_neg} D={dim}" + (f", bank N={args.bank}" if args.bank else "")
              + (", forward only" if args.no_grad else "")
              + ((", the same index every call" if args.fixed_index else ", a new index every call") if args.bank else "")
              + f"; medians of {args.rounds} interleaved rounds")
        for name in calls:
            line = f"  {name:32} {1e3 * statistics.median(times[name]):8.3f} ms"
            if name in ratios:
                line += f"   x sum {statistics.median(ratios[name]):.2f}"
            print(line)


if __name__ == "__main__":
    main()
