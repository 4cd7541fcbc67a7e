"""Thin ``nn.Module`` wrappers that hold the keyword options of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from ._validation import check_options
from .functional import cos_nce_loss, info_nce_loss


class CosNCELoss(nn.Module):
    """Module form of :func:`lrc_kernels.cos_nce_loss`; options are checked at construction."""

    def __init__(self, *, reduction: str = "mean", eps: float = 1e-8, backend: str = "auto"):
        super().__init__()
        _check_options(reduction, eps, 1.0, backend)
        self.reduction, self.eps, self.backend = reduction, eps, backend

    def forward(self, student, teacher, negatives=None, neg_index=None) -> torch.Tensor:
        return cos_nce_loss(
            student, teacher, negatives, neg_index, reduction=self.reduction, eps=self.eps, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}, backend={self.backend!r}"


class InfoNCELoss(nn.Module):
    """Module form of :func:`lrc_kernels.info_nce_loss`; options are checked at construction."""

    def __init__(
        self, *, temperature: float = 0.1, reduction: str = "mean", eps: float = 1e-8, backend: str = "auto"
    ):
        super().__init__()
        _check_options(reduction, eps, temperature, backend)
        self.temperature, self.reduction, self.eps, self.backend = temperature, reduction, eps, backend

    def forward(self, student, teacher, negatives=None, neg_index=None) -> torch.Tensor:
        return info_nce_loss(
            student, teacher, negatives, neg_index, temperature=self.temperature,
            reduction=self.reduction, eps=self.eps, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, eps={self.eps}, "
            f"backend={self.backend!r}"
        )


def _check_options(reduction, eps, temperature, backend) -> None:
    """Fail at construction, not at the first training step."""
    check_options(reduction, eps, temperature)
    backends.check_backend_name(backend)
