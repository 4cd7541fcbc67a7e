"""Backend "cuda": the hand-written CUDA C++ kernels of ``csrc/cuda``.

The comparison point for the Triton kernels (``bench/bench_cos_nce.py`` measures both).
Build: just-in-time (ninja + nvcc) on first use, for the architecture of the GPU in use
(``TORCH_CUDA_ARCH_LIST`` overrides it), cached on disk by content (``_build.py``). It needs a CUDA build of torch
and the CUDA toolkit; importing ``lrc_kernels`` never compiles, and ``backend="auto"``
falls back with one warning if the build fails.

The kernels take one input dtype, so mixed-dtype inputs are promoted first (a copy of
the lower-precision tensors). The ops, the autograd and the math are shared with the
C++ CPU backend: see ``native.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .._validation import ContrastiveProblem
from . import _build, native

toolchain_present = _build.cuda_toolchain_present


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    _build.cuda_extension()


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the CUDA kernels."""
    if problem.device.type != "cuda":
        raise RuntimeError(f"backend='cuda' runs on CUDA tensors, got {problem.device}")
    tensors = [x for x in (problem.student, problem.teacher, problem.negatives) if x is not None]
    common = functools.reduce(torch.promote_types, [x.dtype for x in tensors])
    if any(x.dtype != common for x in tensors):
        problem = dataclasses.replace(
            problem,
            student=problem.student.to(common),
            teacher=problem.teacher.to(common),
            negatives=None if problem.negatives is None else problem.negatives.to(common),
        )
    return native.row_losses(problem)
