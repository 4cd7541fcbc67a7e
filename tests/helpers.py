"""Input factories and float64-reference comparisons shared by the tests."""

from __future__ import annotations

import torch

import lrc_kernels as lk

MODES = ("in_batch", "explicit", "bank", "teacher_bank")
LOSSES = {"cos_nce": lk.cos_nce_loss, "info_nce": lk.info_nce_loss}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_inputs(mode, batch, num_neg, features, dtype=torch.float32, device="cpu", generator=None,
                bank_rows=None, requires_grad=True):
    """(student, teacher, negatives, neg_index) for a negative mode, all requiring grad."""
    def rand(*shape):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    student, teacher = rand(batch, *features), rand(batch, *features)
    negatives = neg_index = None
    if mode == "explicit":
        negatives = rand(batch, num_neg, *features)
    elif mode == "bank":
        rows = bank_rows or num_neg + 3
        negatives = rand(rows, *features)
        neg_index = torch.randint(0, rows, (batch, num_neg), generator=generator).to(device)
    elif mode == "teacher_bank":
        neg_index = torch.randint(0, batch, (batch, num_neg), generator=generator).to(device)
    return student, teacher, negatives, neg_index


def loss_and_grads(loss, inputs, weights, **kwargs):
    """Per-row losses and the grads of sum(weights * losses) w.r.t. every float input."""
    tensors = [x for x in inputs if x is not None and x.is_floating_point()]
    for x in tensors:
        x.grad = None
    rows = LOSSES[loss](*inputs, reduction="none", **kwargs)
    (rows * weights.to(rows)).sum().backward()
    return rows.detach(), [x.grad for x in tensors]


def as_float64(inputs):
    return [None if x is None else (x.detach().double().requires_grad_() if x.is_floating_point() else x)
            for x in inputs]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| / max(max |expected|, floor); NaN anywhere counts as inf."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()


def gradient_error(grad: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, dim: int, eps: float) -> float:
    """Row-wise error of a gradient, relative to the scale of the terms that build it.

    d cos(s, x)/ds is a difference of terms of size 1/|s|, which cancel exactly when, say,
    D = 1; so each length-``dim`` row's error is measured against
    max(|expected row|, 1/max(|x row|, eps)).
    """
    if not torch.isfinite(grad).all():
        return float("inf")
    g, e = grad.double().reshape(-1, dim), expected.double().reshape(-1, dim)
    norms = x.detach().double().reshape(-1, dim).norm(dim=1)
    scale = torch.maximum(e.abs().amax(dim=1), 1.0 / norms.clamp_min(eps))
    return ((g - e).abs().amax(dim=1) / scale).max().item()


def check_against_float64(loss, inputs, backend, **kwargs):
    """Compare a backend's loss and every gradient with the torch backend run in float64."""
    dtype = inputs[0].dtype
    weights = torch.rand(inputs[0].shape[0], dtype=torch.float64) + 0.5
    rows, grads = loss_and_grads(loss, inputs, weights.to(inputs[0].device), backend=backend, **kwargs)
    ref_rows, ref_grads = loss_and_grads(loss, as_float64(inputs), weights.to(inputs[0].device),
                                         backend="torch", **kwargs)
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOLERANCE[dtype]
    # Losses are differences of O(1) terms (InfoNCE: logsumexp - z_pos), so measure against max(|L|, 1).
    assert relative_error(rows, ref_rows, floor=1.0) < tol, (rows, ref_rows)
    for x, g, ref in zip([x for x in inputs if x is not None and x.is_floating_point()], grads, ref_grads):
        assert g is not None and g.dtype == x.dtype and g.shape == x.shape
        err = gradient_error(g, ref, x, inputs[0][0].numel(), kwargs.get("eps", 1e-8))
        assert err < tol, f"gradient error {err:.3g} >= {tol} for input of shape {tuple(x.shape)}"
