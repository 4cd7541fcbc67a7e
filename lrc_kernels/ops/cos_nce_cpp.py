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
import os
import shutil
from pathlib import Path

import torch

from .._validation import ContrastiveProblem
from . import native

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "cos_nce_cpu.cpp"


def compiler_present() -> bool:
    return SOURCE.exists() and shutil.which(os.environ.get("CXX", "c++")) is not None


def _cpu_flags() -> bytes:
    """A -march=native build never runs on another CPU: its instruction-set flags key the cache."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "").encode()
    except OSError:
        return b""


@functools.lru_cache(maxsize=None)
def extension():
    """Build (once, cached on disk) and load the C++ extension."""
    return native.build_extension("cpu", [SOURCE], _cpu_flags(), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"])


def ensure_ready() -> None:
    """Called by the backend registry before first use: surfaces build errors early."""
    extension()


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the C++ kernels."""
    if problem.device.type != "cpu":
        raise RuntimeError(f"backend='cpp' runs on CPU tensors, got {problem.device}")
    return native.row_losses(problem)
