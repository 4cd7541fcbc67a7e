"""The one validation layer shared by every backend.

``prepare_problem`` checks the public arguments, raises a clear ``TypeError``,
``ValueError`` or ``IndexError`` naming the offending argument, and returns a
:class:`ContrastiveProblem`: every input flattened to rows of length D, with the
negative mode resolved. Backends only ever see a valid problem.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import torch

LOSS_KINDS = ("cos_nce", "info_nce")
REDUCTIONS = ("mean", "sum", "none")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

class NegativeMode(enum.IntEnum):
    """How each row's negatives are given. The kernel values mirror csrc/common/negative_mode.h."""

    NONE = 0  # kernels only: no negatives (row statistics for the in-batch primitives)
    EXPLICIT = 1  # negatives [B, K, D]
    BANK = 2  # neg_index [B, K] selects rows of a bank [N, D]
    TEACHER_BANK = 3  # neg_index [B, K] selects rows of the teacher itself
    IN_BATCH = 4  # every other teacher row of the batch (K = B - 1): the O(B D) algorithm (kInBatch, CPU one pass)

    @property
    def indexed(self) -> bool:
        return self in (NegativeMode.BANK, NegativeMode.TEACHER_BANK)


@dataclass
class ContrastiveProblem:
    """A validated loss call, with rows flattened to length ``dim``.

    ``negatives`` is ``[B, K, D]`` in explicit mode, the bank ``[N, D]`` in bank mode,
    and ``None`` in teacher-bank and in-batch modes.
    """

    loss: str
    student: torch.Tensor  # [B, D]
    teacher: torch.Tensor  # [B, D]
    negatives: Optional[torch.Tensor]
    neg_index: Optional[torch.Tensor]  # [B, K], int64
    mode: NegativeMode
    num_negatives: int
    eps: float
    temperature: float
    # "none", "mean" or "sum": what the backend's loss function returns (``backends.Backend.load``).
    reduction: str = "none"

    @property
    def batch(self) -> int:
        return self.student.shape[0]

    @property
    def row_grad(self) -> float:
        """The gradient each row's loss is expected to receive: 1 / B under a mean, else 1. The
        CPU one pass folds it into the student's gradient in the forward, so the usual
        ``loss.backward()`` has nothing left to do (any other grad_output is still exact)."""
        return 1.0 / self.batch if self.reduction == "mean" else 1.0

    @property
    def dim(self) -> int:
        return self.student.shape[1]

    @property
    def device(self) -> torch.device:
        return self.student.device



def _check_plain_tensor(name: str, x) -> None:
    """A dense, strided tensor with data: sparse, nested and meta tensors are refused by name."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{name} is a nested tensor; pass a dense [B, ...] tensor (pad it, e.g. with "
                        "torch.nested.to_padded_tensor)")
    if x.layout != torch.strided:
        raise TypeError(f"{name} has layout {x.layout}; the loss needs a dense (strided) tensor, e.g. {name}.to_dense()")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no data; the loss needs real tensors")


def _check_float_tensor(name: str, x) -> None:
    _check_plain_tensor(name, x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def _rows(x: torch.Tensor, leading: int) -> torch.Tensor:
    """Flatten everything after the first ``leading`` dims; copy only if the last stride is not 1."""
    if x.dim() == leading + 1 and x.stride(-1) == 1:  # already rows: no reshape op (a cold one costs ~30 us)
        return x
    flat = x.reshape(*x.shape[:leading], -1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _check_positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) the value may be
    # symbolic, and comparisons trace (as guards). NaN fails `value > 0`.
    if not (value > 0 and value != math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value if isinstance(value, (torch.SymInt, torch.SymFloat)) else float(value)


def _usable_for_backward(x: Optional[torch.Tensor], needed: bool) -> Optional[torch.Tensor]:
    """Tensors made under ``torch.inference_mode()`` cannot be saved for backward; a student that
    requires grad beside them (an inference-mode teacher) gets a normal copy of them instead."""
    if x is None or not needed or torch.compiler.is_compiling():
        return x
    if not x.is_inference() or torch.is_inference_mode_enabled():
        return x
    return x.clone()


def check_options(reduction, eps, temperature) -> tuple[float, float]:
    """Check the keyword options shared by every loss; return (eps, temperature) as floats."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return _check_positive_number("eps", eps), _check_positive_number("temperature", temperature)


def prepare_problem(
    loss: str,
    student,
    teacher,
    negatives=None,
    neg_index=None,
    *,
    eps: float = 1e-8,
    temperature: float = 1.0,
) -> ContrastiveProblem:
    """Validate the tensors of a loss call and return its flattened :class:`ContrastiveProblem`.

    ``eps`` and ``temperature`` are taken as already checked by :func:`check_options`.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")

    _check_float_tensor("student", student)
    _check_float_tensor("teacher", teacher)
    if student.dim() < 2:
        raise ValueError(
            f"student must have shape [B, *features] with at least one feature dim, "
            f"got shape {tuple(student.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    batch, features = student.shape[0], tuple(student.shape[1:])
    if batch == 0 or student.numel() == 0:
        raise ValueError(f"student must be non-empty, got shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(
            f"teacher is on {teacher.device} but student is on {student.device}; "
            "all inputs must be on one device"
        )

    if negatives is not None:
        _check_float_tensor("negatives", negatives)
        if negatives.device != student.device:
            raise ValueError(
                f"negatives is on {negatives.device} but student is on {student.device}; "
                "all inputs must be on one device"
            )

    index = None
    if neg_index is None and negatives is None:
        mode, num_negatives = NegativeMode.IN_BATCH, batch - 1
        if batch < 2:
            raise ValueError(
                "in-batch negatives (negatives=None, neg_index=None) need a batch size B >= 2, "
                f"got student of shape {tuple(student.shape)}"
            )
    elif neg_index is None:
        mode = NegativeMode.EXPLICIT
        if negatives.dim() != student.dim() + 1 or negatives.shape[0] != batch or tuple(negatives.shape[2:]) != features:
            raise ValueError(
                f"negatives must have shape [B, K, *features] = [{batch}, K, "
                f"{', '.join(map(str, features))}], got {tuple(negatives.shape)}"
            )
        num_negatives = negatives.shape[1]
        if num_negatives == 0:
            raise ValueError("negatives must hold K >= 1 negatives per row, got K = 0")
    else:
        mode = NegativeMode.BANK if negatives is not None else NegativeMode.TEACHER_BANK
        if not isinstance(neg_index, torch.Tensor):
            raise TypeError(f"neg_index must be an integer torch.Tensor, got {type(neg_index).__name__}")
        _check_plain_tensor("neg_index", neg_index)
        if neg_index.dtype.is_floating_point or neg_index.dtype.is_complex or neg_index.dtype == torch.bool:
            raise TypeError(f"neg_index must be an integer tensor, got {neg_index.dtype}")
        if neg_index.device != student.device:
            raise ValueError(
                f"neg_index is on {neg_index.device} but student is on {student.device}; "
                "all inputs must be on one device"
            )
        if neg_index.dim() != 2 or neg_index.shape[0] != batch:
            raise ValueError(f"neg_index must have shape [B, K] = [{batch}, K], got {tuple(neg_index.shape)}")
        num_negatives = neg_index.shape[1]
        if num_negatives == 0:
            raise ValueError("neg_index must select K >= 1 negatives per row, got shape [B, 0]")
        bank_name, bank = ("negatives", negatives) if negatives is not None else ("teacher", teacher)
        if bank.dim() != student.dim() or tuple(bank.shape[1:]) != features:
            raise ValueError(
                f"with neg_index, {bank_name} is a bank of shape [N, *features] = "
                f"[N, {', '.join(map(str, features))}], got {tuple(bank.shape)}"
            )
        bank_rows = bank.shape[0]
        if bank_rows == 0:
            raise ValueError(f"the negative bank ({bank_name}) is empty")
        # One host sync: an out-of-range row would read foreign memory. Inside torch.compile
        # graphs the op checks instead; under CUDA-graph capture the values are only those of
        # the capture, so the caller checks what it copies in before each replay.
        unknown = torch.compiler.is_compiling() or (neg_index.is_cuda and torch.cuda.is_current_stream_capturing())
        lo, hi = (0, 0) if unknown else (int(v) for v in torch.aminmax(neg_index))
        if lo < 0 or hi >= bank_rows:
            raise IndexError(
                f"neg_index values must lie in [0, {bank_rows}) (rows of {bank_name}), "
                f"got values in [{lo}, {hi}]"
            )
        index = neg_index.to(torch.int64)

    # Inference-mode inputs beside an input that requires grad are copied once (see above).
    needs_backward = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student, teacher, negatives))
    student, teacher = _usable_for_backward(student, needs_backward), _usable_for_backward(teacher, needs_backward)
    negatives = _usable_for_backward(negatives, needs_backward)
    if index is not None:
        index = _usable_for_backward(index, needs_backward)

    if mode == NegativeMode.EXPLICIT:
        flat_negatives = _rows(negatives, 2)
    elif mode == NegativeMode.BANK:
        flat_negatives = _rows(negatives, 1)
    else:
        flat_negatives = None

    return ContrastiveProblem(
        loss=loss,
        student=_rows(student, 1),
        teacher=_rows(teacher, 1),
        negatives=flat_negatives,
        neg_index=index,
        mode=mode,
        num_negatives=num_negatives,
        eps=eps,
        temperature=temperature,
    )
