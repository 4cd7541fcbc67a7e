"""Where a run executes: its process group (torchrun / DDP) and its numeric precision.

Distributed runs use PyTorch's own engine: ``torchrun`` sets RANK / WORLD_SIZE /
LOCAL_RANK, :func:`init_runtime` joins the process group (NCCL on CUDA, gloo on CPU)
and the trainer wraps the trained modules in ``DistributedDataParallel``. One process
without those variables is a world of size 1 and touches no process group. A collective
that waits longer than ``LRC_BERT_DIST_TIMEOUT_S`` seconds (default 1800) fails the run
instead of hanging it: a rank that died leaves the others waiting in a collective.

Precision: ``fp32``; ``bf16`` (autocast, no scaler); ``fp16`` (autocast and a
``GradScaler``, whose state is checkpointed). Every backward goes through
:meth:`Runtime.backward`, which applies the gradient-accumulation factor and the loss scale.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("lrc_bert")

T = TypeVar("T")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1
    loss_factor: float = 1.0  # 1 / gradient-accumulation steps, set per step by the trainer
    scaler: Optional[torch.amp.GradScaler] = field(default=None, repr=False)

    def __post_init__(self):
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {self.precision!r}")
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor whose backward gives this micro-batch's share of the step's gradient."""
        loss = loss * self.loss_factor if self.loss_factor != 1.0 else loss
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def outside_autocast(self):
        """Backward passes run here: inside a step-wide autocast region (whose weight-cast cache
        then serves every forward of the step) but not under autocast themselves."""
        if AUTOCAST_DTYPES[self.precision] is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        with self.outside_autocast():
            self.scale(loss).backward()

    def grad(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with self.outside_autocast():
            return torch.autograd.grad(self.scale(loss), x)[0]

    # ------------------------------------------------------------------ collectives

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] per rank -> [world * B, ...] in rank order (no gradient: teacher values)."""
        if not self.distributed:
            return x
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.detach().contiguous())
        return out

    def max_int(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def mean_dict(self, values: dict) -> dict:
        """Average float entries over ranks (for logging)."""
        keys = [k for k, v in values.items() if isinstance(v, float)]
        if not self.distributed or not keys:
            return values
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return {**values, **{k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}}

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA device")
    return device


def to_device(tree, device: torch.device):
    """Every tensor in a nest of dicts / lists / tuples, moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v, tree)


def dist_timeout() -> datetime.timedelta:
    """The process group's collective timeout, from ``LRC_BERT_DIST_TIMEOUT_S`` (seconds)."""
    raw = os.environ.get("LRC_BERT_DIST_TIMEOUT_S", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"LRC_BERT_DIST_TIMEOUT_S={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_runtime(device_name: str, precision: str) -> Runtime:
    """The runtime of this process: joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = resolve_device(device_name)
        _check_precision(device, precision)
        return Runtime(device, precision)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dist_timeout())
    _check_precision(device, precision)
    log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return Runtime(device, precision, rank=rank, world_size=world)


def _check_precision(device: torch.device, precision: str) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16")


def shutdown(runtime: Runtime) -> None:
    """Leave the process group. Call it once nothing of the run is left (see :func:`run_with_runtime`)."""
    if runtime.distributed and dist.is_initialized():
        gc.collect()  # DDP modules sit in reference cycles; their reducers hold the group
        dist.destroy_process_group()


def run_with_runtime(device_name: str, precision: str, body: Callable[[Runtime], T]) -> T:
    """``body(runtime)`` in this process's runtime, then :func:`shutdown`.

    The group must die in ``destroy_process_group``, which drops it without the GIL. A DDP
    reducer still alive then holds the last reference, and drops it later with the GIL held:
    ``~ProcessGroupGloo`` joins its worker threads while one of them waits for the GIL to free
    the tensors of the collective it just finished, and the rank hangs at exit. So the body's
    frame ends first, and a failed body's frames are cleared, before the group goes.
    """
    runtime = init_runtime(device_name, precision)
    try:
        return body(runtime)
    except BaseException as error:
        if runtime.distributed:
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        shutdown(runtime)
