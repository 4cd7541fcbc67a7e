r"""The public functional API: ``cos_nce_loss`` and ``info_nce_loss``; the math, written once.

Every row b has a student s, a teacher t (its positive, x_0 = t) and negatives x_1..x_K, all
flattened to length D. With ns = max(|s|, eps), nx_j = max(|x_j|, eps) (the per-vector clamp
of ``F.cosine_similarity``) and c_j = cos(s, x_j) = s.x_j / (ns nx_j):

    COS-NCE (LRC-BERT, Fu et al. 2021), with g = 1 - cos:
        L_b = g(t, s) + 1/(2K) sum_k [2 - (g(n_k, s) - g(t, s))]  =  2 - 1.5 c_0 + 0.5 mean_k c_k
    cosine InfoNCE at temperature tau:
        L_b = logsumexp_j(c_j / tau) - c_0 / tau

With w_j = dL/dc_j (COS-NCE: w_0 = -1.5, w_k = 0.5 / K; InfoNCE: w_j = (p_j - [j = 0]) / tau,
p = softmax(c / tau)) and m = 1 where a norm is not clamped (0 where it is):

    dL/ds   = sum_j w_j x_j / (ns nx_j)  -  (sum_j w_j c_j) m_s s / ns^2
    dL/dx_j = w_j (s / (ns nx_j)  -  c_j m_j x_j / nx_j^2)

In-batch COS-NCE (x_k = the other teacher rows) needs only O(B D) work:
sum_{j != b} c_bj = s_b / ns_b . (u - t_b / nt_b) with u = sum_j t_j / nt_j.

Negative modes: in-batch (K = B - 1), explicit [B, K, *features], and indexed: ``neg_index``
[B, K] into a bank [N, *features] or into the teacher rows. Every backend implements these
formulas; ``reference.py`` states them in plain PyTorch and is the spec the tests compare with.
"""

from __future__ import annotations

import torch

from . import backends
from ._validation import check_options, prepare_problem


def _contrastive_loss(loss, student, teacher, negatives, neg_index, reduction, eps, temperature, backend):
    fast = None if torch.compiler.is_compiling() else backends.eager_fast_path(backend)
    if fast is not None:  # checks its arguments itself; None where they need the path below
        reduced = fast(loss, student, teacher, negatives, neg_index, reduction, eps, temperature)
        if reduced is not None:
            return reduced
    eps, temperature = check_options(reduction, eps, temperature)
    backends.check_backend_name(backend)
    problem = prepare_problem(
        loss, student, teacher, negatives, neg_index, eps=eps, temperature=temperature
    )
    problem.reduction = reduction
    return backends.resolve(backend, problem.device)(problem)


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
    r"""COS-NCE, the contrastive loss of LRC-BERT (Fu et al., AAAI 2021); the formula is in
    this module's docstring: L_b = 2 - 1.5 cos(s, t) + 0.5 mean_k cos(s, n_k).

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
    r"""Cosine InfoNCE at temperature tau (formula in this module's docstring).

    The arguments, negative modes and return value are those of :func:`cos_nce_loss`;
    ``temperature`` must be > 0.
    """
    return _contrastive_loss(
        "info_nce", student, teacher, negatives, neg_index, reduction, eps, temperature, backend
    )
