"""Distillation losses, registered by name, each carrying its own settings (torchdistill style).

A loss is a dataclass of its settings with ``__call__(LossInputs)`` returning a scalar, or a
scalar and a dict of sub-parts (logged beside it, e.g. COS-NCE per layer). Register it with
``@register_loss("name")``; its settings and weights then come from the ``losses:`` section
of the YAML, with no trainer change:

    losses:
      cos_nce: {weight: [1, 1], backend: auto}
      soft:    {weight: [0, 1], temperature: 1.1}
      hard:    {weight: [0, 3]}

``weight`` is one number (every stage) or one per stage. A loss defined in another module is
loaded with ``plugins: [module.name]``. The older flags stay as shortcuts: ``--alpha``,
``--beta`` and ``--gamma`` set the weights of cos_nce, soft and hard; ``--temperature`` and
``soft_loss_t2`` set soft's ``temperature`` and ``t2``; ``--loss-backend`` sets cos_nce's
``backend``. A flag given on the command line wins over the YAML.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

import lrc_kernels as lk

LOSSES: dict[str, type] = {}

# Run-level settings that are shortcuts for a loss setting: field -> (loss, setting).
SETTING_SHORTCUTS = {"temperature": ("soft", "temperature"), "soft_loss_t2": ("soft", "t2"),
                     "loss_backend": ("cos_nce", "backend")}


def register_loss(name: str):
    """Register a loss class (a dataclass of its settings) under ``name``."""
    def decorate(cls):
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        cls.name = name
        LOSSES[name] = cls
        return cls

    return decorate


@dataclass
class LossInputs:
    student_logits: Optional[torch.Tensor]  # [B, C] (or [B, 1] for regression), in the dataset's label order
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    student_reps: list  # per mapped layer: [B, F] student representations, projected to the teacher width
    teacher_reps: list  # per mapped layer: [B, F] teacher representations
    neg_index: Optional[torch.Tensor]  # [B, K] rows of the negative pool per sample; None: all others in the batch
    regression: bool
    negative_banks: Optional[list] = None  # per mapped layer: the pool neg_index points into; None: the batch
    student_layers: Optional[list] = None  # hidden_states index of each representation's student layer (0: embeddings)


@register_loss("cos_nce")
@dataclass
class CosNCE:
    """Sum over mapped layers of COS-NCE (``lrc_kernels.cos_nce_loss``); negatives are teacher
    rows of other samples (of the batch, the global batch, or the cached training set), never
    gathered into [B, K, F]. Each layer's value is logged as ``cos_nce/layer{i}`` (i = the student
    layer; 0 = the embeddings, when they are mapped)."""

    backend: str = "auto"
    needs_representations: ClassVar[bool] = True

    def __post_init__(self):
        if self.backend not in lk.backend_names():
            raise ValueError(f"backend must be one of {lk.backend_names()}, got {self.backend!r}")

    def __call__(self, x: LossInputs):
        banks = x.negative_banks or [None] * len(x.student_reps)
        per_layer = [lk.cos_nce_loss(s, t, bank, x.neg_index, backend=self.backend)
                     for s, t, bank in zip(x.student_reps, x.teacher_reps, banks)]
        layers = x.student_layers or range(1, len(per_layer) + 1)
        return sum(per_layer), {f"cos_nce/layer{i}": v for i, v in zip(layers, per_layer)}


@register_loss("hidden_mse")
@dataclass
class HiddenMSE:
    """TinyBERT-style hidden-state loss (for ablations): MSE between the projected student
    representations and the teacher's, summed over mapped layers."""

    needs_representations: ClassVar[bool] = True

    def __call__(self, x: LossInputs) -> torch.Tensor:
        return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(x.student_reps, x.teacher_reps))


@register_loss("soft")
@dataclass
class Soft:
    """KL(teacher || student) of the softened predictions at ``temperature`` (MSE for regression).

    Not scaled by T^2 unless ``t2``: the paper's loss is the plain KL at T = 1.1, where
    T^2 = 1.21 would only rescale beta.
    """

    temperature: float = 1.1
    t2: bool = False
    needs_representations: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.regression:
            return F.mse_loss(x.student_logits.squeeze(-1).float(), x.teacher_logits.squeeze(-1).float())
        t = self.temperature
        kl = F.kl_div(F.log_softmax(x.student_logits.float() / t, -1),
                      F.log_softmax(x.teacher_logits.float() / t, -1), reduction="batchmean", log_target=True)
        return kl * t * t if self.t2 else kl


@register_loss("hard")
@dataclass
class Hard:
    """Cross-entropy with the gold labels (MSE for regression)."""

    needs_representations: ClassVar[bool] = False

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.regression:
            return F.mse_loss(x.student_logits.squeeze(-1).float(), x.labels.float())
        return F.cross_entropy(x.student_logits.float(), x.labels)


def import_plugins(modules) -> None:
    """Import the modules named in ``plugins:`` so that their ``@register_loss`` runs."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"plugins: cannot import {module!r} ({exc}); is it on PYTHONPATH?") from None


def loss_settings(cfg, name: str) -> dict:
    """A loss's settings for a run: its shortcut fields, then the ``losses:`` section (no weight)."""
    settings = {key: getattr(cfg, field) for field, (loss, key) in SETTING_SHORTCUTS.items() if loss == name}
    settings.update({k: v for k, v in ((cfg.losses or {}).get(name) or {}).items() if k != "weight"})
    return settings


def build_losses(cfg, names) -> dict:
    """{name: the loss object with this run's settings}; unknown names or settings are named."""
    import_plugins(cfg.plugins)
    out = {}
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)} (a loss from another module "
                             "needs `plugins: [module]` in the config)")
        cls = LOSSES[name]
        settings = loss_settings(cfg, name)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"losses.{name}: unknown settings {unknown}; {name} takes {valid + ['weight']}")
        try:
            out[name] = cls(**settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"losses.{name}: {exc}") from None
    return out
