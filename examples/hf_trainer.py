"""LRC-BERT inside a Hugging Face ``Trainer``: ``compute_loss`` uses ``LRCDistillationLoss``, and
the loss's projections train with the student (they are parameters of the model the Trainer
optimises). Gradient perturbation goes through ``EmbeddingPerturbation``.

    python examples/hf_trainer.py --teacher runs/teacher/model --data-dir ../shared/data/snli \\
        --output runs/hf_student --max-steps 2000

Offline: the teacher is a local folder (e.g. what ``lrc-bert finetune`` exported) and the data
an SNLI-layout TSV folder; nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from lrc_bert import EmbeddingPerturbation, LRCDistillationLoss
from lrc_bert.config import TrainConfig
from lrc_bert.data import tokenize_split
from lrc_bert.modeling import build_student
from lrc_bert.tasks import get_task


class StudentWithCriterion(nn.Module):
    """One module for the Trainer: the student and the loss (whose projections are trained too)."""

    def __init__(self, student, criterion: LRCDistillationLoss):
        super().__init__()
        self.student, self.criterion = student, criterion

    def forward(self, **inputs):
        return self.student(**inputs)


class LRCTrainer(Trainer):
    def __init__(self, *args, teacher, perturb_eps: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.perturb_eps = perturb_eps
        embeddings = self.model.student.base_model.embeddings
        self.perturbation = EmbeddingPerturbation(embeddings) if perturb_eps > 0 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = getattr(model, "module", model)  # unwrapped (DataParallel / DDP)
        labels = inputs.pop("labels")
        with torch.no_grad():
            teacher_outputs = self.teacher(**inputs, output_hidden_states=True)
        outputs = {}

        def loss():
            student_outputs = inner.student(**inputs, output_hidden_states=True)
            outputs["logits"] = student_outputs.logits
            return inner.criterion(student_outputs, teacher_outputs, inputs["attention_mask"], labels,
                                   step=self.state.global_step).loss

        if self.perturbation is not None and model.training and torch.is_grad_enabled():
            _, value = self.perturbation.losses(loss, self.perturb_eps)  # "replace": train at e + delta
        else:
            value = loss()
        return (value, outputs) if return_outputs else value


def main(argv=None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="fine-tuned teacher folder")
    parser.add_argument("--data-dir", required=True, help="SNLI-layout TSV folder (train.tsv, dev.tsv)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--perturb-eps", type=float, default=1.0)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=312)
    parser.add_argument("--student-heads", type=int, default=12)
    parser.add_argument("--student-intermediate", type=int, default=1200)
    args = parser.parse_args(argv)

    task = get_task("snli")
    cfg = TrainConfig(data_dir=args.data_dir, max_length=args.max_length, student_layers=args.student_layers,
                      student_hidden=args.student_hidden, student_heads=args.student_heads,
                      student_intermediate=args.student_intermediate)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    student = build_student(cfg, teacher.config, task)
    # The paper's losses and two stages; total_steps places each step in its stage.
    criterion = LRCDistillationLoss(teacher.config, student.config, total_steps=args.max_steps)
    train = tokenize_split(task, "train", tokenizer, cfg)
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.max_steps // 10, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 20), save_strategy="no", report_to="none",
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available())
    trainer = LRCTrainer(model=StudentWithCriterion(student, criterion), args=training_args, train_dataset=train,
                         data_collator=DataCollatorWithPadding(tokenizer), teacher=teacher,
                         perturb_eps=args.perturb_eps)
    trainer.train()
    student.save_pretrained(Path(args.output) / "student")
    tokenizer.save_pretrained(Path(args.output) / "student")
    return trainer


if __name__ == "__main__":
    main()
