"""Backend registry: names -> per-row loss implementations, loaded lazily.

A backend is a function ``row_losses(problem) -> Tensor[B]`` (fp32, or fp64 for
fp64 inputs) that is differentiable with respect to the problem's tensors. New
backends (the native ``cpp`` and ``cuda`` kernels) register here; nothing in the
public API changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._validation import ContrastiveProblem


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use
    device_types: tuple[str, ...]  # device types where it runs
    auto_priority: dict  # device type -> priority for backend="auto" (higher wins; absent = never)
    requires: tuple[str, ...] = ()  # top-level packages it needs
    probe: Optional[str] = None  # module-level function name: a cheap "can this build/run here?"

    def _module(self):
        return importlib.import_module(self.module, __package__)

    def is_available(self) -> bool:
        if not all(importlib.util.find_spec(pkg) is not None for pkg in self.requires):
            return False
        return self.probe is None or bool(getattr(self._module(), self.probe)())

    def load(self) -> Callable[[ContrastiveProblem], torch.Tensor]:
        """The backend's ``row_losses``; builds it first where it is compiled (``ensure_ready``)."""
        module = self._module()
        ready = getattr(module, "ensure_ready", None)
        if ready is not None:
            ready()
        return module.row_losses


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; ``backend.name`` becomes a valid ``backend=`` value."""
    _REGISTRY[backend.name] = backend


register_backend(Backend("torch", ".reference", ("cpu", "cuda", "mps", "xpu"), {"cpu": 0, "cuda": 0, "mps": 0, "xpu": 0}))
# On CPU, Triton runs only under TRITON_INTERPRET=1 (for testing), so auto never picks it there.
register_backend(Backend("triton", ".ops.cos_nce_triton", ("cuda", "cpu"), {"cuda": 10}, requires=("triton",)))
# Built just-in-time with ninja on first use; auto prefers it on CPU once it builds.
register_backend(Backend("cpp", ".ops.cos_nce_cpp", ("cpu",), {"cpu": 10}, requires=("ninja",),
                         probe="compiler_present"))

_FAILED: dict[str, str] = {}  # backends whose build/load failed: auto skips them, warning once


def backend_names() -> tuple[str, ...]:
    return ("auto", *_REGISTRY)


def check_backend_name(name) -> None:
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this environment."""
    return [b.name for b in _REGISTRY.values() if device_type in b.device_types and b.is_available()]


def resolve(name: str, device: torch.device) -> Callable[[ContrastiveProblem], torch.Tensor]:
    """The ``row_losses`` of the named backend, or of the fastest available one for ``auto``."""
    check_backend_name(name)
    if name == "auto":
        candidates = sorted(
            (b for b in _REGISTRY.values()
             if device.type in b.auto_priority and b.name not in _FAILED and b.is_available()),
            key=lambda b: -b.auto_priority[device.type],
        )
        for backend in candidates:
            try:
                return backend.load()
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
    if device.type not in backend.device_types:
        raise RuntimeError(f"backend={name!r} does not run on {device.type} tensors")
    if not backend.is_available():
        raise RuntimeError(f"backend={name!r} needs {', '.join(backend.requires)}, which is not installed")
    return backend.load()
