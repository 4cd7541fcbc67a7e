"""Run settings: defaults (the paper's), a YAML file, then command-line flags; checked up front.

Every value is validated by :func:`validate` before any model or data is loaded, so a
typo fails in a second with a message naming the setting, not an hour into a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .tasks import TASK_NAMES, check_data_files, dev_splits, get_task


@dataclass
class TrainConfig:
    # --- common
    task: str = "snli"
    output: Optional[str] = None
    data_dir: Optional[str] = None  # GLUE TSV folder; None: the Hugging Face hub
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 16  # the global batch of one optimiser step (all ranks, all micro-batches)
    grad_accum_steps: int = 1  # micro-batches per rank and step; the loss is divided by it
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + GradScaler)
    compile_student: bool = False  # torch.compile the student's encoder (forward and backward)
    cuda_graphs: bool = False  # replay the whole training step as a CUDA graph (cuda_graph.py)
    eval_batch_size: int = 64
    learning_rate: float = 5e-5  # the paper searches {5e-5, 1e-4, 3e-4}
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: Optional[int] = 128  # fixed padding to this length (the paper's 128); None: dynamic padding
    group_by_length: bool = False  # with dynamic padding: batches of similar lengths (less padding)
    seed: int = 42
    eval_steps: int = 500
    save_steps: int = 500
    keep_checkpoints: int = 2
    logging_steps: int = 10
    device: str = "auto"
    tensorboard: bool = True
    limit_train: Optional[int] = None  # use the first N training examples (smoke runs)
    limit_eval: Optional[int] = None
    assume_label_order: bool = False
    cache_dir: Optional[str] = None
    overwrite_output: bool = False  # a new run may delete the run artifacts already in `output`
    ignore_mismatched_sizes: bool = False  # re-initialise a classification head with another label count
    # --- finetune
    model: Optional[str] = None
    # --- distill
    teacher: Optional[str] = None
    student_config: Optional[str] = None  # a transformers config JSON
    student_init: Optional[str] = None  # a pretrained student to start from (a general-distill student: LRC-BERT)
    reinit_projections: bool = False  # do not load the projections saved beside --student-init
    student_layers: int = 4
    student_hidden: int = 312
    student_heads: int = 12
    student_intermediate: int = 1200
    layer_map: Optional[list] = None  # teacher layer (1-based) per student layer; None: uniform
    map_embeddings: bool = False  # also map the embedding outputs (layer 0 -> 0), with their own projection
    representation: str = "sequence"  # "sequence" (whole layer, masked) or "cls"
    num_negatives: Optional[int] = None  # K sampled per row; None: all B - 1 in-batch negatives
    negative_source: str = "batch"  # "batch" (other rows of the batch) or "bank" (the cached training set)
    negatives: str = "any"  # "any" other row, or "other-label": rows of another class only (negatives.py)
    global_negatives: bool = False  # under torchrun: negatives from the global batch (all ranks)
    teacher_cache: Optional[str] = None  # folder written by `lrc-bert cache-teacher`; the teacher then never runs
    loss_backend: str = "auto"
    temperature: float = 1.1
    soft_loss_t2: bool = False  # scale the soft loss by T^2 (Hinton); off, as in the paper's formula
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 3.0
    stage1_fraction: float = 0.8
    stages: Optional[list] = None  # explicit [{fraction, weights: {loss: w}}]; default from alpha/beta/gamma
    perturb_eps: float = 1.0  # norm of the per-example embedding perturbation; 0 disables it
    perturb_mode: str = "replace"  # "replace" the clean gradient (paper) or "add" both (FGM)
    # --- general-distill (corpus.py)
    corpus: Optional[list] = None  # plain-text files or folders of .txt files
    dataset: Optional[str] = None  # or a text dataset, through datasets.load_dataset
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    text_column: str = "text"
    dataset_streaming: bool = False
    validation_fraction: float = 0.01  # held-out sequences that judge the checkpoints
    # --- losses
    losses: Optional[dict] = None  # {loss: {weight: w or [w per stage], setting: value}} (losses.py)
    plugins: Optional[list] = None  # modules imported before the run: they may register losses

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_plan(self) -> list[dict]:
        """[{fraction, weights}] covering the run; the default is the paper's two stages.

        Weights: explicit ``stages``; else cos_nce alpha:alpha, soft 0:beta, hard 0:gamma over
        (stage1_fraction, 1 - stage1_fraction), each replaced by a ``weight`` in ``losses``
        (one number for both stages, or one per stage).
        """
        if self.stages is not None:
            return [{"fraction": float(s["fraction"]), "weights": {k: float(v) for k, v in s["weights"].items()}}
                    for s in self.stages]
        fractions = [self.stage1_fraction, 1.0 - self.stage1_fraction]
        weights = {"cos_nce": [self.alpha, self.alpha], "soft": [0.0, self.beta], "hard": [0.0, self.gamma]}
        for name, entry in (self.losses or {}).items():
            if isinstance(entry, dict) and "weight" in entry:
                w = entry["weight"]
                weights[name] = list(w) if isinstance(w, (list, tuple)) else [w] * len(fractions)
        return [{"fraction": f, "weights": {name: float(w[i]) for name, w in weights.items()}}
                for i, f in enumerate(fractions)]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    packaged = PACKAGED_CONFIGS / f"{path.name}.yaml"
    if not path.is_file() and path.suffix == "" and packaged.is_file():
        path = packaged  # --config lrc_bert: the config shipped in the package
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist (shipped configs: "
                                f"{sorted(p.stem for p in PACKAGED_CONFIGS.glob('*.yaml'))})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; valid ones are {sorted(FIELDS)}")
    return data


def build_config(yaml_path: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then the overrides that are not None."""
    values = load_yaml(yaml_path) if yaml_path else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    if values.get("stages") is not None and {"alpha", "beta", "gamma", "stage1_fraction"} & set(given):
        raise ValueError("the config sets explicit `stages`; --alpha/--beta/--gamma/--stage1-fraction would be "
                         "ignored, so remove one or the other")
    # A shortcut flag on the command line wins over the same setting in the YAML's `losses:`.
    from .losses import SETTING_SHORTCUTS

    losses = values.get("losses")
    if isinstance(losses, dict):
        losses = {name: dict(entry or {}) for name, entry in losses.items()}
        for field_name, (loss, key) in SETTING_SHORTCUTS.items():
            if field_name in given and loss in losses:
                losses[loss][key] = given[field_name]
        for field_name, (loss, stage_weights) in WEIGHT_SHORTCUTS.items():
            if field_name in given and loss in losses:
                losses[loss]["weight"] = stage_weights(given[field_name])
        values["losses"] = losses
    values.update(given)
    return TrainConfig(**values)


# --alpha/--beta/--gamma: the weights of cos_nce (both stages), soft and hard (stage 2 only).
WEIGHT_SHORTCUTS = {"alpha": ("cos_nce", lambda a: [a, a]), "beta": ("soft", lambda b: [0.0, b]),
                    "gamma": ("hard", lambda g: [0.0, g])}


def _number(cfg, name, *, minimum=None, strict=False, integer=False, optional=False):
    value = getattr(cfg, name)
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def _choice(cfg, name, options):
    if getattr(cfg, name) not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {getattr(cfg, name)!r}")


def _looks_local(ref: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is a path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).exists()


def _check_model_ref(name: str, ref: Optional[str]) -> None:
    if ref is None:
        raise ValueError(f"--{name.replace('_', '-')} is required")
    if _looks_local(ref) and not Path(ref).expanduser().exists():
        raise FileNotFoundError(f"--{name.replace('_', '-')} {ref} does not exist")


def validate(cfg: TrainConfig, command: str) -> None:
    """Every setting the command uses, with errors naming it; raises before any work starts."""

    if cfg.task not in TASK_NAMES:
        raise ValueError(f"task must be one of {', '.join(TASK_NAMES)}; got {cfg.task!r}")
    if command in ("finetune", "distill", "cache-teacher", "general-distill") and not cfg.output:
        raise ValueError("--output is required")
    _number(cfg, "epochs", minimum=0, strict=True)
    _number(cfg, "max_steps", minimum=0, strict=True, integer=True, optional=True)
    _number(cfg, "batch_size", minimum=2 if command in ("distill", "general-distill") else 1, integer=True)
    _number(cfg, "grad_accum_steps", minimum=1, integer=True)
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by grad_accum_steps {cfg.grad_accum_steps}")
    from .runtime import AUTOCAST_DTYPES

    _choice(cfg, "precision", tuple(AUTOCAST_DTYPES))
    _number(cfg, "eval_batch_size", minimum=1, integer=True)
    if cfg.cuda_graphs:
        _check_cuda_graphs(cfg, command)
    if cfg.group_by_length and cfg.max_length is not None:
        raise ValueError("group_by_length groups rows of similar length under dynamic padding: set --max-length 0")
    _number(cfg, "learning_rate", minimum=0, strict=True)
    _number(cfg, "weight_decay", minimum=0)
    _number(cfg, "warmup_ratio", minimum=0)
    if cfg.warmup_ratio >= 1:
        raise ValueError(f"warmup_ratio must be < 1, got {cfg.warmup_ratio}")
    _number(cfg, "max_grad_norm", minimum=0, strict=True)
    _number(cfg, "max_length", minimum=8, integer=True, optional=True)
    _number(cfg, "seed", integer=True)
    for name in ("eval_steps", "save_steps", "keep_checkpoints", "logging_steps"):
        _number(cfg, name, minimum=1, integer=True)
    for name in ("limit_train", "limit_eval"):
        _number(cfg, name, minimum=1, integer=True, optional=True)
    if cfg.device != "auto" and not (cfg.device in ("cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {cfg.device!r}")
    device = _check_device(cfg.device)
    if command == "finetune":
        _check_model_ref("model", cfg.model)
    if command == "evaluate":
        _check_model_ref("model", cfg.model)
    if command == "general-distill":
        _check_general(cfg)
    if command in ("distill", "cache-teacher", "general-distill"):
        _check_model_ref("teacher", cfg.teacher)
        _choice(cfg, "representation", ("sequence", "cls"))
    if command in ("distill", "general-distill"):
        for name in ("student_config", "student_init"):
            ref = getattr(cfg, name)
            if ref is not None and _looks_local(ref) and not Path(ref).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {ref} does not exist")
        for name in ("student_layers", "student_hidden", "student_heads", "student_intermediate"):
            _number(cfg, name, minimum=1, integer=True)
        _choice(cfg, "representation", ("sequence", "cls"))
        _choice(cfg, "perturb_mode", ("replace", "add"))
        _number(cfg, "num_negatives", minimum=1, integer=True, optional=True)
        _choice(cfg, "negative_source", ("batch", "bank"))
        _choice(cfg, "negatives", ("any", "other-label"))
        if cfg.negatives == "other-label":
            if get_task(cfg.task).is_regression:
                raise ValueError(f"negatives other-label needs classes; {cfg.task} is a regression task")
            if cfg.negative_source != "batch" or cfg.global_negatives:
                raise ValueError("negatives other-label draws from the local batch, whose labels it reads: use "
                                 "negative_source batch without global_negatives")
        if cfg.negative_source == "bank":
            if cfg.teacher_cache is None:
                raise ValueError("negative_source bank draws negatives from the cached teacher outputs: "
                                 "set --teacher-cache (written by `lrc-bert cache-teacher`)")
            if cfg.num_negatives is None:
                raise ValueError("negative_source bank needs --num-negatives K (negatives drawn per sample)")
            if cfg.global_negatives:
                raise ValueError("global_negatives applies to negative_source batch; the bank already holds "
                                 "the whole training set")
        if cfg.teacher_cache is not None and not (Path(cfg.teacher_cache) / "cache.json").is_file():
            raise FileNotFoundError(f"--teacher-cache {cfg.teacher_cache} is not a teacher cache (no cache.json); "
                                    "write one with `lrc-bert cache-teacher`")
        _number(cfg, "temperature", minimum=0, strict=True)
        _number(cfg, "perturb_eps", minimum=0)
        for name in ("alpha", "beta", "gamma"):
            _number(cfg, name, minimum=0)
        _number(cfg, "stage1_fraction", minimum=0)
        if cfg.stage1_fraction > 1:
            raise ValueError(f"stage1_fraction must be in [0, 1], got {cfg.stage1_fraction}")
        import lrc_kernels

        if cfg.loss_backend not in lrc_kernels.backend_names():
            raise ValueError(f"loss_backend must be one of {lrc_kernels.backend_names()}, got {cfg.loss_backend!r}")
        runnable = lrc_kernels.available_backends(device.type)
        if cfg.loss_backend != "auto" and cfg.loss_backend not in runnable:
            raise ValueError(f"loss_backend {cfg.loss_backend!r} cannot run on {device.type} here; "
                             f"available: {['auto', *runnable]}")
        if cfg.layer_map is not None and (not isinstance(cfg.layer_map, list)
                                          or not all(isinstance(i, int) and i >= 1 for i in cfg.layer_map)):
            raise ValueError(f"layer_map must be a list of teacher layers (1-based ints), got {cfg.layer_map!r}")
        check_loss_plan(cfg)
    if cfg.map_embeddings and cfg.teacher_cache is not None:
        raise ValueError("map_embeddings: the teacher cache holds the mapped transformer layers only; drop "
                         "--teacher-cache or --map-embeddings")
    if command in ("distill", "general-distill") and cfg.student_init and cfg.teacher:
        from .modeling import check_student_vocabulary

        check_student_vocabulary(cfg.student_init, cfg.teacher)
    splits = ("train", *dev_splits(get_task(cfg.task))) if command not in ("evaluate", "general-distill") else ()
    check_data_files(get_task(cfg.task), Path(cfg.data_dir) if cfg.data_dir else None, splits)
    model_ref = cfg.model if command in ("finetune", "evaluate") else cfg.teacher
    _check_model_config(cfg, command, model_ref)


def check_loss_plan(cfg: TrainConfig) -> tuple[list, dict]:
    """The stage plan and the loss objects of a run, every weight and setting checked by name."""
    from .losses import LOSSES, build_losses, import_plugins

    import_plugins(cfg.plugins)
    _check_losses_section(cfg)
    plan = cfg.stage_plan()
    total = sum(s["fraction"] for s in plan)
    if any(s["fraction"] < 0 for s in plan) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"stage fractions must be >= 0 and sum to 1, got {[s['fraction'] for s in plan]}")
    for i, stage in enumerate(plan):
        unknown = sorted(set(stage["weights"]) - set(LOSSES))
        if unknown:
            raise ValueError(f"stage {i + 1}: unknown losses {unknown}; registered: {sorted(LOSSES)}")
        if any(w < 0 for w in stage["weights"].values()):
            raise ValueError(f"stage {i + 1}: loss weights must be >= 0, got {stage['weights']}")
        if stage["fraction"] > 0 and not any(w > 0 for w in stage["weights"].values()):
            raise ValueError(f"stage {i + 1}: all loss weights are zero ({stage['weights']}); nothing would train")
    _check_in_batch_negatives(cfg, plan, LOSSES)
    return plan, build_losses(cfg, active_losses(plan))  # every used loss's settings, checked by the loss


def active_losses(plan: list) -> list[str]:
    """The losses some stage of the plan trains with (weight > 0)."""
    return sorted({name for stage in plan if stage["fraction"] > 0 for name, w in stage["weights"].items() if w > 0})


def _check_losses_section(cfg: TrainConfig) -> None:
    from .losses import LOSSES

    if cfg.losses is None:
        return
    if not isinstance(cfg.losses, dict):
        raise ValueError(f"losses must map loss names to their settings, got {cfg.losses!r}")
    for name, entry in cfg.losses.items():
        if name not in LOSSES:
            raise ValueError(f"losses: unknown loss {name!r}; registered: {sorted(LOSSES)} (a loss from another "
                             "module needs `plugins: [module]`)")
        if entry is not None and not isinstance(entry, dict):
            raise ValueError(f"losses.{name} must be a mapping of settings, got {entry!r}")
        weight = (entry or {}).get("weight")
        if weight is None:
            continue
        if cfg.stages is not None:
            raise ValueError(f"losses.{name}.weight: the config sets explicit `stages` with their weights; "
                             "give weights in one place")
        values = list(weight) if isinstance(weight, (list, tuple)) else [weight]
        if isinstance(weight, (list, tuple)) and len(values) != 2:
            raise ValueError(f"losses.{name}.weight: one number, or one per stage (2), got {weight!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values):
            raise ValueError(f"losses.{name}.weight must be finite numbers >= 0, got {weight!r}")


def _check_general(cfg: TrainConfig) -> None:
    """general-distill: a corpus (files that exist, or a dataset), fixed-length packing, no labels."""
    if (cfg.corpus is None) == (cfg.dataset is None):
        raise ValueError("general-distill takes --corpus PATH [PATH ...] or --dataset NAME (one of the two)")
    for path in cfg.corpus or ():
        if not Path(path).exists():
            raise FileNotFoundError(f"--corpus {path} does not exist")
    if cfg.max_length is None:
        raise ValueError("general-distill packs the corpus into sequences of --max-length tokens: set one (>= 8)")
    _number(cfg, "validation_fraction", minimum=0)
    if cfg.validation_fraction >= 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {cfg.validation_fraction}")
    if cfg.teacher_cache is not None or cfg.negative_source != "batch":
        raise ValueError("general-distill runs the teacher on the corpus: no --teacher-cache or bank negatives")
    if cfg.negatives != "any":
        raise ValueError("negatives other-label needs labels; the general corpus has none")


def _check_device(name: str):
    """The torch.device a run will use; a device that is not there is a settings error."""
    from .runtime import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None


def _check_in_batch_negatives(cfg: TrainConfig, plan: list, losses: dict) -> None:
    """In-batch negatives need two rows in every micro-batch a process computes its loss on."""
    uses_negatives = any(s["fraction"] > 0 and w > 0 and getattr(losses[name], "needs_representations", False)
                         for s in plan for name, w in s["weights"].items())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not uses_negatives or cfg.negative_source != "batch" or (cfg.global_negatives and world > 1):
        return
    micro = cfg.batch_size // (world * cfg.grad_accum_steps)
    if micro < 2:
        raise ValueError(f"each micro-batch holds {micro} example (batch_size {cfg.batch_size} / (world size {world} "
                         f"x grad_accum_steps {cfg.grad_accum_steps})), but in-batch COS-NCE negatives need at "
                         "least 2: raise --batch-size, lower --grad-accum-steps, or use --global-negatives under "
                         "torchrun")


def _check_model_config(cfg: TrainConfig, command: str, ref: Optional[str]) -> None:
    """What the model's config.json can tell before any weights load: its position limit, and
    for finetune whether its classification head fits the task."""
    from .modeling import check_head_fits, read_model_config

    if ref is None:
        return
    config = read_model_config(ref)
    if config is None:
        return
    limit = getattr(config, "max_position_embeddings", None)
    if cfg.max_length is not None and limit is not None and cfg.max_length > limit:
        raise ValueError(f"max_length {cfg.max_length} is above the {limit} positions of {ref} "
                         f"(max_position_embeddings); use --max-length {limit} or less")
    if command == "finetune":
        check_head_fits(ref, config, get_task(cfg.task), cfg.ignore_mismatched_sizes)


def _check_cuda_graphs(cfg: TrainConfig, command: str) -> None:
    """What a captured step cannot do, refused before any work (see cuda_graph.py)."""
    import os

    if command not in ("finetune", "distill", "general-distill"):
        raise ValueError(f"cuda_graphs applies to training (finetune, distill, general-distill), not {command}")
    if cfg.device == "cpu" or cfg.device == "mps":
        raise ValueError(f"cuda_graphs needs a CUDA device, got device {cfg.device!r}")
    if cfg.precision == "fp16":
        raise ValueError("cuda_graphs works with precision fp32 or bf16: fp16's gradient scaler checks for "
                         "overflow on the host every step")
    if cfg.max_length is None:
        raise ValueError("cuda_graphs needs fixed shapes: set --max-length (dynamic padding changes them per batch)")
    if cfg.compile_student:
        raise ValueError("cuda_graphs and compile_student: choose one (the graph already removes the launch cost)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("cuda_graphs runs in one process; under torchrun, DDP's gradient all-reduce is "
                         "not captured: drop --cuda-graphs")


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
