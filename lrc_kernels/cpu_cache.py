"""The CPU one pass's cache of gradient buffers.

The CPU one pass returns the student's gradient G, a fresh [B, D] buffer every call. glibc
often hands a freed buffer of several MiB back to the OS (or leaves its pages unmapped), and
the next call then faults every page in again: at the paper's shape that cost about 0.4x the
time of reading the inputs once. So a freed G of at least 1 MiB is kept for the next call of
the same size, as PyTorch's CUDA caching allocator keeps device memory, up to a limit (256 MiB
by default), the oldest dropped first. In a training loop that is one buffer.

    import lrc_kernels as lk
    lk.cpu_cache_bytes()             # bytes held now (not counting live gradients)
    lk.empty_cpu_cache()             # free them
    lk.set_cpu_cache_limit(0)        # never keep a buffer
"""

from __future__ import annotations

from .ops import _build


def cpu_cache_bytes() -> int:
    """Bytes of freed gradient buffers the CPU one pass holds for reuse."""
    extension = _build.loaded_cpu_extension()
    return 0 if extension is None else int(extension.cache_held_bytes())


def empty_cpu_cache() -> None:
    """Free every gradient buffer held for reuse (gradients still in use are not touched)."""
    extension = _build.loaded_cpu_extension()
    if extension is not None:
        extension.empty_cache()


def set_cpu_cache_limit(nbytes: int) -> None:
    """Hold at most ``nbytes`` of freed gradient buffers (0: none); what is above it is freed now."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    _build.cpu_cache_limit = nbytes
    extension = _build.loaded_cpu_extension()
    if extension is not None:
        extension.set_cache_limit(nbytes)
