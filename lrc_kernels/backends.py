"""Backend registry: names -> per-row loss implementations, loaded lazily.

A backend is a module with a function ``row_losses(problem) -> Tensor[B]`` (fp32, or
fp64 for fp64 inputs) that is differentiable with respect to the problem's tensors, and
optionally ``reduced_loss(problem)``: the mean or sum of the rows where it has a fused path
for that problem, else None, and ``eager_reduced_loss(loss, *arguments)``: the same before any
Python validation (it checks what it needs itself), else None; eager CPU calls only, once the
backend has been resolved for the CPU (see :func:`eager_fast_path`). New backends (for example
a native CUDA kernel) register here; nothing in the public API changes.

The resolution code is written so that ``torch.compile(fullgraph=True)`` can trace it:
modules are imported by plain ``import`` statements inside loader functions, and the
availability probes (which touch the file system) run once, outside the graph.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._validation import ContrastiveProblem


@dataclass(frozen=True)
class Backend:
    name: str
    loader: Callable[[], object]  # returns the module holding row_losses (and maybe ensure_ready)
    device_types: tuple[str, ...]  # device types where it runs
    auto_priority: dict = field(default_factory=dict)  # device type -> priority for "auto" (absent: never)
    requires: tuple[str, ...] = ()  # top-level packages it needs
    probe: Callable[[], bool] | None = None  # cheap "can it build/run here?", no compiling
    traceable: bool = True  # runs correctly inside torch.compile graphs

    def load(self) -> Callable[[ContrastiveProblem], torch.Tensor]:
        """The backend's loss function (the rows reduced by ``problem.reduction``); builds the
        backend first where it is compiled (``ensure_ready``)."""
        module = self.loader()
        ready = getattr(module, "ensure_ready", None)
        if ready is not None and not torch.compiler.is_compiling():
            ready()
        row_losses, fused = module.row_losses, getattr(module, "reduced_loss", None)

        def loss(problem: ContrastiveProblem) -> torch.Tensor:
            if fused is not None and problem.reduction != "none":
                reduced = fused(problem)
                if reduced is not None:
                    return reduced
            return reduce_rows(row_losses(problem), problem.reduction)

        loss.backend = self.name
        loss.eager_reduced_loss = getattr(module, "eager_reduced_loss", None)
        return loss


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _load_reference():
    from . import reference

    return reference


def _load_triton():
    from .ops import cos_nce_triton

    return cos_nce_triton


def _load_cpp():
    from .ops import cos_nce_cpp

    return cos_nce_cpp


def _load_cuda():
    from .ops import cos_nce_cuda

    return cos_nce_cuda


def _cuda_toolchain_present() -> bool:
    from .ops import cos_nce_cuda

    return cos_nce_cuda.toolchain_present()


def _cpp_compiler_present() -> bool:
    from .ops import cos_nce_cpp

    return cos_nce_cpp.compiler_present()


_REGISTRY: dict[str, Backend] = {}
_FAILED: dict[str, str] = {}  # backends whose build/load failed: auto skips them, warning once
_AVAILABLE: dict[str, bool] = {}  # probes touch the file system: once per process, not per call
_AUTO_CHOICE: dict[str, Callable] = {}  # device type -> what "auto" loaded (eager calls; small shapes pay per call)
_LOADED: dict[str, Callable] = {}  # backend name -> its loaded loss function (eager calls)
_EAGER_CPU: dict[str, Callable] = {}  # backend= value -> the eager fast path it resolved to on CPU


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; ``backend.name`` becomes a valid ``backend=`` value."""
    _REGISTRY[backend.name] = backend
    _AVAILABLE.pop(backend.name, None)
    _AUTO_CHOICE.clear()
    _LOADED.pop(backend.name, None)
    _EAGER_CPU.clear()


register_backend(Backend("torch", _load_reference, ("cpu", "cuda", "mps", "xpu"),
                         {"cpu": 0, "cuda": 0, "mps": 0, "xpu": 0}))
# On CPU, Triton runs only under TRITON_INTERPRET=1 (for testing), so auto never picks it there.
# Its autograd.Functions are not traced correctly by torch.compile (zero gradients seen on
# CUDA with torch 2.11), so compiled code uses the custom-op backends instead.
register_backend(Backend("triton", _load_triton, ("cuda", "cpu"), {"cuda": 10}, requires=("triton",),
                         traceable=False))
# Built just-in-time with ninja on first use; auto prefers it on CPU once it builds.
register_backend(Backend("cpp", _load_cpp, ("cpu",), {"cpu": 10}, requires=("ninja",), probe=_cpp_compiler_present))
# Hand-written CUDA C++; built just-in-time where torch has CUDA and nvcc is found.
register_backend(Backend("cuda", _load_cuda, ("cuda",), {"cuda": 5}, requires=("ninja",),
                         probe=_cuda_toolchain_present))


def backend_names() -> tuple[str, ...]:
    return ("auto", *_REGISTRY)


def check_backend_name(name) -> None:
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")


@torch.compiler.assume_constant_result
def _is_available(name: str) -> bool:
    if name not in _AVAILABLE:
        backend = _REGISTRY[name]
        found = all(importlib.util.find_spec(pkg) is not None for pkg in backend.requires)
        _AVAILABLE[name] = found and (backend.probe is None or bool(backend.probe()))
    return _AVAILABLE[name]


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this environment (not counting failed builds)."""
    return [b.name for b in _REGISTRY.values()
            if device_type in b.device_types and b.name not in _FAILED and _is_available(b.name)]


def eager_fast_path(name: str) -> Callable | None:
    """The ``eager_reduced_loss`` of what ``backend=name`` resolved to on the CPU, once it has
    (eager calls); None before, and for backends without one."""
    return _EAGER_CPU.get(name) if isinstance(name, str) else None  # a wrong name: the usual error


def resolve(name: str, device: torch.device) -> Callable[[ContrastiveProblem], torch.Tensor]:
    """The loss function of the named backend, or of the fastest available one for ``auto``.
    ``name`` was checked by :func:`check_backend_name` (once per call, in ``functional.py``)."""
    loaded = _resolve(name, device)
    fast = getattr(loaded, "eager_reduced_loss", None)
    if fast is not None and device.type == "cpu" and not torch.compiler.is_compiling():
        _EAGER_CPU[name] = fast
    return loaded


def _resolve(name: str, device: torch.device) -> Callable[[ContrastiveProblem], torch.Tensor]:
    compiling = torch.compiler.is_compiling()
    if name == "auto" and not compiling and device.type in _AUTO_CHOICE:
        return _AUTO_CHOICE[device.type]
    loaded = None if compiling else _LOADED.get(name)
    if loaded is not None and device.type in _REGISTRY[name].device_types:
        return loaded
    if name == "auto":
        candidates = sorted(
            (b for b in _REGISTRY.values()
             if device.type in b.auto_priority and b.name not in _FAILED and _is_available(b.name)
             and (b.traceable or not compiling)),
            key=lambda b: -b.auto_priority[device.type],
        )
        for backend in candidates:
            try:
                loaded = backend.load()
                if not compiling:
                    _AUTO_CHOICE[device.type] = loaded
                return loaded
            except Exception as exc:  # a failed build must not break training: fall back, say so once
                _FAILED[backend.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"lrc_kernels: backend {backend.name!r} could not be loaded ({_FAILED[backend.name][:300]}); "
                    "backend='auto' falls back to the next one",
                    RuntimeWarning,
                    stacklevel=4,
                )
        raise RuntimeError(f"no lrc_kernels backend runs on device type {device.type!r}")
    backend = _REGISTRY[name]
    if compiling and not backend.traceable:
        traceable = [b.name for b in _REGISTRY.values() if b.traceable and device.type in b.device_types]
        raise RuntimeError(f"backend={name!r} cannot run inside torch.compile; use one of {traceable} or 'auto' "
                           "in compiled code (auto picks a traceable backend there)")
    if device.type not in backend.device_types:
        raise RuntimeError(f"backend={name!r} does not run on {device.type} tensors")
    if not _is_available(name):
        needs = ", ".join(backend.requires) or "its toolchain"
        raise RuntimeError(f"backend={name!r} is not available here (it needs {needs}, and a C++ compiler for cpp)")
    loaded = backend.load()
    if not compiling:
        _LOADED[name] = loaded
    return loaded
