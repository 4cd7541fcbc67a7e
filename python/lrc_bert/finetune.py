"""``lrc-bert finetune``: standard fine-tuning of a Hugging Face encoder (the teacher)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch.nn.functional as F

from .checkpoint import atomic_directory
from .config import TrainConfig
from .data import MODEL_INPUTS, model_inputs
from .runtime import Runtime
from .tasks import TaskSpec
from .trainer import decay_groups, run_step

log = logging.getLogger("lrc_bert")


def label_kwargs(task: TaskSpec) -> dict:
    """Config fields that name the task's labels, so later label checks can work."""
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": task.num_labels, "id2label": dict(enumerate(task.labels)),
            "label2id": {name: i for i, name in enumerate(task.labels)},
            "problem_type": "single_label_classification"}


def load_classifier(ref: str, task: TaskSpec, ignore_mismatched_sizes: bool = False):
    """``AutoModelForSequenceClassification`` with the task's labels. A checkpoint whose head has
    another label count is refused by name, or re-initialised with a warning when allowed."""
    from transformers import AutoModelForSequenceClassification

    from .config import check_head_fits, read_model_config

    config = read_model_config(ref)
    reinit = config is not None and check_head_fits(ref, config, task, ignore_mismatched_sizes)
    if reinit:
        log.warning("%s: its %d-label classification head is re-initialised for the %d labels of %s "
                    "(--ignore-mismatched-sizes)", ref, config.num_labels, task.num_labels, task.name)
    return AutoModelForSequenceClassification.from_pretrained(ref, ignore_mismatched_sizes=reinit, **label_kwargs(task))


class FinetuneMethod:
    def __init__(self, cfg: TrainConfig, task: TaskSpec, tokenizer, runtime: Runtime):
        from transformers import AutoModelForSequenceClassification

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
