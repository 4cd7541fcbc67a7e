"""``lrc-bert general-distill``: LRC-BERT's pre-training stage.

A general (not fine-tuned) encoder teaches a student on unlabeled text (``corpus.py``): COS-NCE
on the mapped layers, through ``lk.cos_nce_loss`` (the whole masked sequence by default, as in
``distill``; ``--map-embeddings`` adds the embedding outputs, 0 -> 0), with in-batch, sampled
(``--num-negatives``) or global negatives, and gradient perturbation. There are no labels, so
no prediction losses. It is the task distillation's method with another student and data
(``GeneralDistillMethod`` extends ``DistillMethod``) and runs in the same Trainer: bf16, DDP,
CUDA graphs, accumulation, verified checkpoints, exact resume. Every ``--eval-steps`` the
COS-NCE of the held-out sequences is measured, and the best checkpoint is the lowest.

Output: ``OUTPUT/student/`` (``AutoModel`` loads it; the tokenizer is beside it) and
``OUTPUT/student/lrc_projections.safetensors``, the projections with their layer pairs, which
``distill --student-init OUTPUT/student`` loads too (LRC-BERT).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .config import TrainConfig, validate
from .distill import DistillMethod
from .checkpoint import atomic_directory
from .modeling import save_projections

log = logging.getLogger("lrc_bert")

VALIDATION_KEY = "validation/cos_nce"


class GeneralDistillMethod(DistillMethod):
    name = "general-distill"
    main_metric = (VALIDATION_KEY, False)  # the held-out COS-NCE: lower is better

    def __init__(self, cfg: TrainConfig, teacher, tokenizer, runtime):
        super().__init__(cfg, None, teacher, tokenizer, runtime)
        self.variant = "general distillation (LRC-BERT's pre-training stage)"
        self.student.config.lrc_bert = {"method": self.name, "variant": self.variant}

    def build_student(self, cfg: TrainConfig, teacher_config, task):
        """An encoder without a head: the paper's 4x312 BERT by default, or --student-config / --student-init."""
        from transformers import AutoModel

        from .modeling import student_config

        if cfg.student_init:
            return AutoModel.from_pretrained(cfg.student_init)
        return AutoModel.from_config(student_config(cfg, teacher_config, {}))

    def evaluate(self, eval_sets: dict) -> dict:
        """Mean COS-NCE over the held-out sequences, with every other row of each batch as negatives."""
        weights = {"cos_nce": 1.0}
        total, count = 0.0, 0
        for split, data in eval_sets.items():
            for start in range(0, len(data), self.cfg.eval_batch_size):
                batch = data[list(range(start, min(start + self.cfg.eval_batch_size, len(data))))]
                if batch["input_ids"].shape[0] < 2:
                    continue  # in-batch negatives need two rows
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.no_grad(), self.runtime.autocast():
                    teacher_logits, teacher_reps = self._teacher(batch)
                    loss, _ = self._loss(self.trained, batch, teacher_logits, teacher_reps, weights, None)
                total += float(loss) * batch["input_ids"].shape[0]
                count += batch["input_ids"].shape[0]
        return {VALIDATION_KEY: total / count if count else math.nan}

    def _teacher(self, batch):
        with torch.no_grad(), self.runtime.autocast():
            out = self.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                               output_hidden_states=True)
        from .modeling import representation

        return None, [representation(out.hidden_states[t], batch["attention_mask"], self.cfg.representation)
                      for _, t in self.criterion.pairs]

    def save_best(self, folder: Path):
        with atomic_directory(folder) as tmp:
            self.student.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_projections(self.criterion, tmp)


def general_plan_settings(cfg: TrainConfig) -> None:
    """No labels: COS-NCE only (weight alpha), one stage; prediction losses are refused by name."""
    for name, entry in (cfg.losses or {}).items():
        weight = (entry or {}).get("weight")
        if name in ("soft", "hard") and weight not in (None, 0, [0, 0]):
            raise ValueError(f"losses.{name}: general distillation has no labels and no teacher predictions; "
                             "only representation losses (cos_nce) apply")
    cfg.stages = [{"fraction": 1.0, "weights": {"cos_nce": cfg.alpha}}]


def run_general_distill(cfg: TrainConfig, resume: bool = False, on_step=None) -> dict:
    """Tokenise (once, cached) and pack the corpus, then train the student in the shared Trainer."""
    from .corpus import CorpusSource
    from .runs import prepare_run_folder
    from .runtime import run_with_runtime

    general_plan_settings(cfg)
    validate(cfg, "general-distill")
    source = CorpusSource(cfg.corpus, cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.text_column,
                          cfg.dataset_streaming)
    existing = prepare_run_folder(cfg, resume)
    return run_with_runtime(cfg.device, cfg.precision,
                            lambda runtime: _general_distill(cfg, source, resume, on_step, existing, runtime))


def _general_distill(cfg: TrainConfig, source, resume: bool, on_step, existing: list, runtime) -> dict:
    from transformers import AutoModel

    from .corpus import PackedCorpus, cache_root, collate_packed, tokenize_corpus
    from .runs import _load_tokenizer, export_best, open_run_folder
    from .trainer import Trainer

    open_run_folder(cfg, existing, resume, runtime)
    tokenizer = _load_tokenizer(cfg.teacher)
    folder = tokenize_corpus(source, tokenizer, cache_root(cfg)) if runtime.is_main else None
    runtime.barrier()
    folder = folder or tokenize_corpus(source, tokenizer, cache_root(cfg))  # other ranks: the cached file
    packed = PackedCorpus(folder, cfg.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    train, held_out = packed.split(cfg.validation_fraction)
    log.info("corpus: %d training and %d held-out sequences of %d tokens", len(train), len(held_out),
             cfg.max_length)
    teacher = AutoModel.from_pretrained(cfg.teacher)
    method = GeneralDistillMethod(cfg, teacher, tokenizer, runtime)
    if runtime.rank:
        torch.manual_seed(cfg.seed + 7919 * runtime.rank)
    if runtime.is_main:
        from .config import save_config

        save_config(cfg, Path(cfg.output) / "config.json")
    trainer = Trainer(cfg, method, train, {"validation": held_out}, collate_packed, None, runtime, "validation")
    final = trainer.fit(resume=resume, on_step=on_step)
    if runtime.is_main and export_best(Path(cfg.output), Path(cfg.output) / "student"):
        log.info("exported the best general student (step %s, %s = %.4f) to %s", trainer.best["step"],
                 VALIDATION_KEY, trainer.best["value"], Path(cfg.output) / "student")
    return final
