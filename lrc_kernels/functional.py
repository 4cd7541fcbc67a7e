"""The public functional API: ``cos_nce_loss`` and ``info_nce_loss``."""

from __future__ import annotations

import torch

from . import backends
from ._validation import check_options, prepare_problem


def _contrastive_loss(loss, student, teacher, negatives, neg_index, reduction, eps, temperature, backend):
    eps, temperature = check_options(reduction, eps, temperature)
    backends.check_backend_name(backend)
    problem = prepare_problem(
        loss, student, teacher, negatives, neg_index, eps=eps, temperature=temperature
    )
    rows = backends.resolve(backend, problem.device)(problem)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def cos_nce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    negatives: torch.Tensor | None = None,
    neg_index: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    r"""COS-NCE, the contrastive loss of LRC-BERT (Fu et al., AAAI 2021).

    For row b with student s, teacher (positive) t and negatives n_1..n_K, all flattened
    to length D, and g(x, y) = 1 - cos(x, y) with
    cos(x, y) = x.y / (max(|x|, eps) max(|y|, eps)):

        L_b = g(t, s) + 1/(2K) * sum_k [2 - (g(n_k, s) - g(t, s))]

    Args:
        student, teacher: ``[B, *features]``, same shape; each row is flattened to D.
        negatives: ``[B, K, *features]`` explicit negatives, or with ``neg_index`` a bank
            ``[N, *features]``. With both left ``None``, the negatives of row b are every
            other teacher row (K = B - 1, needs B >= 2).
        neg_index: integer ``[B, K]``: rows of ``negatives`` (or of ``teacher`` when
            ``negatives`` is None) to use as the negatives of each row. Gathered inside
            the kernels; no ``[B, K, D]`` copy is made.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (returns ``[B]``).
        eps: the clamp applied to each norm separately, as in ``F.cosine_similarity``.
        backend: ``"auto"``, ``"torch"`` (the reference) or ``"triton"``.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs). Gradients flow to every input that
        requires them, in that input's dtype. Non-finite inputs give a NaN loss.
    """
    return _contrastive_loss("cos_nce", student, teacher, negatives, neg_index, reduction, eps, 1.0, backend)


def info_nce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    negatives: torch.Tensor | None = None,
    neg_index: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Cosine InfoNCE with temperature tau:

        L_b = -log( exp(cos(s, t)/tau) / (exp(cos(s, t)/tau) + sum_k exp(cos(s, n_k)/tau)) )

    The arguments, negative modes and return value are those of :func:`cos_nce_loss`;
    ``temperature`` must be > 0.
    """
    return _contrastive_loss(
        "info_nce", student, teacher, negatives, neg_index, reduction, eps, temperature, backend
    )
