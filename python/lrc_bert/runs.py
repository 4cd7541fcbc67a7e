"""The run entry points behind the ``lrc-bert`` commands: training (finetune, distill),
evaluation and the teacher cache, each from a validated ``TrainConfig``. ``cli.py`` keeps
the parser; other programs (the demo, the scripts, the tests) call these directly."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import TrainConfig, save_config, validate

log = logging.getLogger("lrc_bert")


def _load_tokenizer(ref: str):
    """The model's tokenizer, truncating (with dynamic padding too) at the model's position limit."""
    from transformers import AutoTokenizer

    from .modeling import read_model_config

    tokenizer = AutoTokenizer.from_pretrained(ref)
    limit = getattr(read_model_config(ref), "max_position_embeddings", None)
    if limit is not None and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    return tokenizer


def _datasets(cfg: TrainConfig, task, tokenizer, with_train: bool, with_eval: bool = True):
    from .data import tokenize_split
    from .tasks import dev_splits

    evals = {split: tokenize_split(task, split, tokenizer, cfg, cfg.limit_eval) for split in dev_splits(task)
             if with_eval}
    train = tokenize_split(task, "train", tokenizer, cfg, cfg.limit_train) if with_train else None
    return train, evals


def run_training(cfg: TrainConfig, command: str, resume: bool = False, on_step=None) -> dict:
    """finetune or distill, from a validated config; returns the final dev metrics (rank 0; {} elsewhere).

    Under torchrun this process joins the process group first; see ``runtime.py``.
    """
    from .runtime import run_with_runtime

    validate(cfg, command)
    existing = prepare_run_folder(cfg, resume)
    return run_with_runtime(cfg.device, cfg.precision,
                            lambda runtime: _train_and_export(cfg, command, resume, on_step, existing, runtime))


def _train_and_export(cfg: TrainConfig, command: str, resume: bool, on_step, existing: list, runtime) -> dict:
    import torch

    from .data import Collator
    from .tasks import dev_splits, get_task
    from .trainer import Trainer

    task = get_task(cfg.task)
    output = Path(cfg.output)
    if not runtime.is_main:
        logging.getLogger("lrc_bert").setLevel(logging.WARNING)
    open_run_folder(cfg, existing, resume, runtime)
    tokenizer = _load_tokenizer(cfg.model if command == "finetune" else cfg.teacher)
    train, evals = _datasets(cfg, task, tokenizer, with_train=True)
    if command == "finetune":
        from .finetune import FinetuneMethod

        method = FinetuneMethod(cfg, task, tokenizer, runtime)
    else:
        from .distill import DistillMethod

        teacher, cache = _teacher_or_cache(cfg, train)
        method = DistillMethod(cfg, task, teacher, tokenizer, runtime, cache)
    if runtime.rank:
        torch.manual_seed(cfg.seed + 7919 * runtime.rank)  # dropout differs across ranks
    if runtime.is_main:
        save_config(cfg, output / "config.json")
    trainer = Trainer(cfg, method, train, evals, Collator(tokenizer, task.is_regression), task, runtime,
                      dev_splits(task)[0])
    final = trainer.fit(resume=resume, on_step=on_step)
    export = output / ("model" if command == "finetune" else "student")
    if runtime.is_main:
        from .model_card import write_model_card

        if export_best(output, export, lambda tmp: write_model_card(tmp, cfg, command, task, trainer.best,
                                                                      trainer.main_key)):
            log.info("exported the best model (step %s, %s = %s) to %s", trainer.best["step"], trainer.main_key,
                     trainer.best["value"], export)
    return final


def export_best(output: Path, export: Path, add_files=None) -> bool:
    """Copy the run's best checkpoint (``checkpoints/best``) to ``export`` atomically, with
    ``add_files(folder)`` writing anything more into it first; the copy gets its own manifest.
    False (nothing written) when no checkpoint was kept."""
    import shutil

    from .checkpoint import atomic_directory

    best = output / "checkpoints" / "best"
    if not best.is_dir():
        return False
    with atomic_directory(export) as tmp:
        for item in best.iterdir():
            if item.name != "manifest.json":  # atomic_directory writes the copy's
                shutil.copy2(item, tmp / item.name)
        if add_files is not None:
            add_files(tmp)
    return True


RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "tensorboard", "model", "student", "config.json")


def prepare_run_folder(cfg: TrainConfig, resume: bool) -> list[Path]:
    """The earlier run's artifacts in --output; a new run into such a folder is refused unless
    --overwrite-output (the caller then clears them, on rank 0)."""
    existing = run_artifacts(Path(cfg.output))
    if existing and not resume and not cfg.overwrite_output:
        raise ValueError(f"--output {cfg.output} already holds a run ({', '.join(p.name for p in existing)}); "
                         "continue it with --resume, or pass --overwrite-output to delete it and start over")
    return existing


def run_artifacts(output: Path) -> list[Path]:
    """What a training run writes into its folder, as far as ``output`` holds it."""
    return [output / name for name in RUN_ARTIFACTS if (output / name).exists()]


def open_run_folder(cfg: TrainConfig, existing: list[Path], resume: bool, runtime) -> None:
    """A run's start on every rank: the same seed (so the same initial weights; DDP also
    broadcasts rank 0's), the earlier run cleared by rank 0 (see prepare_run_folder), and --output."""
    import torch

    torch.manual_seed(cfg.seed)
    if existing and not resume and runtime.is_main:
        clear_run(Path(cfg.output), existing)
    runtime.barrier()
    Path(cfg.output).mkdir(parents=True, exist_ok=True)


def clear_run(output: Path, artifacts: list[Path]) -> None:
    """--overwrite-output: delete the earlier run's artifacts (only those: other files stay)."""
    import shutil

    for path in artifacts:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log.warning("--overwrite-output: deleted the earlier run in %s (%s)", output, ", ".join(p.name for p in artifacts))


def _teacher_or_cache(cfg: TrainConfig, train):
    """(teacher model, None), or (teacher config, checked TeacherCache) with --teacher-cache."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if cfg.teacher_cache is None:
        return AutoModelForSequenceClassification.from_pretrained(cfg.teacher), None
    from .teacher_cache import TeacherCache

    cache = TeacherCache(cfg.teacher_cache)
    cache.check(cfg, train)
    return AutoConfig.from_pretrained(cfg.teacher), cache


def run_cache_teacher(cfg: TrainConfig) -> Path:
    """``lrc-bert cache-teacher``: the teacher's outputs over the training set, written once."""
    from transformers import AutoModelForSequenceClassification

    from .data import Collator
    from .modeling import uniform_layer_map
    from .tasks import get_task
    from .teacher_cache import write_teacher_cache
    from .runtime import resolve_device

    validate(cfg, "cache-teacher")
    task = get_task(cfg.task)
    tokenizer = _load_tokenizer(cfg.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(cfg.teacher)
    n_t = teacher.config.num_hidden_layers
    layers = list(cfg.layer_map) if cfg.layer_map is not None else uniform_layer_map(cfg.student_layers, n_t)
    if not all(1 <= t <= n_t for t in layers):
        raise ValueError(f"layer_map: the teacher has layers 1..{n_t}, got {layers}")
    train, _ = _datasets(cfg, task, tokenizer, with_train=True, with_eval=False)
    return write_teacher_cache(cfg, teacher, train, Collator(tokenizer, task.is_regression), sorted(set(layers)),
                               resolve_device(cfg.device), cfg.precision)


def run_evaluate(cfg: TrainConfig, split: str) -> dict:
    from transformers import AutoModelForSequenceClassification

    from .data import Collator, model_inputs, tokenize_split
    from .tasks import dev_splits, get_task, label_alignment
    from .runtime import resolve_device
    from .trainer import evaluate

    validate(cfg, "evaluate")
    task = get_task(cfg.task)
    if split == "test" and task.name != "snli":
        raise ValueError(f"{task.name}: GLUE test labels are not public; evaluate on dev, or submit predictions")
    device = resolve_device(cfg.device)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model).to(device).eval()
    alignment = label_alignment(task, model.config.id2label, cfg.assume_label_order)
    tokenizer = _load_tokenizer(cfg.model)

    def predict(batch):
        logits = model(**model_inputs(batch)).logits
        return logits.squeeze(-1) if alignment is None else logits[:, alignment].argmax(-1)  # dataset label order

    splits = dev_splits(task) if split == "dev" else ("test",)
    sets = {name: tokenize_split(task, name, tokenizer, cfg, cfg.limit_eval) for name in splits}
    return evaluate(predict, sets, Collator(tokenizer, task.is_regression), task, cfg.eval_batch_size, device)
