"""The models: the student (built, loaded or exported), its projections onto the teacher's
width, the layer map, and the representation COS-NCE compares."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_directory
from .tasks import TaskSpec, label_kwargs

log = logging.getLogger("lrc_bert")


def read_model_config(ref: str):
    """A model's transformers config (config.json only: no weights), or None where it cannot be
    read without loading (a hub name while offline); the model load then reports the problem."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError):
        return None


def check_head_fits(ref: str, config, task, ignore_mismatched_sizes: bool) -> bool:
    """Whether the checkpoint has a sequence-classification head of another size than the task
    needs. Such a head is refused, naming both label counts and the flag that re-initialises it."""
    has_head = any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
    if not has_head or config.num_labels == task.num_labels:
        return False
    if not ignore_mismatched_sizes:
        raise ValueError(f"{ref} has a classification head with {config.num_labels} labels, task {task.name} has "
                         f"{task.num_labels}; pass --ignore-mismatched-sizes to re-initialise the head")
    return True


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (1-based) -> teacher layer ceil(i N / M)."""
    return [math.ceil(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


def representation(hidden: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, L, d] layer output -> [B, F]: the [CLS] vector, or the masked, flattened sequence."""
    if kind == "cls":
        return hidden[:, 0]
    return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).flatten(1)


def load_classifier(ref: str, task: TaskSpec, ignore_mismatched_sizes: bool = False):
    """``AutoModelForSequenceClassification`` with the task's labels. A checkpoint whose head has
    another label count is refused by name, or re-initialised with a warning when allowed."""
    from transformers import AutoModelForSequenceClassification

    config = read_model_config(ref)
    reinit = config is not None and check_head_fits(ref, config, task, ignore_mismatched_sizes)
    if reinit:
        log.warning("%s: its %d-label classification head is re-initialised for the %d labels of %s "
                    "(--ignore-mismatched-sizes)", ref, config.num_labels, task.num_labels, task.name)
    return AutoModelForSequenceClassification.from_pretrained(ref, ignore_mismatched_sizes=reinit, **label_kwargs(task))


def build_student(cfg, teacher_config, task: TaskSpec):
    """The student for a run's settings (``TrainConfig``): pretrained, from a config JSON, or the paper's 4x312."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    labels = label_kwargs(task)
    if cfg.student_init:
        return load_classifier(cfg.student_init, task, cfg.ignore_mismatched_sizes)
    if cfg.student_config:
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


class StudentWithProjections(nn.Module):
    """The trained modules as one ``nn.Module``, so that one DDP wrapper covers them.

    ``forward`` returns only what the stage's losses use (logits and / or the projected
    mapped layers): DDP's search for unused parameters starts from these outputs.
    """

    def __init__(self, student, projections: nn.ModuleList):
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, inputs: dict, need_logits: bool, need_layers: bool):
        out = self.student(**inputs, output_hidden_states=need_layers)
        layers = [proj(out.hidden_states[i + 1]) for i, proj in enumerate(self.projections)] if need_layers else []
        return (out.logits if need_logits else None), layers


def export_student(student, tokenizer, folder: Path) -> None:
    """save_pretrained + tokenizer: loadable by AutoModelForSequenceClassification alone."""
    with atomic_directory(folder) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
