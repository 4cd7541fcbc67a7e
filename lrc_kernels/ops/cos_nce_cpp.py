"""Backend "cpp": the fused CPU kernels of ``csrc/cpu/cos_nce_cpu.cpp``.

Build: just-in-time with ``torch.utils.cpp_extension.load`` (ninja) on first use, with
``-O3 -march=native -fopenmp``. It is cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), keyed by the source and by this CPU's instruction-set
flags. Importing ``lrc_kernels`` never compiles. ``backend="auto"`` falls back to the
torch backend, with one warning, if the build fails; ``backend="cpp"`` raises.

The ops, the autograd and the math are shared with the CUDA backend: see ``native.py``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from .._validation import ContrastiveProblem
from . import native

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "cos_nce_cpu.cpp"
_log = logging.getLogger(__name__)


def compiler_present() -> bool:
    return SOURCE.exists() and shutil.which(os.environ.get("CXX", "c++")) is not None


def _build_tag() -> str:
    """Source + CPU instruction-set flags: a -march=native build never runs on another CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    try:
        with open("/proc/cpuinfo") as f:
            digest.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def extension():
    """Build (once, cached on disk) and load the C++ extension."""
    from torch.utils.cpp_extension import load

    if not SOURCE.exists():
        raise RuntimeError(f"the C++ source {SOURCE} is missing; install lrc_kernels from its source tree")
    _log.info("lrc_kernels: building the C++ CPU kernels (first use only; about a minute)")
    return load(
        name=f"lrc_kernels_cpu_{_build_tag()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    extension()


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the C++ kernels."""
    if problem.device.type != "cpu":
        raise RuntimeError(f"backend='cpp' runs on CPU tensors, got {problem.device}")
    return native.row_losses(problem)
