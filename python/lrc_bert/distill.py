"""``lrc-bert distill``: the whole LRC-BERT method.

* Student: by default a random-init ``BertConfig`` with 4 layers, width 312, 12 heads,
  FFN 1200 and the teacher's vocabulary; or a config JSON, or a pretrained student.
* Layer map: student layer i (1..M) -> teacher layer ceil(i N / M), or an explicit list.
* Representations: ``sequence`` (the whole layer output [B, L, d], padding zeroed by the
  attention mask, flattened) or ``cls`` (the first token). One trained
  ``nn.Linear(d_student, d_teacher)`` per mapped layer; the projections are optimised and
  checkpointed, and left out of the exported student.
* Loss: L = sum over the stage's registered losses of weight * loss (``losses.py``);
  by default stage 1 (80% of steps) is 1:0:0 and stage 2 is 1:1:3 over cos_nce:soft:hard.
  COS-NCE negatives are the teacher rows of the other samples in the batch (all B - 1,
  or K sampled per row through ``neg_index``).
* Gradient perturbation: g = dL/de at the student's embedding output e;
  e' = e + eps g / ||g|| (per example); the step uses the gradient of L at e'
  ("replace", the paper) or the sum of both gradients ("add", FGM-style).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import atomic_directory
from .config import TrainConfig
from .data import model_inputs
from .finetune import label_kwargs
from .losses import LOSSES, LossInputs
from .tasks import TaskSpec, label_alignment
from .trainer import decay_groups

log = logging.getLogger("lrc_bert")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (1-based) -> teacher layer ceil(i N / M)."""
    return [math.ceil(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


def build_student(cfg: TrainConfig, teacher_config, task: TaskSpec):
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    labels = label_kwargs(task)
    if cfg.student_init:
        return AutoModelForSequenceClassification.from_pretrained(cfg.student_init, **labels)
    if cfg.student_config:
        import json

        values = json.loads(Path(cfg.student_config).read_text())
        values.update(labels)
        config = AutoConfig.for_model(**values) if "model_type" in values else BertConfig(**values)
    else:
        config = BertConfig(
            vocab_size=teacher_config.vocab_size, hidden_size=cfg.student_hidden,
            num_hidden_layers=cfg.student_layers, num_attention_heads=cfg.student_heads,
            intermediate_size=cfg.student_intermediate,
            max_position_embeddings=teacher_config.max_position_embeddings,
            type_vocab_size=getattr(teacher_config, "type_vocab_size", 2),
            pad_token_id=getattr(teacher_config, "pad_token_id", 0), **labels)
    if config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"the student's vocabulary ({config.vocab_size}) must be the teacher's "
                         f"({teacher_config.vocab_size}): both read the teacher's tokenisation")
    return AutoModelForSequenceClassification.from_config(config)


class DistillMethod:
    def __init__(self, cfg: TrainConfig, task: TaskSpec, teacher, tokenizer, device: torch.device):
        self.cfg, self.task, self.tokenizer, self.device = cfg, task, tokenizer, device
        self.alignment = label_alignment(task, teacher.config.id2label, cfg.assume_label_order)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = build_student(cfg, teacher.config, task).to(device)
        n_t, n_s = teacher.config.num_hidden_layers, self.student.config.num_hidden_layers
        self.layer_map = list(cfg.layer_map) if cfg.layer_map is not None else uniform_layer_map(n_s, n_t)
        if len(self.layer_map) != n_s or not all(1 <= t <= n_t for t in self.layer_map):
            raise ValueError(f"layer_map must give one teacher layer in 1..{n_t} for each of the {n_s} student "
                             f"layers, got {self.layer_map}")
        d_s, d_t = self.student.config.hidden_size, teacher.config.hidden_size
        self.projections = nn.ModuleList(nn.Linear(d_s, d_t) for _ in self.layer_map).to(device)
        self.modules = {"student": self.student, "projections": self.projections}
        self.embeddings = getattr(self.student.base_model, "embeddings", None)
        if cfg.perturb_eps > 0 and self.embeddings is None:
            raise ValueError("gradient perturbation needs a student with an `embeddings` module (BERT-like); "
                             "set --perturb-eps 0 to train without it")
        self.negative_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.plan = cfg.stage_plan()
        self.total_steps = 0
        self._stage = None
        self._events: list[str] = []
        log.info("layer map (student -> teacher): %s", self.layer_map)

    # ------------------------------------------------------------------ schedule

    def stage_at(self, step: int) -> int:
        """0-based stage of a 0-based step: stage s covers its fraction of the total steps."""
        edge = 0.0
        for index, stage in enumerate(self.plan):
            edge += stage["fraction"]
            if step < round(edge * self.total_steps):
                return index
        return len(self.plan) - 1

    def pop_events(self) -> list[str]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ loss

    def _representations(self, hidden_states, mask, project: Optional[nn.Module]):
        h = hidden_states if project is None else project(hidden_states)
        if self.cfg.representation == "cls":
            return h[:, 0]
        return (h * mask).flatten(1)

    def _sample_negatives(self, batch_size: int) -> Optional[torch.Tensor]:
        if self.cfg.num_negatives is None:
            return None
        k = min(self.cfg.num_negatives, batch_size - 1)
        scores = torch.rand(batch_size, batch_size, generator=self.negative_generator)
        scores.fill_diagonal_(-1.0)  # never the row itself
        return scores.topk(k, dim=1).indices.to(self.device)

    def _loss(self, batch, teacher_out, weights, neg_index):
        inputs = model_inputs(batch)
        need_reps = any(w > 0 and LOSSES[name].needs_representations for name, w in weights.items())
        out = self.student(**inputs, output_hidden_states=need_reps)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.logits.dtype)
        s_reps, t_reps = [], []
        if need_reps:
            for i, (t_layer, proj) in enumerate(zip(self.layer_map, self.projections)):
                s_reps.append(self._representations(out.hidden_states[i + 1], mask, proj))
                t_reps.append(self._representations(teacher_out.hidden_states[t_layer], mask, None))
        teacher_logits = teacher_out.logits
        if self.alignment is not None:
            teacher_logits = teacher_logits[:, self.alignment]  # into the dataset's label order
        x = LossInputs(out.logits, teacher_logits, batch["labels"], s_reps, t_reps, neg_index,
                       self.task.is_regression, self.cfg.temperature, self.cfg.soft_loss_t2, self.cfg.loss_backend)
        parts = {name: LOSSES[name](x) for name, w in weights.items() if w > 0}
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def train_step(self, batch, step):
        stage = self.stage_at(step)
        if stage != self._stage:
            if self._stage is not None or step > 0:
                self._events.append(f"stage {stage + 1} begins: weights {self.plan[stage]['weights']}")
            self._stage = stage
        weights = self.plan[stage]["weights"]
        with torch.no_grad():
            teacher_out = self.teacher(**model_inputs(batch), output_hidden_states=True)
        neg_index = self._sample_negatives(batch["input_ids"].shape[0])
        eps = self.cfg.perturb_eps
        if eps == 0:
            loss, parts = self._loss(batch, teacher_out, weights, neg_index)
            loss.backward()
            return {"loss": float(loss.detach()), **parts, "stage": stage + 1}
        # Pass 1: the gradient at the embedding output e.
        captured = {}
        hook = self.embeddings.register_forward_hook(lambda m, i, o: captured.setdefault("e", o))
        try:
            loss, parts = self._loss(batch, teacher_out, weights, neg_index)
        finally:
            hook.remove()
        e = captured["e"]
        if self.cfg.perturb_mode == "replace":
            (g,) = torch.autograd.grad(loss, e)
        else:
            e.retain_grad()
            loss.backward()
            g = e.grad
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        delta = (eps * g / norm).detach()
        # Pass 2: the loss at e + delta; its gradient updates the parameters.
        hook = self.embeddings.register_forward_hook(lambda m, i, o: o + delta)
        try:
            loss_adv, parts_adv = self._loss(batch, teacher_out, weights, neg_index)
        finally:
            hook.remove()
        loss_adv.backward()
        return {"loss": float(loss.detach()), **parts, "loss_perturbed": float(loss_adv.detach()), "stage": stage + 1}

    def predict(self, batch):
        logits = self.student(**model_inputs(batch)).logits
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def param_groups(self, weight_decay):
        named = list(self.student.named_parameters()) + list(self.projections.named_parameters())
        return decay_groups(named, weight_decay)

    # ------------------------------------------------------------------ state

    def state_dict(self):
        return {"negative_generator": self.negative_generator.get_state(), "stage": self._stage}

    def load_state_dict(self, state):
        self.negative_generator.set_state(state["negative_generator"])
        self._stage = state["stage"]

    def save_best(self, folder: Path):
        export_student(self.student, self.tokenizer, folder)


def export_student(student, tokenizer, folder: Path) -> None:
    """save_pretrained + tokenizer: loadable by AutoModelForSequenceClassification alone."""
    with atomic_directory(folder) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
