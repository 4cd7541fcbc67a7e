"""The whole training step replayed as one CUDA graph (``--cuda-graphs``).

At the paper's batch (B = 16, L = 128) a distillation step is bound by the host, not the
GPU: about 1,300 kernel launches (two student passes for the gradient perturbation, their
backward passes, the teacher, AdamW), Python in the Hugging Face modules and autocast
casts cost some 60 ms of CPU per step for under 10 ms of GPU work. A CUDA graph records
those launches once and replays them with one call.

What is captured is the trainer's ``_update``: for every micro-batch the method's
``compute_step`` (forward passes, perturbation, backward), then gradient clipping and the
AdamW step (``capturable``: its step count and learning rate are device tensors; the
scheduler fills the rate between replays). The host part stays outside: data, the stage,
teacher-cache rows and negative indices come from ``prepare_step`` and are copied into
the graph's static input tensors before each replay. Index values are not checked inside a
graph (``lrc_kernels`` skips its range check under capture): the method draws them in range.

One graph per key (the method's host values, e.g. the stage, and the input shapes and
dtypes): the first ``warmup_steps`` steps of a key run eagerly on a side stream (they are
real training steps; they also create the optimiser state and compile the kernels), the
next one is captured and every later one replays it. Each graph keeps its own memory
pool, so the gradients it writes can never alias another graph's tensors.

Not captured, and refused up front by the config check: fp16 (its gradient scaler checks
for overflow on the host), DDP (the all-reduce), ``compile_student``, dynamic padding.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .runtime import to_device

log = logging.getLogger("lrc_bert")


class StepGraphs:
    """Runs ``update(inputs, info) -> (parts, grad_norm)`` eagerly, then as captured graphs."""

    def __init__(self, update: Callable, device: torch.device, warmup_steps: int = 2, max_graphs: int = 8):
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        self.update, self.device = update, device
        self.warmup_steps, self.max_graphs = warmup_steps, max_graphs
        self.graphs: dict = {}  # key -> (graph, static input leaves, static outputs)
        self.eager_runs: dict = {}  # key -> eager steps done so far
        self.side_stream = torch.cuda.Stream(device)

    def run(self, inputs: list, info: dict) -> tuple[dict, torch.Tensor]:
        """``inputs``: a nest of tensors (the micro-batches' ``prepare_step`` outputs)."""
        leaves, spec = tree_flatten(inputs)
        if not all(t is None or isinstance(t, torch.Tensor) for t in leaves):  # None is a leaf in some torch versions
            raise TypeError("cuda_graphs: prepare_step must return only tensors (and None) as step inputs")
        key = tuple(sorted(info.items())), spec, tuple(t if t is None else (t.shape, t.dtype) for t in leaves)
        entry = self.graphs.get(key)
        if entry is None:
            if self.eager_runs.get(key, 0) < self.warmup_steps:
                self.eager_runs[key] = self.eager_runs.get(key, 0) + 1
                return self._eager(to_device(inputs, self.device), info)
            entry = self.graphs[key] = self._capture(leaves, spec, info)
        graph, static_leaves, (parts, grad_norm) = entry
        for static, value in zip(static_leaves, leaves):
            if value is None:
                continue
            # From pinned memory the copy is asynchronous: the host goes on to the next batch.
            if value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            static.copy_(value, non_blocking=True)
        graph.replay()
        # The static outputs are overwritten by the next replay: hand out copies.
        return {k: v.clone() for k, v in parts.items()}, grad_norm.clone()

    def _eager(self, inputs, info):
        # On a side stream, as PyTorch's whole-network capture recipe asks of the warm-up.
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            out = self.update(inputs, info)
        current.wait_stream(self.side_stream)
        return out

    def _capture(self, leaves: list, spec, info: dict):
        if len(self.graphs) >= self.max_graphs:
            raise RuntimeError(
                f"cuda_graphs: more than {self.max_graphs} different step shapes or stages; every new one is "
                "captured again. Pad every batch to the same --max-length (and keep the batch size fixed)")
        static_leaves = [t if t is None else t.clone() for t in to_device(leaves, self.device)]
        log.info("cuda_graphs: capturing the training step for %s", dict(info) or "the run")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.update(tree_unflatten(static_leaves, spec), info)
        except RuntimeError as error:
            raise RuntimeError(
                f"cuda_graphs: the training step could not be captured ({error}). Something in it waits for the "
                "GPU or copies from the host; run without --cuda-graphs") from error
        return graph, static_leaves, outputs
