"""``python -m lrc_kernels``: a small tour of the op on this machine.

Computes COS-NCE and InfoNCE in the three negative modes with every available backend,
checks each against the float64 reference, and times forward + backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _inputs(mode, batch, num_neg, features, device, generator):
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_()

    student, teacher = rand(batch, *features), rand(batch, *features)
    if mode == "in-batch":
        return student, teacher, None, None
    if mode == "explicit":
        return student, teacher, rand(batch, num_neg, *features), None
    bank_rows = 4 * batch
    index = torch.randint(0, bank_rows, (batch, num_neg), generator=generator).to(device)
    return student, teacher, rand(bank_rows, *features), index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lrc_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="B, rows per batch (default 16)")
    parser.add_argument("--negatives", type=int, default=15, help="K for explicit/indexed modes (default 15)")
    parser.add_argument("--seq", type=int, default=16, help="L, tokens per row (default 16)")
    parser.add_argument("--width", type=int, default=96, help="d, features per token (default 96)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpreter", action="store_true",
                        help="on CPU, also run the Triton kernels under TRITON_INTERPRET=1 (slow: a check, not a speed)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.interpreter:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import lrc_kernels as lk

    device = torch.device(args.device)
    backends = lk.available_backends(device.type)
    if device.type == "cpu" and not args.interpreter:
        backends = [b for b in backends if b != "triton"]
    features = (args.seq, args.width)
    print(f"lrc_kernels {lk.__version__} | torch {torch.__version__} | device {device} | backends {backends}")
    print(f"student/teacher [B={args.batch}, L={args.seq}, d={args.width}] -> D={args.seq * args.width}, "
          f"K={args.negatives} (in-batch: K=B-1)")
    if device.type == "cpu" and "triton" in backends:
        print("note: on CPU, triton runs under the interpreter (a correctness check, not a speed figure)")
    elif device.type == "cpu":
        print("note: Triton needs a GPU; add --interpreter to check its kernels on CPU with small shapes")
    header = f"{'loss':9} {'mode':9} {'backend':8} {'loss value':>11} {'max rel err vs fp64':>20} {'fwd+bwd ms':>11}"
    print(header + "\n" + "-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for loss_name, fn in (("cos_nce", lk.cos_nce_loss), ("info_nce", lk.info_nce_loss)):
        for mode in ("in-batch", "explicit", "indexed"):
            inputs = _inputs(mode, args.batch, args.negatives, features, device, gen)
            ref_inputs = [x.detach().double().requires_grad_() if x is not None and x.is_floating_point() else x
                          for x in inputs]
            ref = fn(*ref_inputs, backend="torch")
            ref.backward()
            for backend in backends:
                times = []
                for _ in range(args.repeats + 1):
                    for x in inputs:
                        if x is not None and x.is_floating_point():
                            x.grad = None
                    start = time.perf_counter()
                    value = fn(*inputs, backend=backend)
                    value.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                errors = [abs(value.item() - ref.item()) / abs(ref.item())]
                errors += [((x.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
                           for x, r in zip(inputs, ref_inputs) if x is not None and x.is_floating_point()]
                print(f"{loss_name:9} {mode:9} {backend:8} {value.item():11.6f} {max(errors):20.2e} "
                      f"{1e3 * statistics.median(times[1:]):11.2f}")
    print("\nUse it in a trainer:  loss = lrc_kernels.cos_nce_loss(projection(student_hidden), teacher_hidden)")


if __name__ == "__main__":
    main()
