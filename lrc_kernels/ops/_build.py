"""Just-in-time builds of the native extensions in ``csrc/``, cached on disk by content.

The sources are found inside the installed package (``lrc_kernels/_csrc``, copied there when a
wheel is built) or, in a source checkout or editable install, in the repository's ``csrc/``.
Nothing here runs at import: a build starts on a backend's first use.

* ``cpu``: ``csrc/cpu`` with ``-O3 -march=native -fopenmp``; the cache key includes this CPU's
  instruction-set flags, since such a build runs on no other CPU.
* ``cuda``: ``csrc/cuda`` with nvcc, for the torch version and the GPU architecture in use.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("lrc_kernels")

_PACKAGED = Path(__file__).resolve().parents[1] / "_csrc"
_CHECKOUT = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("cpu/cos_nce_cpu.cpp",)
CUDA_SOURCES = ("cuda/cos_nce_cuda.cpp", "cuda/cos_nce_cuda.cu")


def native_root() -> Path:
    """The folder holding cpu/, cuda/ and common/: the package's copy, else the checkout's."""
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


def _files(sources: tuple[str, ...]) -> list[Path]:
    """The sources and the shared headers they include (csrc/common), relative to native_root."""
    root = native_root()
    return [root / s for s in sources] + sorted((root / "common").glob("*.h"))


def build_extension(kind: str, sources: tuple[str, ...], tag_extra: bytes, **load_kwargs):
    """JIT-build (ninja) the extension from ``sources`` (relative to :func:`native_root`).

    The cache is keyed by content, not by path: the name hashes every file and ``tag_extra``,
    and the build compiles copies kept inside its own folder (in the same relative layout, so
    ``#include "../common/..."`` resolves). Two checkouts of the same code therefore share one
    build and never rebuild each other's; ninja would rebuild whenever the source paths in its
    build file changed. "building" is logged only when no built library is there yet.
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    root, files = native_root(), _files(sources)
    missing = [str(p) for p in files[:len(sources)] if not p.exists()]
    if missing:
        raise RuntimeError(f"the {kind} sources {missing} are missing; reinstall lrc-kernels (a wheel ships them "
                           "in lrc_kernels/_csrc)")
    digest = hashlib.sha256(tag_extra)
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    name = f"lrc_kernels_{kind}_{digest.hexdigest()[:16]}"
    build_dir = Path(_get_build_directory(name, verbose=False))
    for path in files:
        copy = build_dir / "src" / path.relative_to(root)
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
            tmp.write_bytes(path.read_bytes())
            os.replace(tmp, copy)  # atomic: a concurrent build never reads a half-written copy
    if not (build_dir / f"{name}.so").is_file():
        log.info("lrc_kernels: building the %s kernels in %s (first use only; about a minute)", kind, build_dir)
    return load(name=name, sources=[str(build_dir / "src" / s) for s in sources], build_directory=str(build_dir),
                verbose=False, **load_kwargs)


def cpu_flags() -> bytes:
    """A -march=native build never runs on another CPU: its instruction-set flags key the cache."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "").encode()
    except OSError:
        return b""


def cpu_compiler_present() -> bool:
    return all(p.exists() for p in _files(CPU_SOURCES)) and shutil.which(os.environ.get("CXX", "c++")) is not None


def cuda_toolchain_present() -> bool:
    """A CUDA build of torch, a visible GPU, the sources and nvcc (CUDA_HOME); no compiling."""
    if not (torch.version.cuda and torch.cuda.is_available() and all(p.exists() for p in _files(CUDA_SOURCES))):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


# The gradient-buffer cache's limit in bytes, once set before the extension was loaded
# (``lrc_kernels.set_cpu_cache_limit``); None: the extension's default.
cpu_cache_limit: int | None = None


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """Build (once, cached on disk) and load the C++ CPU extension."""
    extension = build_extension("cpu", CPU_SOURCES, cpu_flags(), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                extra_ldflags=["-fopenmp"])
    if cpu_cache_limit is not None:
        extension.set_cache_limit(cpu_cache_limit)
    return extension


def loaded_cpu_extension():
    """The CPU extension if it is loaded already, else None (never builds it)."""
    return cpu_extension() if cpu_extension.cache_info().currsize else None


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """Build (once, cached on disk) and load the CUDA extension, for this torch and GPU architecture."""
    arch = f"{torch.__version__}{torch.cuda.get_device_capability()}".encode()
    return build_extension("cuda", CUDA_SOURCES, arch, extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"])


def extension_for(device: torch.device):
    """The compiled extension for a device type (built on first use, then cached)."""
    if device.type == "cpu":
        return cpu_extension()
    if device.type == "cuda":
        return cuda_extension()
    raise RuntimeError(f"no native lrc_kernels extension for device type {device.type!r}")
