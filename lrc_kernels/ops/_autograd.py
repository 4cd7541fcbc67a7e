"""Autograd helpers shared by the fused backends."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

DOUBLE_BACKWARD_MESSAGE = (  # its twin for the CPU C++ node: kDoubleBackwardMessage in csrc/cpu
    b"lrc_kernels: the fused backends do not support double backward (differentiate twice); "
    b"use backend='torch' for higher-order gradients"
)


def single_backward(backward):
    """Like ``once_differentiable``, but also guards when only the saved inputs require grad.

    The loss's incoming gradient is usually a constant, so ``once_differentiable`` would let
    ``create_graph=True`` return gradients with no history: a silent wrong answer for a
    gradient penalty. Here the returned gradients hang off one error node whose inputs are
    the gradients *and* every saved tensor that requires grad, so differentiating them with
    respect to anything the loss used (student, teacher, negatives) raises, instead of
    reporting that input as unused (``None``).
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        differentiable = torch.is_grad_enabled()
        # Read before the backward runs: a backward may update a saved buffer in place (one pass).
        used = [x for x in ctx.saved_tensors if isinstance(x, torch.Tensor) and x.requires_grad] \
            if differentiable else []
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not differentiable:
            return grads
        tensors = [g for g in grads if isinstance(g, torch.Tensor)]
        if not tensors:
            return grads
        used += [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.requires_grad]
        err_fn = _functions.DelayedError(DOUBLE_BACKWARD_MESSAGE, len(tensors) + len(used))
        outputs = err_fn(*[g.detach().requires_grad_() for g in tensors], *used)
        if isinstance(outputs, torch.Tensor):  # one input: the node returns a bare tensor, not a tuple
            outputs = (outputs,)
        guarded = iter(outputs[:len(tensors)])
        return tuple(next(guarded) if isinstance(g, torch.Tensor) else g for g in grads)

    return wrapper
