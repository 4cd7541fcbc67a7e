"""Autograd helpers shared by the fused backends."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

DOUBLE_BACKWARD_MESSAGE = (
    b"lrc_kernels: the fused backends do not support double backward (differentiate twice); "
    b"use backend='torch' for higher-order gradients"
)


def single_backward(backward):
    """Like ``once_differentiable``, but also guards when only the saved inputs require grad.

    The loss's incoming gradient is usually a constant, so ``once_differentiable`` would let
    ``create_graph=True`` return gradients with no history: a silent wrong answer for a
    gradient penalty. Here any attempt to differentiate the returned gradients raises.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled() or not any(ctx.needs_input_grad):
            return grads
        tensors = [g for g in grads if isinstance(g, torch.Tensor)]
        if not tensors:
            return grads
        err_fn = _functions.DelayedError(DOUBLE_BACKWARD_MESSAGE, len(tensors))
        guarded = iter(err_fn(*[g.detach().requires_grad_() for g in tensors]))
        return tuple(next(guarded) if isinstance(g, torch.Tensor) else g for g in grads)

    return wrapper
