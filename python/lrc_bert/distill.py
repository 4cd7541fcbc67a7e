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
  or K sampled per row through ``neg_index``); under torchrun with ``global_negatives``,
  of the global batch (teacher rows all-gathered; gradients reach only the local student
  rows); or, with ``negative_source: bank``, K rows drawn per sample from the cached
  teacher representations of the whole training set (``teacher_cache.py``).
* Gradient perturbation: g = dL/de at the student's embedding output e;
  e' = e + eps g / ||g|| (per example); the step uses the gradient of L at e'
  ("replace", the paper) or the sum of both gradients ("add", FGM-style).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import MODEL_INPUTS, model_inputs
from .lrc_loss import EmbeddingPerturbation, LRCDistillationLoss, stage_index
from .method import decay_groups, run_step
from .negatives import sample_in_batch
from .modeling import StudentWithProjections, build_student, export_student, load_projections, representation
from .runtime import AUTOCAST_DTYPES, Runtime
from .tasks import TaskSpec, label_alignment
from .teacher_cache import TeacherCache

log = logging.getLogger("lrc_bert")


class DistillMethod:
    """Task distillation (``lrc-bert distill``): LRC-BERT from a pretrained student, LRC-BERT1 from a random init."""

    name = "distill"

    def __init__(self, cfg: TrainConfig, task: TaskSpec, teacher, tokenizer, runtime: Runtime,
                 cache: Optional[TeacherCache] = None):
        """``teacher``: the model, or only its config when ``cache`` holds its outputs."""
        self.cfg, self.task, self.tokenizer, self.runtime = cfg, task, tokenizer, runtime
        self.device = device = runtime.device
        teacher_config = getattr(teacher, "config", teacher)
        alignment = label_alignment(task, teacher_config.id2label, cfg.assume_label_order) if task else None
        # Teacher logits into the dataset's label order, by a device index (the step copies nothing from the host).
        identity = alignment is None or alignment == list(range(len(alignment)))
        self.alignment = None if identity else torch.tensor(alignment, device=device)
        self.cache = cache
        self.teacher = None if cache is not None else teacher.to(device).eval().requires_grad_(False)
        self.student = self.build_student(cfg, teacher_config, task).to(device)
        # The loss, its stages and the projections: the same module other trainers import.
        self.criterion = LRCDistillationLoss(teacher_config, self.student.config, config=cfg,
                                             regression=bool(task and task.is_regression)).to(device)
        self.layer_map, self.projections, self.plan = self.criterion.layer_map, self.criterion.projections, \
            self.criterion.plan
        self.variant = "LRC-BERT" if cfg.student_init else "LRC-BERT1"
        self.student.config.lrc_bert = {"method": self.name, "variant": self.variant}  # saved with the export
        if cfg.student_init and not cfg.reinit_projections:
            loaded = load_projections(self.criterion, Path(cfg.student_init))
            if loaded:
                log.info("projections of student layers %s loaded from %s", loaded, cfg.student_init)
        if cache is not None:
            cache.check_layers(self.layer_map)
        self.modules = {"student": self.student, "projections": self.projections}
        embeddings = getattr(self.student.base_model, "embeddings", None)
        if cfg.perturb_eps > 0 and embeddings is None:
            raise ValueError("gradient perturbation needs a student with an `embeddings` module (BERT-like); "
                             "set --perturb-eps 0 to train without it")
        self.perturbation = EmbeddingPerturbation(embeddings) if embeddings is not None else None
        self.trained = StudentWithProjections(self.student, self.projections, [s for s, _ in self.criterion.pairs])
        if cfg.compile_student:
            # The encoder only: the Hugging Face model gathers hidden_states through hooks and
            # context variables that break a whole-model graph (transformers 5).
            encoder = getattr(self.student.base_model, "encoder", None)
            if encoder is None:
                raise ValueError("compile_student compiles the student's encoder (base_model.encoder), "
                                 "which this student lacks")
            encoder.compile()
        self.model = self.trained  # what the loss runs through: DDP-wrapped when distributed
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.trained, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,  # a stage's losses may not use the classifier or the projections
                broadcast_buffers=False)
        self.banks = None
        if cfg.negative_source == "bank":
            dtype = AUTOCAST_DTYPES[cfg.precision] or torch.float32
            self.banks = {layer: cache.bank(layer, device, dtype) for layer in sorted(set(self.layer_map))}
        self.negative_generator = self.criterion.generator
        self.total_steps = 0  # set by the trainer; the criterion places steps in stages with it
        self._stage = None
        self._events: list[str] = []
        log.info("layer map (student -> teacher): %s", self.layer_map)

    def build_student(self, cfg: TrainConfig, teacher_config, task: TaskSpec):
        return build_student(cfg, teacher_config, task)

    def run_info(self) -> dict:
        """What the run is, for metrics.jsonl and TensorBoard."""
        return {"method": self.name, "variant": self.variant, "student_init": self.cfg.student_init,
                "layer_pairs": [list(p) for p in self.criterion.pairs]}

    # ------------------------------------------------------------------ schedule

    @property
    def total_steps(self) -> int:
        return self.criterion.total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        self.criterion.total_steps = value

    def stage_at(self, step: int) -> int:
        """0-based stage of a 0-based step."""
        return stage_index(self.plan, step, self.total_steps)

    def pop_events(self) -> list[str]:
        events, self._events = self._events, []
        return events

    def no_sync(self):
        return self.model.no_sync() if self.model is not self.trained else contextlib.nullcontext()

    # ------------------------------------------------------------------ negatives

    def _negatives(self, batch_size: int, index: Optional[torch.Tensor], labels: torch.Tensor) -> Optional[torch.Tensor]:
        """neg_index (on the host): the rows of the negative pool (the bank, the global batch or
        the local batch) each local row uses. None: all other rows of the local batch."""
        cfg, world, rank = self.cfg, self.runtime.world_size, self.runtime.rank
        if cfg.negative_source == "bank":
            # O(K) per sample: K uniform draws over the N - 1 other examples (with replacement).
            n = self.cache.num_examples
            draws = torch.randint(0, n - 1, (batch_size, cfg.num_negatives), generator=self.negative_generator)
            return draws + (draws >= index.cpu()[:, None]).long()
        if cfg.global_negatives and world > 1:
            pool, offset = world * batch_size, rank * batch_size
            if cfg.num_negatives is None:
                others = torch.arange(pool).expand(pool, pool)[~torch.eye(pool, dtype=torch.bool)].view(pool, pool - 1)
            else:  # every rank draws the same global matrix and keeps its own rows
                others = sample_in_batch(pool, min(cfg.num_negatives, pool - 1), self.negative_generator)
            return others[offset:offset + batch_size]
        fallback = self.criterion.fallback_rows
        index = self.criterion.sample_negatives(labels, batch_size)
        if self.criterion.fallback_rows > fallback:
            self._events.append(f"other-label negatives: {self.criterion.fallback_rows - fallback} rows had no "
                                "other class in their batch and drew any other row")
        return index

    # ------------------------------------------------------------------ loss

    def _teacher(self, batch) -> tuple[torch.Tensor, list]:
        """Teacher logits and mapped-layer representations from a forward pass."""
        with torch.no_grad(), self.runtime.autocast():
            out = self.teacher(**model_inputs(batch), output_hidden_states=True)
        mask = batch["attention_mask"]
        return out.logits, [representation(out.hidden_states[t], mask, self.cfg.representation)
                            for _, t in self.criterion.pairs]

    def _loss(self, model, batch, teacher_logits, teacher_reps, weights, neg_index):
        need_logits, need_reps = self.criterion.needs(weights)
        with self.runtime.autocast():
            logits, layers = model(model_inputs(batch), need_logits, need_reps)
        s_reps, t_reps, banks = [], [], []
        gather = self.banks is None and self.cfg.global_negatives and self.runtime.distributed
        width = None
        if need_reps:
            for h, (_, t_layer), t_rep in zip(layers, self.criterion.pairs, teacher_reps):
                s = representation(h, batch["attention_mask"], self.cfg.representation)
                t = t_rep.to(s.dtype)
                if s.shape[1] != t.shape[1]:
                    raise ValueError(f"student representation has {s.shape[1]} features, the teacher's "
                                     f"{t.shape[1]}: check --max-length against the teacher cache")
                if self.banks is not None:
                    bank = self.banks[t_layer]
                elif gather:
                    if width is None:  # dynamic padding: lengths differ across ranks (every layer alike)
                        width = self.runtime.max_int(s.shape[1])
                    s, t = F.pad(s, (0, width - s.shape[1])), F.pad(t, (0, width - t.shape[1]))
                    bank = self.runtime.all_gather_rows(t)
                else:
                    bank = None
                s_reps.append(s), t_reps.append(t), banks.append(bank)
        if self.alignment is not None:
            teacher_logits = teacher_logits.index_select(1, self.alignment)
        return self.criterion.combine(weights, logits, teacher_logits, batch.get("labels"), s_reps, t_reps, neg_index,
                                      banks)

    def prepare_step(self, batch, step):
        """Host side: the stage, the teacher's cached rows and the negative indices."""
        stage = self.stage_at(step)
        if stage != self._stage:
            if self._stage is not None or step > 0:
                self._events.append(f"stage {stage + 1} begins: weights {self.plan[stage]['weights']}")
            self._stage = stage
        inputs = {"batch": {k: batch[k] for k in (*MODEL_INPUTS, "labels") if k in batch},
                  "neg_index": self._negatives(batch["input_ids"].shape[0], batch.get("index"), batch.get("labels")),
                  "teacher": None}
        if self.cache is not None:
            inputs["teacher"] = self.cache.rows(batch["index"], self.layer_map, torch.device("cpu"),
                                                pin=self.device.type == "cuda")
        return inputs, {"stage": stage + 1}

    def train_step(self, batch, step):
        return run_step(self, batch, step)

    def compute_step(self, inputs, info):
        """Device side: both passes of the perturbed step and their backward (capturable)."""
        # One autocast region for the whole step: both passes reuse the weights' low-precision casts.
        with self.runtime.autocast():
            return self._compute_step(inputs, self.plan[info["stage"] - 1]["weights"])

    def _compute_step(self, inputs, weights):
        batch = inputs["batch"]
        cached = inputs["teacher"]
        teacher_logits, teacher_reps = cached if cached is not None else self._teacher(batch)
        args = (batch, teacher_logits, teacher_reps, weights, inputs["neg_index"])
        eps = self.cfg.perturb_eps
        if eps == 0:
            loss, parts = self._loss(self.model, *args)
            self.runtime.backward(loss)
            return {"loss": loss.detach(), **parts}
        # Pass 1 outside DDP (its gradients stay local, like no_sync) gives g = dL/de; pass 2, at
        # e + eps g / ||g||, runs through DDP, and its gradient updates the parameters.
        runtime = self.runtime
        (loss, parts), (loss_adv, _) = self.perturbation.losses(
            lambda: self._loss(self.trained, *args), eps, self.cfg.perturb_mode,
            perturbed=lambda: self._loss(self.model, *args),
            grad=lambda pair, x, retain: runtime.grad(pair[0], x),  # scaled: no fp16 underflow
            backward=lambda pair: runtime.backward(pair[0]))
        runtime.backward(loss_adv)
        return {"loss": loss.detach(), **parts, "loss_perturbed": loss_adv.detach()}

    def predict(self, batch):
        with self.runtime.autocast():
            logits = self.student(**model_inputs(batch)).logits.float()
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def param_groups(self, weight_decay):
        return decay_groups(self.trained.named_parameters(), weight_decay)

    # ------------------------------------------------------------------ state

    def state_dict(self):
        return {"negative_generator": self.negative_generator.get_state(), "stage": self._stage}

    def load_state_dict(self, state):
        self.negative_generator.set_state(state["negative_generator"])
        self._stage = state["stage"]

    def save_best(self, folder: Path):
        export_student(self.student, self.tokenizer, folder)


