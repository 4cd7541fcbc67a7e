"""The LRC-BERT loss as a module any training loop can use (an HF ``Trainer``, Accelerate, a
plain loop), and the gradient-perturbation helper. ``lrc-bert distill`` uses both itself.

    criterion = LRCDistillationLoss(teacher.config, student.config, total_steps=10_000)
    optimizer = torch.optim.AdamW([*student.parameters(), *criterion.parameters()])  # the projections
    perturbation = EmbeddingPerturbation(student.base_model.embeddings)
    for step, batch in enumerate(loader):
        with torch.no_grad():
            t = teacher(**inputs, output_hidden_states=True)

        def loss():
            s = student(**inputs, output_hidden_states=True)
            return criterion(s, t, inputs["attention_mask"], labels, step=step).loss

        clean, perturbed = perturbation.losses(loss, eps=1.0)
        perturbed.backward()          # "replace", the paper; "add" (FGM): (clean + perturbed).backward()

The loss is ``sum_stage-weights`` of the registered losses (``losses.py``): COS-NCE between the
projected student layers and their mapped teacher layers (``lrc_kernels.cos_nce_loss``, with
in-batch, sampled or other-label negatives), the soft KL at T = 1.1 and the hard cross-entropy,
in the paper's two stages (1:0:0 for the first 80% of steps, then 1:1:3) unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .config import TrainConfig, check_loss_plan
from .losses import LossInputs
from .modeling import representation, uniform_layer_map
from .negatives import sample_in_batch, sample_other_label


@dataclass
class LRCLossOutput:
    loss: torch.Tensor  # the weighted total, differentiable
    parts: dict = field(default_factory=dict)  # every loss and sub-part (cos_nce/layer{i}), detached
    stage: int = 1  # 1-based stage of the step


def stage_index(plan: list, step: int, total_steps: int) -> int:
    """0-based stage of a 0-based step: stage s covers its fraction of the total steps."""
    edge = 0.0
    for index, stage in enumerate(plan):
        edge += stage["fraction"]
        if step < round(edge * total_steps):
            return index
    return len(plan) - 1


def weighted_losses(losses: dict, weights: dict, x: LossInputs) -> tuple[torch.Tensor, dict]:
    """(sum of weight x loss, {part: detached value}); a loss may add sub-parts (per layer)."""
    parts, values = {}, {}
    for name, loss in losses.items():
        out = loss(x)
        value, extra = out if isinstance(out, tuple) else (out, {})
        values[name] = value
        parts[name] = value.detach()
        parts.update({k: v.detach() for k, v in extra.items()})
    total = sum(weights[name] * value for name, value in values.items())
    return total, parts


class LRCDistillationLoss(nn.Module):
    """COS-NCE on mapped layers plus the prediction losses, staged, with the trained projections.

    Args:
        teacher_config, student_config: the Hugging Face configs (``num_hidden_layers``, ``hidden_size``).
        layer_map: teacher layer (1-based) per student layer; default ceil(i N / M).
        representation: ``"sequence"`` (the whole layer, padding masked by the attention mask;
            the paper) or ``"cls"``.
        losses: the ``losses:`` section (weights per stage and settings; ``losses.py``).
        stage1_fraction: the fraction of steps in stage 1 (the paper: 0.8).
        total_steps: the run's length, to place a step in its stage.
        num_negatives: K negatives sampled per row; default all B - 1 others in the batch.
        negatives: ``"any"`` other row, or ``"other-label"`` rows only (``negatives.py``).
        regression: the task is a regression (soft and hard become MSE).
        config: a whole ``TrainConfig`` instead of the keyword settings above (the trainer's way).
    """

    def __init__(self, teacher_config, student_config, layer_map: Optional[list] = None,
                 representation: str = "sequence", *, losses: Optional[dict] = None, stage1_fraction: float = 0.8,
                 total_steps: Optional[int] = None, num_negatives: Optional[int] = None, negatives: str = "any",
                 regression: bool = False, plugins: Optional[list] = None, seed: int = 0,
                 config: Optional[TrainConfig] = None):
        super().__init__()
        cfg = config or TrainConfig(losses=losses, stage1_fraction=stage1_fraction, num_negatives=num_negatives,
                                    negatives=negatives, representation=representation, plugins=plugins,
                                    layer_map=layer_map, seed=seed)
        if cfg.representation not in ("sequence", "cls"):
            raise ValueError(f"representation must be 'sequence' or 'cls', got {cfg.representation!r}")
        if cfg.negatives not in ("any", "other-label"):
            raise ValueError(f"negatives must be 'any' or 'other-label', got {cfg.negatives!r}")
        self.plan, self.losses = check_loss_plan(cfg)
        self.cfg, self.regression, self.total_steps = cfg, regression, total_steps
        n_t, n_s = teacher_config.num_hidden_layers, student_config.num_hidden_layers
        self.layer_map = list(cfg.layer_map) if cfg.layer_map is not None else uniform_layer_map(n_s, n_t)
        if len(self.layer_map) != n_s or not all(1 <= t <= n_t for t in self.layer_map):
            raise ValueError(f"layer_map must give one teacher layer in 1..{n_t} for each of the {n_s} student "
                             f"layers, got {self.layer_map}")
        # (student, teacher) indices into hidden_states: student layer i -> its mapped teacher layer,
        # and with map_embeddings the embedding outputs (0 -> 0) first.
        self.pairs = [(0, 0)] * bool(cfg.map_embeddings) + [(i + 1, t) for i, t in enumerate(self.layer_map)]
        self.projections = nn.ModuleList(nn.Linear(student_config.hidden_size, teacher_config.hidden_size)
                                         for _ in self.pairs)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.fallback_rows = 0  # other-label rows that found no other class in their batch

    # ------------------------------------------------------------------ schedule

    def stage_at(self, step: Optional[int]) -> int:
        """0-based stage of a 0-based step."""
        if len({tuple(sorted(s["weights"].items())) for s in self.plan}) == 1:
            return 0  # one set of weights: the step does not matter
        if step is None or self.total_steps is None:
            raise ValueError("the stages' weights differ: pass step=... and construct with total_steps=...")
        return stage_index(self.plan, step, self.total_steps)

    def weights_at(self, step: Optional[int]) -> dict:
        return self.plan[self.stage_at(step)]["weights"]

    def active(self, weights: dict) -> dict:
        return {name: self.losses[name] for name, w in weights.items() if w > 0}

    def needs(self, weights: dict) -> tuple[bool, bool]:
        """(logits, representations): what the stage's losses read."""
        active = self.active(weights).values()
        return any(not loss.needs_representations for loss in active), any(loss.needs_representations for loss in active)

    # ------------------------------------------------------------------ pieces

    def project(self, student_hidden_states) -> list:
        """The mapped student layers (``hidden_states`` by ``pairs``), projected to the teacher's width."""
        return [proj(student_hidden_states[s]) for (s, _), proj in zip(self.pairs, self.projections)]

    def teacher_layers(self, teacher_hidden_states) -> list:
        return [teacher_hidden_states[t] for _, t in self.pairs]

    def sample_negatives(self, labels: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
        """neg_index [rows, K] on the host, or None for all other rows of the batch."""
        k = min(self.cfg.num_negatives or rows - 1, rows - 1) if self.cfg.negatives == "any" \
            else (self.cfg.num_negatives or rows - 1)
        if self.cfg.negatives == "other-label":
            if labels is None:
                raise ValueError("negatives 'other-label' needs the labels")
            index, fallback = sample_other_label(labels, k, self.generator)
            self.fallback_rows += fallback
            return index
        return None if self.cfg.num_negatives is None else sample_in_batch(rows, k, self.generator)

    def combine(self, weights: dict, student_logits, teacher_logits, labels, student_reps: list, teacher_reps: list,
                neg_index: Optional[torch.Tensor], banks: Optional[list] = None) -> tuple[torch.Tensor, dict]:
        """The weighted loss from representations [B, F] already taken (the trainer's entry)."""
        x = LossInputs(student_logits, teacher_logits, labels, student_reps, teacher_reps, neg_index,
                       self.regression, banks, [s for s, _ in self.pairs])
        return weighted_losses(self.active(weights), weights, x)

    # ------------------------------------------------------------------ the whole loss

    def forward(self, student_outputs, teacher_outputs, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None, step: Optional[int] = None,
                neg_index: Optional[torch.Tensor] = None) -> LRCLossOutput:
        """The loss of one batch from the two models' outputs (run with ``output_hidden_states=True``).

        ``labels`` are needed by the hard loss and by other-label negatives; ``neg_index`` [B, K]
        overrides the sampled negatives.
        """
        stage = self.stage_at(step)
        weights = self.plan[stage]["weights"]
        need_logits, need_reps = self.needs(weights)
        s_reps = t_reps = []
        if need_reps:
            kind = self.cfg.representation
            s_reps = [representation(h, attention_mask, kind) for h in self.project(student_outputs.hidden_states)]
            t_reps = [representation(h, attention_mask, kind).to(s.dtype).detach()
                      for h, s in zip(self.teacher_layers(teacher_outputs.hidden_states), s_reps)]
            if neg_index is None:
                neg_index = self.sample_negatives(labels, attention_mask.shape[0])
            if neg_index is not None:
                neg_index = neg_index.to(attention_mask.device)
        student_logits = student_outputs.logits if need_logits else None
        teacher_logits = teacher_outputs.logits.detach() if need_logits else None
        total, parts = self.combine(weights, student_logits, teacher_logits, labels, s_reps, t_reps, neg_index)
        return LRCLossOutput(total, parts, stage + 1)


class EmbeddingPerturbation:
    """Gradient perturbation of a model's embedding output (LRC-BERT's training architecture).

    One persistent forward hook adds ``delta`` to the embedding module's output (so a compiled
    model keeps its graphs; no hook is added per step). ``losses(clean, eps)`` runs the loss
    twice: once with a zero probe added, whose gradient is g = dL/de, and once at
    e + eps g / ||g|| (per example). It returns (clean loss, perturbed loss): backpropagate the
    perturbed one ("replace", the paper) or both ("add", FGM-style).
    """

    _PROBE = object()  # delta's value while the clean pass should add a fresh zero probe

    def __init__(self, embeddings: nn.Module):
        self.delta = None
        self.probe: Optional[torch.Tensor] = None
        embeddings.register_forward_hook(self._add_delta)

    def _add_delta(self, module, inputs, output):
        if self.delta is None:
            return output
        if self.delta is self._PROBE:
            self.probe = torch.zeros(output.shape, device=output.device, requires_grad=True)
            return output + self.probe.to(output.dtype)
        return output + self.delta.to(output.dtype)

    def losses(self, clean: Callable[[], torch.Tensor], eps: float, mode: str = "replace",
               perturbed: Optional[Callable[[], torch.Tensor]] = None, grad: Optional[Callable] = None,
               backward: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean loss, loss at the perturbed embeddings).

        ``clean`` / ``perturbed`` compute the loss (the same callable by default; the trainer
        runs the second through DDP). ``grad(loss, x, retain)`` takes dL/dx (the trainer's
        scales the loss for fp16); only the direction of g is used. With ``mode="add"``, either
        ``backward(clean_loss)`` runs here (the clean gradient accumulates; backpropagate the
        perturbed loss after) or, without it, the clean graph is kept for the caller's
        backward of both.
        """
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
        grad = grad or (lambda loss, x, retain: torch.autograd.grad(loss, x, retain_graph=retain)[0])
        try:
            self.delta = self._PROBE
            clean_loss = clean()
            if self.probe is None:
                raise RuntimeError("the loss never ran the embedding module this perturbation hooks")
            if mode == "add" and backward is not None:
                backward(clean_loss)
                g = self.probe.grad
            else:
                g = grad(clean_loss, self.probe, mode == "add")
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
            self.delta = (eps * g / norm).detach()
            perturbed_loss = (perturbed or clean)()
        finally:
            self.delta, self.probe = None, None
        return clean_loss, perturbed_loss
