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


def student_config(cfg, teacher_config, labels: dict):
    """The student's transformers config: --student-config JSON, or the paper's 4x312 BERT with
    the teacher's vocabulary; a vocabulary other than the teacher's is refused."""
    from transformers import AutoConfig, BertConfig

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
    return config


def build_student(cfg, teacher_config, task: TaskSpec):
    """The student for a run's settings (``TrainConfig``): pretrained, from a config JSON, or the paper's 4x312."""
    from transformers import AutoModelForSequenceClassification

    if cfg.student_init:
        return load_classifier(cfg.student_init, task, cfg.ignore_mismatched_sizes)
    return AutoModelForSequenceClassification.from_config(student_config(cfg, teacher_config, label_kwargs(task)))


def check_student_vocabulary(student_ref: str, teacher_ref: str) -> None:
    """A pretrained student reads the teacher's token ids: its tokenizer's vocabulary (or, without
    one, its vocabulary size) must be the teacher's."""
    from transformers import AutoTokenizer

    student_config_ = read_model_config(student_ref)
    teacher_config = read_model_config(teacher_ref)
    if student_config_ is None or teacher_config is None:
        return
    if student_config_.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"--student-init {student_ref} has a vocabulary of {student_config_.vocab_size} tokens, the "
                         f"teacher {teacher_ref} {teacher_config.vocab_size}: the student must read the teacher's "
                         "token ids")
    try:
        student_vocab = AutoTokenizer.from_pretrained(student_ref).get_vocab()
    except (OSError, ValueError):
        return  # no tokenizer beside the student: the sizes agree
    teacher_vocab = AutoTokenizer.from_pretrained(teacher_ref).get_vocab()
    if student_vocab != teacher_vocab:
        differ = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))[:3]
        raise ValueError(f"--student-init {student_ref}: its tokenizer's vocabulary differs from the teacher's "
                         f"{teacher_ref} (e.g. {differ}); the student must read the teacher's token ids")


class StudentWithProjections(nn.Module):
    """The trained modules as one ``nn.Module``, so that one DDP wrapper covers them.

    ``forward`` returns only what the stage's losses use (logits and / or the projected
    mapped layers): DDP's search for unused parameters starts from these outputs.
    """

    def __init__(self, student, projections: nn.ModuleList, student_layers: list):
        super().__init__()
        self.student, self.projections, self.student_layers = student, projections, student_layers

    def forward(self, inputs: dict, need_logits: bool, need_layers: bool):
        out = self.student(**inputs, output_hidden_states=need_layers)
        layers = [proj(out.hidden_states[s]) for s, proj in zip(self.student_layers, self.projections)] \
            if need_layers else []
        return (out.logits if need_logits else None), layers


PROJECTIONS_FILE = "lrc_projections.safetensors"


def save_projections(criterion, folder: Path) -> None:
    """The trained projections beside an exported student, with the layer pairs they map."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in criterion.projections.state_dict().items()}
    save_file(state, str(Path(folder) / PROJECTIONS_FILE),
              metadata={"pairs": json.dumps(criterion.pairs), "representation": criterion.cfg.representation,
                        "format": "lrc-bert projections 1"})


def load_projections(criterion, folder: Path) -> list:
    """Load the projections saved beside a student whose (student, teacher) layer pairs are also
    this run's; returns the student layers loaded. Pairs this run does not map are left out (a
    warning says so); a pair whose shapes do not fit is an error naming the file."""
    from safetensors import safe_open

    file = Path(folder) / PROJECTIONS_FILE
    if not file.is_file():
        return []
    with safe_open(str(file), "pt") as f:
        saved = [tuple(p) for p in json.loads((f.metadata() or {}).get("pairs", "[]"))]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    loaded = []
    for index, pair in enumerate(criterion.pairs):
        if pair not in saved:
            continue
        at = saved.index(pair)
        proj = criterion.projections[index]
        weight, bias = tensors[f"{at}.weight"], tensors[f"{at}.bias"]
        if weight.shape != proj.weight.shape or bias.shape != proj.bias.shape:
            raise ValueError(f"{file}: the projection of student layer {pair[0]} -> teacher layer {pair[1]} has "
                             f"shape {tuple(weight.shape)}, this run needs {tuple(proj.weight.shape)} (another "
                             "teacher or student width?); pass --reinit-projections to start them afresh")
        with torch.no_grad():
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        loaded.append(pair[0])
    skipped = [p for p in criterion.pairs if p not in saved]
    if skipped:
        log.warning("%s maps layer pairs %s; pairs %s of this run start from a random init", file, saved, skipped)
    return loaded


def export_student(student, tokenizer, folder: Path) -> None:
    """save_pretrained + tokenizer: loadable by AutoModelForSequenceClassification alone."""
    with atomic_directory(folder) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
