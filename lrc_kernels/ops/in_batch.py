"""In-batch COS-NCE in O(B D), shared by the fused backends.

With unit rows s^ = s / ns, t^ = t / nt and u = sum_j t^_j, the negatives of row b sum to
sum_{j != b} cos(s_b, t_j) = s^_b . (u - t^_b), exactly (the eps clamp is inside t^). So

    L_b = 2 - 1.5 c_b + 0.5 / K (s^_b . u - c_b) = 2 + s^_b . v_b,   v_b = a t^_b + beta u,

with K = B - 1, a = -1.5 - beta and beta = 0.5 / K. Gradients (go = upstream, m = unclamped):

    dL/ds_b = go_b / ns_b (v_b - (s^_b . v_b) m_s s^_b)
    dL/dt_j = 1 / nt_j (G_j - (t^_j . G_j) m_t t^_j),  G_j = go_j a s^_j + beta z,  z = sum_b go_b s^_b

A backend supplies four streaming primitives (see :class:`RowPrimitives`); the O(B)
scalar algebra here is plain torch.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ._autograd import single_backward


class RowPrimitives(Protocol):
    acc_dtype: torch.dtype

    def row_stats(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(|x_b|, |y_b|, x_b . y_b) per row, in acc_dtype."""

    def weighted_colsum(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_b w[b] x[b] -> [D], in acc_dtype."""

    def row_dot_vec(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x[b] . v -> [B], in acc_dtype."""

    def row_combine(self, x, a, y, c, v, e, out_dtype) -> torch.Tensor:
        """a[b] x[b] + c[b] y[b] + e[b] v -> [B, D] in out_dtype."""


def in_batch_forward(student, teacher, eps: float, prims: RowPrimitives):
    """(per-row loss, saved) with saved = (u, norm_s, norm_t, c_pos, su) for the backward."""
    batch = student.shape[0]
    norm_s, norm_t, dot_st = prims.row_stats(student, teacher)
    ns, nt = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
    u = prims.weighted_colsum(teacher, 1.0 / nt)
    su = prims.row_dot_vec(student, u)
    c_pos = dot_st / (ns * nt)
    loss = 2.0 - 1.5 * c_pos + 0.5 * (su / ns - c_pos) / (batch - 1)
    return (loss if loss.dtype == torch.float64 else loss.float()), (u, norm_s, norm_t, c_pos, su)


def in_batch_backward(student, teacher, saved, grad_rows, eps: float, need_s: bool, need_t: bool,
                      prims: RowPrimitives):
    """(grad_student or None, grad_teacher or None) from the forward's saved tensors."""
    u, norm_s, norm_t, c_pos, su = saved
    beta = 0.5 / (student.shape[0] - 1)
    a = -1.5 - beta
    go = grad_rows.to(u.dtype)
    ns, nt = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
    on_s, on_t = (norm_s >= eps).to(u.dtype), (norm_t >= eps).to(u.dtype)
    grad_s = grad_t = None
    if need_s:
        s_dot_v = a * c_pos + beta * su / ns
        grad_s = prims.row_combine(student, -go * s_dot_v * on_s / ns**2, teacher, go * a / (ns * nt),
                                   u, go * beta / ns, student.dtype)
    if need_t:
        z = prims.weighted_colsum(student, go / ns)
        t_dot_g = go * a * c_pos + beta * prims.row_dot_vec(teacher, z) / nt
        grad_t = prims.row_combine(teacher, -t_dot_g * on_t / nt**2, student, go * a / (ns * nt),
                                   z, beta / nt, teacher.dtype)
    return grad_s, grad_t


class InBatchCosNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, eps, prims: RowPrimitives):
        loss, saved = in_batch_forward(student, teacher, eps, prims)
        ctx.save_for_backward(student, teacher, *saved)
        ctx.eps, ctx.prims = eps, prims
        return loss

    @staticmethod
    @single_backward
    def backward(ctx, grad_rows):
        student, teacher, *saved = ctx.saved_tensors
        grad_s, grad_t = in_batch_backward(student, teacher, saved, grad_rows, ctx.eps,
                                           *ctx.needs_input_grad[:2], ctx.prims)
        return grad_s, grad_t, None, None
