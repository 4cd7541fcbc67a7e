"""Distillation losses, registered by name: a stage's ``weights`` refer to these names.

A new loss is one decorated function here (or anywhere, before the run starts) and a
weight in the config; the trainer never changes. Each loss gets a :class:`LossInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lrc_kernels as lk

LOSSES: dict[str, Callable[["LossInputs"], torch.Tensor]] = {}


def register_loss(name: str, needs_representations: bool = False):
    """Register ``fn(LossInputs) -> scalar`` as ``name``; representation losses make the
    trainer compute the projected intermediate-layer representations."""
    def decorate(fn):
        fn.needs_representations = needs_representations
        LOSSES[name] = fn
        return fn

    return decorate


@dataclass
class LossInputs:
    student_logits: torch.Tensor  # [B, C] (or [B, 1] for regression), in the dataset's label order
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    student_reps: list  # per mapped layer: [B, F] student representations, projected to the teacher width
    teacher_reps: list  # per mapped layer: [B, F] teacher representations
    neg_index: Optional[torch.Tensor]  # [B, K] rows of the negative pool per sample; None: all others in the batch
    regression: bool
    temperature: float
    soft_t2: bool
    loss_backend: str
    negative_banks: Optional[list] = None  # per mapped layer: the pool neg_index points into; None: the batch


@register_loss("cos_nce", needs_representations=True)
def cos_nce(x: LossInputs) -> torch.Tensor:
    """Sum over mapped layers of COS-NCE; negatives are teacher rows of other samples (of the
    batch, the global batch, or the cached training set), never gathered into [B, K, F]."""
    banks = x.negative_banks or [None] * len(x.student_reps)
    return sum(lk.cos_nce_loss(s, t, bank, x.neg_index, backend=x.loss_backend)
               for s, t, bank in zip(x.student_reps, x.teacher_reps, banks))


@register_loss("hidden_mse", needs_representations=True)
def hidden_mse(x: LossInputs) -> torch.Tensor:
    """TinyBERT-style hidden-state loss (for ablations): MSE between the projected student
    representations and the teacher's, summed over mapped layers."""
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(x.student_reps, x.teacher_reps))


@register_loss("soft")
def soft(x: LossInputs) -> torch.Tensor:
    """KL(teacher || student) of the softened predictions at temperature T (MSE for regression).

    Not scaled by T^2 unless ``soft_loss_t2``: the paper's loss is the plain KL at T = 1.1,
    where T^2 = 1.21 would only rescale beta.
    """
    if x.regression:
        return F.mse_loss(x.student_logits.squeeze(-1).float(), x.teacher_logits.squeeze(-1).float())
    t = x.temperature
    kl = F.kl_div(F.log_softmax(x.student_logits.float() / t, -1), F.log_softmax(x.teacher_logits.float() / t, -1),
                  reduction="batchmean", log_target=True)
    return kl * t * t if x.soft_t2 else kl


@register_loss("hard")
def hard(x: LossInputs) -> torch.Tensor:
    """Cross-entropy with the gold labels (MSE for regression)."""
    if x.regression:
        return F.mse_loss(x.student_logits.squeeze(-1).float(), x.labels.float())
    return F.cross_entropy(x.student_logits.float(), x.labels)
