"""The ``torch`` backend: the spec in plain, differentiable PyTorch.

Every fast backend is tested against this file run in float64. It favours
readability over memory: indexed mode gathers a ``[B, K, D]`` tensor.
"""

from __future__ import annotations

import torch

from ._validation import ContrastiveProblem, NegativeMode


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32: low precision always accumulates in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def unit_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(||x||, eps) along the last dim, the per-vector clamp of ``F.cosine_similarity``.

    Computed on x / max|x| so that a finite row whose squared norm overflows (fp32 at 1e20)
    still gives its direction: x / max(||x||, eps) = y / max(||y||, eps / a) with y = x / a.
    The scale a is detached; the function does not depend on it, so neither does its gradient.
    """
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    y = x / scale
    return y / torch.maximum(torch.linalg.vector_norm(y, dim=-1, keepdim=True), eps / scale)


def loss_from_cosines(loss: str, pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row loss from the positive cosines ``[B]`` and negative cosines ``[B, K]``."""
    if loss == "cos_nce":
        # L = g(t, s) + 1/(2K) * sum_k [2 - (g(n_k, s) - g(t, s))], with g = 1 - cos.
        g_pos, g_neg = 1.0 - pos, 1.0 - neg
        return g_pos + (2.0 - (g_neg - g_pos[:, None])).sum(dim=1) / (2 * neg.shape[1])
    logits = torch.cat([pos[:, None], neg], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def row_losses(problem: ContrastiveProblem) -> torch.Tensor:
    """Per-row losses ``[B]`` in fp32 (fp64 for fp64 inputs); autograd gives the gradients."""
    dtype = compute_dtype(problem.student, problem.teacher, problem.negatives)
    with torch.autocast(problem.device.type, enabled=False):
        s = unit_rows(problem.student.to(dtype), problem.eps)
        t = unit_rows(problem.teacher.to(dtype), problem.eps)
        pos = (s * t).sum(dim=1)
        if problem.mode == NegativeMode.IN_BATCH:
            cos = s @ t.T  # cos[b, j] = cos(s_b, t_j); the negatives of b are j != b
            b = problem.batch  # drop the diagonal by reshaping (a boolean mask would sync with the host)
            neg = cos.flatten()[1:].view(b - 1, b + 1)[:, :-1].reshape(b, b - 1)
        else:
            if problem.mode == NegativeMode.EXPLICIT:
                n = problem.negatives
            else:
                bank = problem.teacher if problem.mode == NegativeMode.TEACHER_BANK else problem.negatives
                n = bank[problem.neg_index]
            neg = torch.einsum("bd,bkd->bk", s, unit_rows(n.to(dtype), problem.eps))
        return loss_from_cosines(problem.loss, pos, neg, problem.temperature)
