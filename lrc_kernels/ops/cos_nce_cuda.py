"""Backend "cuda": the hand-written CUDA C++ kernels of ``csrc/cuda``.

The comparison point for the Triton kernels (``bench/bench_cos_nce.py`` measures both).
Build: just-in-time with ``torch.utils.cpp_extension.load`` (ninja + nvcc) on first use,
for the architecture of the GPU in use (``TORCH_CUDA_ARCH_LIST`` overrides it), cached
under ``TORCH_EXTENSIONS_DIR`` and keyed by the sources. It needs a CUDA build of torch
and the CUDA toolkit; importing ``lrc_kernels`` never compiles, and ``backend="auto"``
falls back with one warning if the build fails.

The kernels take one input dtype, so mixed-dtype inputs are promoted first (a copy of
the lower-precision tensors). The ops, the autograd and the math are shared with the
C++ CPU backend: see ``native.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from .._validation import ContrastiveProblem
from . import native

SOURCES = [Path(__file__).resolve().parents[2] / "csrc" / "cuda" / name
           for name in ("cos_nce_cuda.cpp", "cos_nce_cuda.cu")]


def toolchain_present() -> bool:
    """A CUDA build of torch, a visible GPU, the sources and nvcc (CUDA_HOME); no compiling."""
    if not (torch.version.cuda and torch.cuda.is_available() and all(p.exists() for p in SOURCES)):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


@functools.lru_cache(maxsize=None)
def extension():
    """Build (once, cached on disk) and load the CUDA extension, for this torch and GPU architecture."""
    arch = f"{torch.__version__}{torch.cuda.get_device_capability()}".encode()
    return native.build_extension("cuda", SOURCES, arch, extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"])


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    extension()


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
