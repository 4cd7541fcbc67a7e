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
