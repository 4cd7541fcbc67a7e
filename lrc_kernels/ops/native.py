"""The native (C++ and CUDA C++) backends' shared Python layer: torch.library ops and autograd.

Backends "cpp" (``csrc/cpu``) and "cuda" (``csrc/cuda``) compile the same four streaming
primitives with the same signatures; the ops below dispatch to the extension of the
tensors' device. In the notation of ``functional.py`` (where the math is): ``partials``
gives |s|^2, s.x_j and |x_j|^2, from which torch computes the cosines c [B, K+1], the loss
and, in the backward, w = dL/dc; ``weighted_backward`` then streams the gradients as
sigma s + sum_j A_j x_j (student) and A_j s + G_j x_j (x_j), with the per-row coefficients
A_j, G_j and sigma of that formula scaled by the incoming gradient go.

On CPU, when only the student needs a gradient (distillation), every mode takes the one pass
(``one_pass_loss``): the loss and G = d loss_b / d s_b in one sweep (pre-scaled by the row
gradient a mean or sum gives, so the usual backward is free, and otherwise a scale);
in-batch COS-NCE runs its O(B D) algorithm there and in-batch InfoNCE two GEMMs. Otherwise
in-batch COS-NCE is the shared O(B D) algorithm of ``in_batch.py`` over the
``weighted_colsum`` / ``row_dot_vec`` / ``row_combine`` primitives, and in-batch InfoNCE one
GEMM of unit rows in torch (BLAS and cuBLAS do that best).

The primitives are ``torch.ops.lrc_kernels.*`` custom ops with fake (meta) kernels, and
the autograd Functions around them are plain traceable Python, so
``torch.compile(fullgraph=True)`` captures the whole loss without a graph break.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .._validation import ContrastiveProblem, NegativeMode
from ..reference import compute_dtype, loss_from_cosines
from ._autograd import single_backward
from ._build import extension_for
from .in_batch import in_batch_backward, in_batch_forward

# The kernels' negative modes (csrc/common/negative_mode.h), as the ints the ops take.
NO_NEGATIVES, EXPLICIT_NEGATIVES, BANK, TEACHER_BANK, IN_BATCH = (int(m) for m in (
    NegativeMode.NONE, NegativeMode.EXPLICIT, NegativeMode.BANK, NegativeMode.TEACHER_BANK, NegativeMode.IN_BATCH))


def _kernel_arguments(teacher, negatives, neg_index, mode: int, check_index: bool):
    """(negatives, neg_index) for the extensions, placeholders for absent ones; ``neg_index`` is
    range-checked here when asked (inside compiled graphs, where the validation layer cannot).
    Raised in Python: an exception thrown through the CUDA extension crashed the process."""
    if check_index and mode in (BANK, TEACHER_BANK) and neg_index.numel():
        rows = (negatives if mode == BANK else teacher).shape[0]
        lo, hi = (v.item() for v in torch.aminmax(neg_index))
        if lo < 0 or hi >= rows:
            raise IndexError(f"neg_index values must lie in [0, {rows}), got values in [{lo}, {hi}]")
    negatives = _placeholder() if negatives is None else negatives
    neg_index = _placeholder(torch.int64) if neg_index is None else neg_index
    return negatives, neg_index


def _placeholder(dtype=torch.float32):
    return torch.empty(0, dtype=dtype)


# --------------------------------------------------------------------------- torch.library ops

_DEVICES = ("cpu", "cuda")


@torch.library.custom_op("lrc_kernels::partials", mutates_args=(), device_types=_DEVICES)
def partials(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
             mode: int, check_index: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(|s|^2 [B], s.x_j [B, K+1], |x_j|^2 [B, K+1]) with x_0 = t and x_k the negatives.

    ``check_index``: range-check ``neg_index`` here (the validation layer does it in eager
    mode; inside a compiled graph it cannot, so the traced call asks for it).
    """
    negatives, neg_index = _kernel_arguments(teacher, negatives, neg_index, mode, check_index)
    ss, dots, xx = extension_for(student.device).partials(student, teacher, negatives, neg_index, mode)
    return ss, dots, xx


@partials.register_fake
def _(student, teacher, negatives, neg_index, mode, check_index):
    num_neg = 0 if mode == NO_NEGATIVES else (negatives.shape[1] if mode == EXPLICIT_NEGATIVES else neg_index.shape[1])
    acc = compute_dtype(student, teacher, negatives)
    batch = student.shape[0]
    return (student.new_empty(batch, dtype=acc), student.new_empty(batch, num_neg + 1, dtype=acc),
            student.new_empty(batch, num_neg + 1, dtype=acc))


@torch.library.custom_op("lrc_kernels::weighted_backward", mutates_args=(), device_types=_DEVICES)
def weighted_backward(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
                      mode: int, coef_a: Tensor, coef_g: Tensor, sigma: Tensor, need_s: bool, need_t: bool,
                      need_n: bool) -> List[Tensor]:
    """The grads asked for, in the order (student, teacher, negatives)."""
    negatives = _placeholder() if negatives is None else negatives
    neg_index = _placeholder(torch.int64) if neg_index is None else neg_index
    grads = extension_for(student.device).weighted_backward(student, teacher, negatives, neg_index, mode, coef_a,
                                                            coef_g, sigma, need_s, need_t, need_n)
    return [g for g, need in zip(grads, (need_s, need_t, need_n)) if need]


@weighted_backward.register_fake
def _(student, teacher, negatives, neg_index, mode, coef_a, coef_g, sigma, need_s, need_t, need_n):
    like = [(need_s, student), (need_t, teacher), (need_n, negatives)]
    return [x.new_empty(x.shape) for need, x in like if need]


@torch.library.custom_op("lrc_kernels::weighted_colsum", mutates_args=(), device_types=_DEVICES)
def weighted_colsum(x: Tensor, w: Tensor) -> Tensor:
    """sum_b w[b] x[b] -> [D] in w's dtype."""
    return extension_for(x.device).weighted_colsum(x, w)


@weighted_colsum.register_fake
def _(x, w):
    return w.new_empty(x.shape[1])


@torch.library.custom_op("lrc_kernels::row_dot_vec", mutates_args=(), device_types=_DEVICES)
def row_dot_vec(x: Tensor, v: Tensor) -> Tensor:
    """x[b] . v -> [B] in v's dtype."""
    return extension_for(x.device).row_dot_vec(x, v)


@row_dot_vec.register_fake
def _(x, v):
    return v.new_empty(x.shape[0])


@torch.library.custom_op("lrc_kernels::row_combine", mutates_args=(), device_types=_DEVICES)
def row_combine(x: Tensor, a: Tensor, y: Tensor, c: Tensor, v: Tensor, e: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a[b] x[b] + c[b] y[b] + e[b] v -> [B, D] in out_dtype."""
    return extension_for(x.device).row_combine(x, a, y, c, v, e, out_dtype)


@row_combine.register_fake
def _(x, a, y, c, v, e, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


# --------------------------------------------------------------------------- autograd


def cosine_weights(loss: str, cos: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = dL/dc for cosines c [B, K+1] (column 0 is the positive)."""
    if loss == "cos_nce":
        w = torch.full_like(cos, 0.5 / (cos.shape[1] - 1))
        w[:, 0] = -1.5
        return w
    w = torch.softmax(cos / temperature, dim=1) / temperature
    w[:, 0] -= 1.0 / temperature
    return w


# The whole loss is one custom op with its autograd formula registered through
# torch.library (not an autograd.Function), so torch.compile treats it as an opaque op
# with a known backward on every device.


@torch.library.custom_op("lrc_kernels::gather_negatives_loss", mutates_args=(), device_types=_DEVICES)
def gather_negatives_loss(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
                          mode: int, info_nce: bool, eps: float, temperature: float,
                          check_index: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss [B], |s| [B], |x_j| [B, K+1], cosines [B, K+1]) with explicit or indexed negatives."""
    ss, dots, xx = torch.ops.lrc_kernels.partials(student, teacher, negatives, neg_index, mode, check_index)
    norm_s, norm_x = ss.sqrt(), xx.sqrt()
    cos = dots / (norm_s.clamp_min(eps)[:, None] * norm_x.clamp_min(eps))
    rows = loss_from_cosines("info_nce" if info_nce else "cos_nce", cos[:, 0], cos[:, 1:], temperature)
    return (rows if rows.dtype == torch.float64 else rows.float()), norm_s, norm_x, cos


@gather_negatives_loss.register_fake
def _(student, teacher, negatives, neg_index, mode, info_nce, eps, temperature, check_index):
    ss, dots, _ = partials(student, teacher, negatives, neg_index, mode, check_index)  # the fake of partials
    return ss.new_empty(ss.shape), ss.new_empty(ss.shape), dots.new_empty(dots.shape), dots.new_empty(dots.shape)


def _gather_setup_context(ctx, inputs, output):
    student, teacher, negatives, neg_index, mode, info_nce, eps, temperature, _ = inputs
    _, norm_s, norm_x, cos = output
    ctx.save_for_backward(student, teacher, negatives, neg_index, norm_s, norm_x, cos)
    ctx.config = (mode, "info_nce" if info_nce else "cos_nce", eps, temperature)
    ctx.set_materialize_grads(False)  # the norm and cosine outputs get no zero-filled gradients


@single_backward
def _gather_backward(ctx, grad_rows, *unused_grads):
    student, teacher, negatives, neg_index, norm_s, norm_x, cos = ctx.saved_tensors
    mode, loss, eps, temperature = ctx.config
    need_s, need_t, need_n = ctx.needs_input_grad[:3]
    go = grad_rows.to(cos.dtype)[:, None]
    w = cosine_weights(loss, cos, temperature)
    ns, nx = norm_s.clamp_min(eps)[:, None], norm_x.clamp_min(eps)
    coef_a = go * w / (ns * nx)
    coef_g = -go * w * cos * (norm_x >= eps) / nx**2
    sigma = -go[:, 0] * (w * cos).sum(1) * (norm_s >= eps) / ns[:, 0] ** 2
    need_n = need_n and mode in (EXPLICIT_NEGATIVES, BANK)
    grads = iter(torch.ops.lrc_kernels.weighted_backward(
        student, teacher, negatives, neg_index, mode, coef_a.contiguous(), coef_g.contiguous(),
        sigma.contiguous(), need_s, need_t, need_n,
    ))
    return (next(grads) if need_s else None, next(grads) if need_t else None, next(grads) if need_n else None,
            None, None, None, None, None, None)


gather_negatives_loss.register_autograd(_gather_backward, setup_context=_gather_setup_context)


# One pass (CPU): the loss and the student's gradient at grad_output = 1 in one sweep over the
# inputs (csrc/cpu ``one_pass``); the backward scales it. Used when only the student needs a
# gradient (the usual case); teacher or negatives that require grad take the two-pass ops above.


@torch.library.custom_op("lrc_kernels::one_pass_loss", mutates_args=(), device_types=("cpu",))
def one_pass_loss(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], neg_index: Optional[Tensor],
                  mode: int, info_nce: bool, eps: float, temperature: float, need_grad: bool,
                  check_index: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss [B], G [B, D] = d loss_b / d s_b (empty without need_grad), |s| [B], |x_j| [B, K+1]).

    ``mode`` IN_BATCH: the in-batch algorithms (COS-NCE in O(B D); InfoNCE as two GEMMs), and
    |x_j| is |t| [B, 1].
    """
    negatives, neg_index = _kernel_arguments(teacher, negatives, neg_index, mode, check_index)
    loss, grad, norm_s, norm_x = extension_for(student.device).one_pass(student, teacher, negatives, neg_index, mode,
                                                                        info_nce, eps, temperature, need_grad, 1.0)
    loss = loss if loss.dtype == torch.float64 else loss.float()
    return loss, (grad if need_grad else student.new_empty(0)), norm_s, norm_x


@one_pass_loss.register_fake
def _(student, teacher, negatives, neg_index, mode, info_nce, eps, temperature, need_grad, check_index):
    if mode == IN_BATCH:
        acc = compute_dtype(student, teacher)
        ss, dots = student.new_empty(student.shape[0], dtype=acc), student.new_empty(student.shape[0], 1, dtype=acc)
    else:
        ss, dots, _ = partials(student, teacher, negatives, neg_index, mode, check_index)  # the fake of partials
    loss = ss.new_empty(ss.shape, dtype=torch.float64 if ss.dtype == torch.float64 else torch.float32)
    grad = student.new_empty(student.shape) if need_grad else student.new_empty(0)
    return loss, grad, ss.new_empty(ss.shape), dots.new_empty(dots.shape)


def _one_pass_setup_context(ctx, inputs, output):
    # G, and the student (a reference, for the double-backward guard); the teacher, negatives or
    # bank are not kept alive for backward.
    ctx.save_for_backward(output[1], inputs[0])
    ctx.set_materialize_grads(False)  # no zero-filled [B, D] gradient for the G output


_SMALL_GRADIENT = 1 << 14  # elements: below this, scaling costs less than checking (kSmallGradient in csrc/cpu)


def _scaled_saved_gradient(ctx, grad_rows, row_grad=None):
    """The saved G, already ``row_grad`` times d loss_b / d s_b, scaled to the rows' ``grad_rows`` [B].

    When every row receives ``row_grad`` (``loss.backward()`` after a mean or a sum: the forward
    folded it in), G is returned as it is: no pass over [B, D]. A small G is scaled into a new
    buffer without the check (which costs more than the scale there). Otherwise it is scaled in
    place, with no second [B, D] buffer; a second backward through a retained graph then fails
    clearly (autograd sees the saved tensor modified) instead of reading a scaled G. ``row_grad``
    None: no check (compiled graphs, where a data-dependent branch would break the graph). The
    reduced CPU loss does the same in C++ (OnePassReducedFunction in csrc/cpu).
    """
    grad, _ = ctx.saved_tensors
    if row_grad is None:
        return grad.mul_(grad_rows.to(grad.dtype)[:, None])
    small = grad.numel() <= _SMALL_GRADIENT  # then a new buffer: the saved G stays as it was
    if not small and bool((grad_rows == row_grad).all()):
        return grad
    factor = (grad_rows / row_grad).to(grad.dtype)[:, None]
    return grad * factor if small else grad.mul_(factor)


@single_backward
def _one_pass_backward(ctx, grad_rows, *unused_grads):
    return _scaled_saved_gradient(ctx, grad_rows), None, None, None, None, None, None, None, None, None


one_pass_loss.register_autograd(_one_pass_backward, setup_context=_one_pass_setup_context)


class _OnePass(torch.autograd.Function):
    """Eager calls of the one pass: the extension straight from an autograd.Function. The custom
    op's dispatch costs about 0.1 ms a call, which decides small shapes; compiled graphs take
    ``one_pass_loss``, which torch.compile traces. The same kernel, G saved (pre-scaled by the row
    gradient a mean or sum gives), the backward nothing or a scale."""

    @staticmethod
    def forward(ctx, student, teacher, negatives, neg_index, mode, info_nce, eps, temperature, need_grad, row_grad):
        negatives, neg_index = _kernel_arguments(teacher, negatives, neg_index, mode, False)
        loss, grad, norm_s, norm_x = extension_for(student.device).one_pass(
            student, teacher, negatives, neg_index, mode, info_nce, eps, temperature, need_grad, row_grad)
        ctx.save_for_backward(grad if need_grad else None, student)
        ctx.row_grad = row_grad
        ctx.mark_non_differentiable(norm_s, norm_x)
        ctx.set_materialize_grads(False)
        return (loss if loss.dtype == torch.float64 else loss.float()), norm_s, norm_x

    @staticmethod
    @single_backward
    def backward(ctx, grad_rows, *unused_grads):
        return (_scaled_saved_gradient(ctx, grad_rows, ctx.row_grad),) + (None,) * 9


def reduced_loss(problem: ContrastiveProblem) -> Optional[Tensor]:
    """The mean or sum of the rows in one kernel call (eager CPU calls where the one pass applies),
    or None: then ``row_losses`` and a reduction in torch, which also handle non-finite norms."""
    if torch.compiler.is_compiling() or not _one_pass_applies(problem):
        return None
    # No autocast guard: the extension is called directly, not through the dispatcher.
    extension = extension_for(problem.device)
    index = problem.neg_index.contiguous() if problem.mode.indexed else None
    arguments = (problem.student, problem.teacher, problem.negatives, index, int(problem.mode),
                 problem.loss == "info_nce", problem.eps, problem.temperature)
    if torch.is_grad_enabled() and problem.student.requires_grad:
        # One C++ autograd node (OnePassReducedFunction in csrc/cpu): G pre-scaled for the
        # reduction, so loss.backward() hands it on; a Python Function cost 0.11-0.14 ms more here.
        loss, finite = extension.one_pass_reduced_with_grad(*arguments, problem.reduction == "mean")
    else:
        loss, _, finite = extension.one_pass_reduced(*arguments, False, problem.reduction == "mean")
    return loss if finite else None


def _one_pass_applies(problem: ContrastiveProblem) -> bool:
    """CPU, and no gradient wanted but the student's."""
    return (problem.device.type == "cpu"
            and not problem.teacher.requires_grad
            and not (problem.negatives is not None and problem.negatives.requires_grad))


class NativeRowPrimitives:
    """The streaming primitives of the shared in-batch COS-NCE (``in_batch.RowPrimitives``)."""

    def __init__(self, acc_dtype: torch.dtype):
        self.acc_dtype = acc_dtype

    def row_stats(self, x, y):
        ss, dot, yy = torch.ops.lrc_kernels.partials(x, y, None, None, NO_NEGATIVES, False)
        return ss.sqrt(), yy[:, 0].sqrt(), dot[:, 0]

    def weighted_colsum(self, x, w):
        return torch.ops.lrc_kernels.weighted_colsum(x, w.to(self.acc_dtype).contiguous())

    def row_dot_vec(self, x, v):
        return torch.ops.lrc_kernels.row_dot_vec(x, v.contiguous())

    def row_combine(self, x, a, y, c, v, e, out_dtype):
        return torch.ops.lrc_kernels.row_combine(x, a.contiguous(), y, c.contiguous(), v.contiguous(),
                                                 e.contiguous(), out_dtype)


@torch.library.custom_op("lrc_kernels::in_batch_cos_nce", mutates_args=(), device_types=_DEVICES)
def in_batch_cos_nce(student: Tensor, teacher: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss [B], then u [D], |s|, |t|, c_pos, s.u [B] saved for the backward); see ``in_batch.py``."""
    loss, saved = in_batch_forward(student, teacher, eps, NativeRowPrimitives(compute_dtype(student, teacher)))
    return (loss, *saved)


@in_batch_cos_nce.register_fake
def _(student, teacher, eps):
    acc = compute_dtype(student, teacher)
    batch, dim = student.shape

    def rows():
        return student.new_empty(batch, dtype=acc)

    return rows(), student.new_empty(dim, dtype=acc), rows(), rows(), rows(), rows()


def _in_batch_setup_context(ctx, inputs, output):
    student, teacher, eps = inputs
    ctx.save_for_backward(student, teacher, *output[1:])
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # u [D] and the row statistics get no zero-filled gradients


@single_backward
def _in_batch_backward(ctx, grad_rows, *unused_grads):
    student, teacher, *saved = ctx.saved_tensors
    prims = NativeRowPrimitives(compute_dtype(student, teacher))
    grad_s, grad_t = in_batch_backward(student, teacher, saved, grad_rows, ctx.eps, *ctx.needs_input_grad[:2], prims)
    return grad_s, grad_t, None


in_batch_cos_nce.register_autograd(_in_batch_backward, setup_context=_in_batch_setup_context)


def _in_batch_info_nce(problem: ContrastiveProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row loss, |s|, |t|)."""
    dtype = compute_dtype(problem.student, problem.teacher)
    s, t = problem.student.to(dtype), problem.teacher.to(dtype)
    norm_s, norm_t = torch.linalg.vector_norm(s, dim=1), torch.linalg.vector_norm(t, dim=1)
    # Unit rows before the GEMM (B D work), not a [B, B] division after it: that division's
    # backward cost more than the GEMMs at B = 256, D = 768.
    unit_s = s / norm_s.clamp_min(problem.eps)[:, None]
    unit_t = t / norm_t.clamp_min(problem.eps)[:, None]
    logits = (unit_s @ unit_t.T) / problem.temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none"), norm_s, norm_t


def _native_row_losses(problem: ContrastiveProblem) -> tuple[torch.Tensor, tuple]:
    """(per-row losses, the row norms the kernels computed)."""
    mode = int(problem.mode)
    negatives = problem.negatives
    index = problem.neg_index.contiguous() if problem.mode.indexed else None
    check_index = torch.compiler.is_compiling()  # eager calls were range-checked by the validation layer
    if problem.mode == NegativeMode.IN_BATCH and not _one_pass_applies(problem):
        if problem.loss == "info_nce":
            rows, norm_s, norm_t = _in_batch_info_nce(problem)
            return rows, (norm_s, norm_t)
        rows, _, norm_s, norm_t, _, _ = torch.ops.lrc_kernels.in_batch_cos_nce(problem.student, problem.teacher,
                                                                              problem.eps)
        return rows, (norm_s, norm_t)
    if _one_pass_applies(problem):
        need_grad = torch.is_grad_enabled() and problem.student.requires_grad
        arguments = (problem.student, problem.teacher, negatives, index, mode, problem.loss == "info_nce",
                     problem.eps, problem.temperature, need_grad)
        if torch.compiler.is_compiling():
            rows, _, norm_s, norm_x = torch.ops.lrc_kernels.one_pass_loss(*arguments, check_index)
        else:
            rows, norm_s, norm_x = _OnePass.apply(*arguments, problem.row_grad)
        return rows, (norm_s, norm_x)
    rows, norm_s, norm_x, _ = torch.ops.lrc_kernels.gather_negatives_loss(
        problem.student, problem.teacher, negatives, index, mode, problem.loss == "info_nce", problem.eps,
        problem.temperature, check_index,
    )
    return rows, (norm_s, norm_x)


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses [B] (fp32, or fp64 for fp64 inputs) computed by the native kernels.

    The kernels accumulate squared norms in the accumulation dtype, which overflows for
    finite rows beyond about 1e19 in fp32. A non-finite norm (such a row, or a non-finite
    input) sends the call to the reference, which rescales rows first: the right cosine, or
    NaN for non-finite inputs. On CPU reading that flag costs nothing; on CUDA it would be a
    host sync per call, so there the kernels' NaN stands (never a silent wrong value).
    """
    with torch.autocast(problem.device.type, enabled=False):
        rows, (norm_s, norm_x) = _native_row_losses(problem)
        # One read: a NaN or Inf norm makes the sum non-finite (a finite sum past fp32's range
        # also sends the call to the reference, which is then only slower).
        if problem.device.type == "cpu" and not torch.compiler.is_compiling() and not math.isfinite(
                norm_s.sum().add_(norm_x.sum()).item()):
            from .. import reference

            return reference.row_losses(problem)
        return rows
