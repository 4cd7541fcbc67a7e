"""Backend "cpp": the fused CPU kernels of ``csrc/cpu/cos_nce_cpu.cpp``.

Built just-in-time on first use with ``-O3 -march=native -fopenmp`` and cached on disk by
content and by this CPU's instruction set (``_build.py``). Importing ``lrc_kernels`` never
compiles. ``backend="auto"`` falls back to the torch backend, with one warning, if the build
fails; ``backend="cpp"`` raises.

The ops, the autograd and the math are shared with the CUDA backend: see ``native.py``.
"""

from __future__ import annotations

import torch

from .._validation import ContrastiveProblem
from . import _build, native

compiler_present = _build.cpu_compiler_present


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    _build.cpu_extension()


def _check_cpu(problem: ContrastiveProblem) -> None:
    if problem.device.type != "cpu":
        raise RuntimeError(f"backend='cpp' runs on CPU tensors, got {problem.device}")


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the C++ kernels."""
    _check_cpu(problem)
    return native.row_losses(problem)


def reduced_loss(problem: ContrastiveProblem) -> torch.Tensor | None:
    """The mean or sum in one kernel call where the CPU one pass applies (eager), else None."""
    _check_cpu(problem)
    return native.reduced_loss(problem)


def eager_reduced_loss(loss, student, teacher, negatives, neg_index, reduction, eps, temperature):
    """The eager fast path of ``functional``'s losses on CPU (never called while compiling), or
    None to take the usual path.

    A mean or a sum of plain tensors, with float options, goes straight to the extension, which
    checks what the one pass needs (``eager_reduced_loss`` in csrc/cpu/cos_nce_cpu.cpp) and
    declines whatever fails; the usual path then raises its error by name, or falls back. The
    same kernel and bits either way; what this saves is the cold Python of that path.
    """
    if (reduction not in ("mean", "sum") or type(eps) is not float or type(temperature) is not float
            or type(student) is not torch.Tensor or type(teacher) is not torch.Tensor
            or not (negatives is None or type(negatives) is torch.Tensor)
            or not (neg_index is None or type(neg_index) is torch.Tensor)):  # a subclass keeps its __torch_function__
        return None
    return _build.cpu_extension().eager_reduced_loss(student, teacher, negatives, neg_index, loss == "info_nce",
                                                     reduction == "mean", eps, temperature)

