"""``lrc-bert finetune``: standard fine-tuning of a Hugging Face encoder (the teacher)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch.nn.functional as F

from .checkpoint import atomic_directory
from .config import TrainConfig
from .data import MODEL_INPUTS, model_inputs
from .method import decay_groups, run_step
from .modeling import load_classifier
from .runtime import Runtime
from .tasks import TaskSpec

log = logging.getLogger("lrc_bert")


class FinetuneMethod:
    def __init__(self, cfg: TrainConfig, task: TaskSpec, tokenizer, runtime: Runtime):

        self.cfg, self.task, self.tokenizer, self.runtime = cfg, task, tokenizer, runtime
        device = runtime.device
        self.model = load_classifier(cfg.model, task, cfg.ignore_mismatched_sizes).to(device)
        self.modules = {"model": self.model}
        self.wrapped = self.model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                   else None, broadcast_buffers=False)
        self.total_steps = 0

    def param_groups(self, weight_decay):
        return decay_groups(self.model.named_parameters(), weight_decay)

    def no_sync(self):
        return self.wrapped.no_sync() if self.wrapped is not self.model else contextlib.nullcontext()

    def prepare_step(self, batch, step):
        return {k: batch[k] for k in (*MODEL_INPUTS, "labels") if k in batch}, {}

    def train_step(self, batch, step):
        return run_step(self, batch, step)

    def compute_step(self, batch, info):
        with self.runtime.autocast():
            logits = self.wrapped(**model_inputs(batch)).logits.float()
        if self.task.is_regression:
            loss = F.mse_loss(logits.squeeze(-1), batch["labels"])
        else:
            loss = F.cross_entropy(logits, batch["labels"])
        self.runtime.backward(loss)
        return {"loss": loss.detach()}

    def predict(self, batch):
        with self.runtime.autocast():
            logits = self.model(**model_inputs(batch)).logits.float()
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def save_best(self, folder: Path):
        with atomic_directory(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
