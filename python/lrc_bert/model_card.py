"""The model card written beside every export (``model/README.md``, ``student/README.md``), in the
Hugging Face format: YAML metadata (``model-index`` holds the dev metrics), then text saying what
was trained, from what, by which method and variant, and with which settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .tasks import TaskSpec

HUB_DATASETS = {"snli": ("stanfordnlp/snli", None)}  # the others: the GLUE configs


def method_variant(cfg, command: str) -> tuple[str, str]:
    """(method, variant) of a run, as the paper names them."""
    if command == "finetune":
        return "fine-tuning", "teacher"
    if cfg.student_init:
        return "LRC-BERT", f"LRC-BERT: task distillation from the pretrained student {cfg.student_init}"
    return "LRC-BERT", "LRC-BERT1: task distillation only, from a randomly initialised student"


def render(cfg, command: str, task: TaskSpec, best: dict, main_key: str, parameters: int) -> str:
    import yaml

    method, variant = method_variant(cfg, command)
    dataset, config = HUB_DATASETS.get(task.name, ("nyu-mll/glue", task.name))
    metrics = {k: v for k, v in (best.get("metrics") or {}).items() if isinstance(v, (int, float))}
    base = cfg.model if command == "finetune" else cfg.teacher
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["lrc-bert", "knowledge-distillation", "lrc-kernels"] if command == "distill" else ["lrc-kernels"],
        "datasets": [dataset],
        "metrics": sorted({k.split("/", 1)[1] for k in metrics}),
        "model-index": [{
            "name": Path(cfg.output).name + ("/model" if command == "finetune" else "/student"),
            "results": [{
                "task": {"type": "text-classification", "name": task.name},
                "dataset": {"type": dataset, "name": task.name.upper(), **({"config": config} if config else {}),
                            "split": split},
                "metrics": [{"type": name, "value": round(float(value), 6)}
                            for key, value in metrics.items() if key.split("/", 1)[0] == split
                            for name in [key.split("/", 1)[1]]],
            } for split in sorted({k.split("/", 1)[0] for k in metrics})],
        }],
    }
    if command == "distill":
        meta["base_model"] = str(base)  # the teacher it was distilled from
    settings = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("output", "cache_dir")}
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {task.name.upper()} {'student' if command == 'distill' else 'model'} ({method})", "",
        f"- **Task**: {task.name}, main metric {main_key}.",
        f"- **Method**: {method}" + (" (Fu et al., AAAI 2021): COS-NCE on the mapped intermediate layers, soft and "
                                     "hard prediction losses in two stages, and gradient perturbation of the "
                                     "embeddings." if command == "distill" else "."),
        f"- **Variant**: {variant}.",
        f"- **{'Teacher' if command == 'distill' else 'Base model'}**: {base}.",
        f"- **Parameters**: {parameters / 1e6:.1f}M.",
        f"- **Best checkpoint**: step {best.get('step')}, {main_key} = {best.get('value')}.",
        "",
        "## Dev metrics", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
        "",
        "## Settings", "",
        "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```", "",
        "Trained with `lrc-bert` from lrc-kernels. Loads with `AutoModelForSequenceClassification.from_pretrained`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, cfg, command: str, task: TaskSpec, best: dict, main_key: str) -> None:
    """README.md in an export folder (the weights are read for their parameter count only)."""
    from safetensors import safe_open

    parameters = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            parameters += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    (Path(folder) / "README.md").write_text(render(cfg, command, task, best, main_key, parameters))
