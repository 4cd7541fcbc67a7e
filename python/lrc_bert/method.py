"""What a training method is, for the trainer: the ``Method`` protocol, and the helpers
methods share. A method never imports the training loop; the loop imports this."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .runtime import to_device


class Method(Protocol):
    """A training method. A step is split in two so that the device part can be captured
    as a CUDA graph (``cuda_graph.py``): ``prepare_step`` does the host work (data, stage,
    cached rows, sampled indices) and ``compute_step`` only device work (forward passes and
    backward; no host syncs, no host-to-device copies)."""

    modules: dict  # name -> nn.Module, saved in checkpoints
    total_steps: int

    def param_groups(self, weight_decay: float) -> list: ...

    def prepare_step(self, batch: dict, step: int) -> tuple[dict, dict]:
        """(tensors for compute_step, host values such as the stage: shown and logged; a graph key)."""

    def compute_step(self, inputs: dict, info: dict) -> dict:
        """Runs the step's forward and backward passes; returns the loss parts as 0-dim tensors."""

    def no_sync(self): ...  # context: no DDP gradient synchronisation (all but the last micro-batch)

    def predict(self, batch: dict) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_best(self, folder: Path) -> None: ...

    # Optional: a method that judges its own checkpoints (general distillation: the held-out
    # loss) has ``main_metric = (key, higher_is_better)`` and ``evaluate(eval_sets) -> {key: value}``;
    # otherwise the trainer runs ``predict`` over the eval sets and the task's metrics.


def run_step(method: "Method", batch: dict, step: int) -> dict:
    """One micro-batch step of ``method`` outside the trainer: gradients accumulate in the
    parameters; returns the loss parts as floats, with the step's host values."""
    inputs, info = method.prepare_step(batch, step)
    parts = method.compute_step(to_device(inputs, method.runtime.device), info)
    return {**{k: float(v) for k, v in parts.items()}, **info}


def decay_groups(named_params, weight_decay: float) -> list:
    """AdamW groups: no decay on biases and LayerNorm weights (the BERT recipe)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
