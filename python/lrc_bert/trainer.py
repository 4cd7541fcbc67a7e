"""The training loop shared by ``finetune`` and ``distill``.

A *method* (``FinetuneMethod``, ``DistillMethod``; the protocol is in ``method.py``) owns
the models and the loss: it computes a step's gradients (``prepare_step`` then
``compute_step``) and predictions (``predict``). The trainer
owns everything around them: data order, optimiser and schedule, clipping, evaluation
and the best checkpoint, resumable checkpoints, and logging (tqdm, metrics.jsonl,
TensorBoard).

Exact resume: the data order of epoch e is a permutation drawn from ``seed + e``, so the
position in the data is just (epoch, batch); that, the optimiser, the scheduler, the
loss scaler, every rank's RNG and the method's own state are in each checkpoint.

Batches and ranks: ``batch_size`` is the *global* batch of one optimiser step. Under
torchrun each of the W ranks takes its contiguous share (B / W rows) of every global
batch, and splits it into ``grad_accum_steps`` micro-batches; gradients are synchronised
by DDP on the last micro-batch only. Because the step, the data order and the schedule
do not depend on W, a run resumes on any number of processes. Rank 0 evaluates, logs and
writes checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .method import Method
from .metrics import compute_metrics
from .runtime import Runtime, to_device
from .tasks import TaskSpec

log = logging.getLogger("lrc_bert")

# fp16: the GradScaler skips a step whose gradients overflowed (normal); this many in a row is not.
MAX_CONSECUTIVE_SKIPPED_STEPS = 25


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm became NaN or Inf; the run stopped, keeping its last good checkpoint."""


class MetricsLog:
    """metrics.jsonl (one JSON object per line, appended) and TensorBoard scalars."""

    def __init__(self, output: Path, tensorboard: bool, resumed_step: Optional[int] = None):
        self.path = output / "metrics.jsonl"
        self.writer = None
        if resumed_step is not None:
            self._drop_records_after(resumed_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
            else:
                # purge_step: TensorBoard hides what an interrupted run logged after the checkpoint
                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resumed_step)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: their old records go, so that
        metrics.jsonl reads as one uninterrupted run (rewritten atomically)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def run_info(self, step: int, info: dict) -> None:
        """What the run is (method, variant, ...): an event line, and TensorBoard text."""
        self.write("event", step, {"event": "run", **info})
        if self.writer is not None:
            self.writer.add_text("run", json.dumps(info), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def evaluate(predict: Callable, datasets_by_split: dict, collate, task: TaskSpec, batch_size: int,
             device: torch.device, progress: bool = True) -> dict:
    """{split/metric: value} over each evaluation split, each with its own loader."""
    from tqdm.auto import tqdm

    out = {}
    for split, ds in datasets_by_split.items():
        preds, labels = [], []
        for start in tqdm(range(0, len(ds), batch_size), desc=f"eval {split}", leave=False, disable=not progress):
            batch = collate(ds[start:start + batch_size])
            labels.append(batch["labels"].numpy())
            with torch.no_grad():
                preds.append(predict(to_device(batch, device)).cpu().numpy())
        metrics = compute_metrics(task, np.concatenate(preds), np.concatenate(labels))
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
    return out


def set_lr_kind(optimizer, as_tensor: bool, device: torch.device) -> None:
    """Learning rates as device tensors (read by a captured AdamW at each replay, filled by the
    scheduler) or as floats (the eager optimiser); checkpoints may hold either."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if as_tensor and not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        elif not as_tensor and isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)


class FiniteGuard:
    """Watches every step's loss parts and gradient norm on the device (no host sync per step).

    Records the first step whose loss or applied gradient norm was NaN or Inf, and which loss
    parts were. With fp16, a non-finite gradient norm means the GradScaler skipped that step
    (normal); only ``MAX_CONSECUTIVE_SKIPPED_STEPS`` skips in a row count as a failure.
    """

    def __init__(self, device: torch.device, fp16: bool):
        self.device, self.fp16 = device, fp16
        self.names: Optional[list[str]] = None
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_parts: Optional[torch.Tensor] = None
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.skip_run = torch.zeros((), dtype=torch.long, device=device)
        self.longest_skip_run = torch.zeros((), dtype=torch.long, device=device)

    def record(self, step: int, parts: dict, grad_norm: torch.Tensor) -> None:
        tensors = {k: v for k, v in parts.items() if isinstance(v, torch.Tensor)}
        if self.names is None or list(tensors) != self.names[:-1]:
            self.names = [*tensors, "grad_norm"]
            self.bad_parts = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)
        values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]
                             + [grad_norm.detach().float().reshape(())])
        bad = ~torch.isfinite(values)
        if self.fp16:  # a skipped step (overflowed gradients) is not a failure by itself
            skipped = bad[-1].long()
            self.skipped += skipped
            self.skip_run = (self.skip_run + 1) * skipped
            self.longest_skip_run = torch.maximum(self.longest_skip_run, self.skip_run)
            bad = torch.cat([bad[:-1], torch.zeros(1, dtype=torch.bool, device=self.device)])
        first = (self.first_bad_step < 0) & bad.any()
        self.first_bad_step = torch.where(first, torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.bad_parts = torch.where(first, bad, self.bad_parts)

    def failure(self, step: int) -> Optional[str]:
        """None while every step was finite; else what went wrong, for the error message."""
        if self.names is None:
            return None
        first = int(self.first_bad_step)
        if first >= 0:
            parts = [n for n, b in zip(self.names, self.bad_parts.tolist()) if b]
            return f"step {first + 1}: non-finite {', '.join(parts)}"
        if self.fp16 and int(self.longest_skip_run) >= MAX_CONSECUTIVE_SKIPPED_STEPS:
            return (f"by step {step}: the fp16 gradients overflowed in {int(self.longest_skip_run)} consecutive steps "
                    "(each skipped by the gradient scaler); the model has diverged or fp16 cannot hold it (try bf16)")
        return None

    def skipped_total(self) -> int:
        return int(self.skipped)


class Trainer:
    def __init__(self, cfg: TrainConfig, method: Method, train_set, eval_sets: dict, collate, task: TaskSpec,
                 runtime: Runtime, main_split: str):
        self.cfg, self.method, self.train_set, self.eval_sets = cfg, method, train_set, eval_sets
        self.collate, self.task, self.runtime, self.device = collate, task, runtime, runtime.device
        self.output = Path(cfg.output)
        self.checkpoints = self.output / "checkpoints"
        # A method may judge its own checkpoints (general distillation: the held-out loss, lower is better).
        self.main_key, self.higher_is_better = getattr(method, "main_metric", None) or (
            f"{main_split}/{task.main_metric}", True)
        shares = runtime.world_size * cfg.grad_accum_steps
        if cfg.batch_size % shares:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by world size "
                             f"{runtime.world_size} x grad_accum_steps {cfg.grad_accum_steps}")
        self.micro_batch = cfg.batch_size // shares
        self.steps_per_epoch = len(train_set) // cfg.batch_size  # drop_last: in-batch negatives need full batches
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_set)} examples, fewer than one batch of "
                             f"{cfg.batch_size}")
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        method.total_steps = self.total_steps
        params = method.param_groups(cfg.weight_decay)
        graphs = cfg.cuda_graphs
        # capturable: AdamW's step count and learning rate live on the device, so a graph can replay it
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, **({"capturable": True} if graphs else {}))
        self.parameters = [p for group in params for p in group["params"]]  # what gets clipped
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        set_lr_kind(self.optimizer, graphs, self.device)  # after the scheduler: its base rates stay floats
        self.graphs = None
        if graphs:
            from .cuda_graph import StepGraphs

            self.graphs = StepGraphs(self._update, self.device)
        self.step = 0
        self.best = {"value": None, "step": None, "metrics": None}
        from .data import data_fingerprint

        self.data_fingerprint = train_set.fingerprint() if hasattr(train_set, "fingerprint") else \
            data_fingerprint(train_set)
        self.guard = FiniteGuard(self.device, fp16=runtime.scaler is not None)
        self._lengths: Optional[torch.Tensor] = None  # token counts of the training rows, for group_by_length

    # ------------------------------------------------------------------ state

    def _state(self, rng_per_rank: list) -> dict:
        scaler = self.runtime.scaler
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng_per_rank": rng_per_rank, "best": self.best,
                "method": self.method.state_dict(), "total_steps": self.total_steps,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "data": {"fingerprint": self.data_fingerprint, "num_examples": len(self.train_set)}}

    def save(self, collective: bool = True) -> Optional[Path]:
        """Rank 0 writes the checkpoint (with every rank's RNG state); the others wait.
        ``collective=False`` (on Ctrl-C, when other ranks may be gone): rank 0 alone, its own RNG."""
        self.check_finite(collective)  # never checkpoint a diverged model
        rng = self.runtime.gather_objects(ckpt.rng_state()) if collective else [ckpt.rng_state()]
        path = None
        if self.runtime.is_main:
            path = ckpt.save_checkpoint(self.checkpoints, self.step, self.method.modules, self._state(rng),
                                        self.cfg.to_dict(), self.cfg.keep_checkpoints)
        if collective:
            self.runtime.barrier()
        return path

    def resume(self) -> bool:
        """Continue from the newest checkpoint that verifies; a damaged one is named and skipped."""
        found = ckpt.list_checkpoints(self.checkpoints)
        if not found:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.checkpoints)
            return False
        for path in reversed(found):
            self._check_settings(path)
            try:
                state = ckpt.load_checkpoint(path, self.method.modules, self.device)
            except ckpt.CorruptCheckpointError as exc:
                older = [p.name for p in found if p < path]
                if not older:
                    raise ckpt.CorruptCheckpointError(
                        f"--resume: {exc}, and no older checkpoint is left in {self.checkpoints}. Start over with "
                        "--overwrite-output (this deletes the run), or restore the file from a backup") from None
                log.warning("--resume: %s; falling back to the previous checkpoint %s", exc, older[-1])
                continue
            self._load_state(path, state)
            return True
        raise AssertionError("unreachable")

    def _check_settings(self, path: Path) -> None:
        saved = json.loads((path / "config.json").read_text())
        ignore = {"output", "resume", "device", "max_steps", "epochs", "eval_steps", "save_steps", "keep_checkpoints",
                  "logging_steps", "tensorboard", "cache_dir", "data_dir", "loss_backend", "grad_accum_steps",
                  "compile_student", "teacher_cache", "cuda_graphs", "overwrite_output"}
        now = self.cfg.to_dict()
        for values in (saved, now):  # the op's backend may change on resume, here as for --loss-backend
            values["losses"] = {name: {k: v for k, v in (entry or {}).items() if k != "backend"}
                                for name, entry in (values.get("losses") or {}).items()} or None
        changed = {k: (saved.get(k), v) for k, v in now.items() if k not in ignore and saved.get(k) != v}
        if changed:
            raise ValueError(f"--resume: these settings differ from the checkpoint's {path}: "
                             + ", ".join(f"{k} (was {a!r}, now {b!r})" for k, (a, b) in changed.items()))

    def _load_state(self, path: Path, state: dict) -> None:
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"--resume: the run length changed ({state['total_steps']} -> {self.total_steps} steps); "
                             "the learning-rate schedule would not match")
        data = state.get("data")
        if data is not None and data["fingerprint"] != self.data_fingerprint:
            raise ValueError(
                f"--resume: the training data differ from the checkpointed run's ({path}): it trained on "
                f"{data['num_examples']} examples with token-id fingerprint {data['fingerprint']}, this run has "
                f"{len(self.train_set)} with {self.data_fingerprint} (another data file, tokenizer, --max-length "
                "or --limit-train?)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_lr_kind(self.optimizer, self.graphs is not None, self.device)
        self.method.load_state_dict(state["method"])
        if self.runtime.scaler is not None and state.get("scaler"):
            self.runtime.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]  # "rng": checkpoints from before DDP
        if self.runtime.rank < len(per_rank):
            ckpt.set_rng_state(per_rank[self.runtime.rank])
        else:  # more ranks than when it was saved: a fresh stream per new rank
            ckpt.set_rng_state(per_rank[0])
            torch.manual_seed(self.cfg.seed + 7919 * self.runtime.rank + self.step)
        self.step, self.best = state["step"], state["best"]
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)

    def check_finite(self, collective: bool = True) -> None:
        """Raise :class:`TrainingDiverged` if any step so far had a non-finite loss or gradient norm
        (one host sync; called at logging, evaluation and checkpoint steps, and at the end)."""
        failure = self.guard.failure(self.step)
        bad = failure is not None
        if collective and self.runtime.distributed:
            bad = bool(self.runtime.max_int(int(bad)))
            failure = failure or "another process's loss became non-finite"
        if bad:
            good = ckpt.latest_checkpoint(self.checkpoints)
            kept = (f"the last good checkpoint is {good} (continue from it with --resume, after lowering "
                    "--learning-rate or changing what diverged)") if good else "no checkpoint had been written yet"
            raise TrainingDiverged(f"{failure}; training stopped and nothing non-finite was saved or exported; {kept}")

    # ------------------------------------------------------------------ loop

    def batches(self, start_step: int):
        """(step, this rank's micro-batches) from start_step on.

        Epoch e's order is a permutation drawn from seed + e (``epoch_order``); global batch i is
        its slice [i B, (i + 1) B), of which rank r takes rows [r B / W, (r + 1) B / W). Each
        batch carries ``index``, the rows' positions in the training set (for the teacher cache).
        """
        bs, micro = self.cfg.batch_size, self.micro_batch
        share = bs // self.runtime.world_size
        step = start_step
        while step < self.total_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            for i in range(offset, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                mine = order[i * bs + self.runtime.rank * share:i * bs + (self.runtime.rank + 1) * share]
                batches = []
                for j in range(0, share, micro):
                    index = mine[j:j + micro]
                    batch = self.collate(self.train_set[index.tolist()])
                    batch["index"] = index
                    batches.append(batch)
                yield step, batches
                step += 1

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The training set's order in an epoch: a permutation drawn from seed + epoch. With
        ``group_by_length`` (dynamic padding), each window of 64 batches is sorted by length and
        its batches are shuffled again, so that a batch pads to similar lengths while the order
        stays random and a function of (seed, epoch) only: exact resume is unaffected."""
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(len(self.train_set), generator=generator)
        if not self.cfg.group_by_length:
            return order
        if self._lengths is None:
            self._lengths = torch.tensor([len(ids) for ids in self.train_set["input_ids"]])
        bs, window = self.cfg.batch_size, self.cfg.batch_size * 64
        grouped = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[torch.argsort(self._lengths[chunk], descending=True, stable=True)]
            batches = list(chunk.split(bs))
            full, rest = (batches[:-1], batches[-1:]) if len(batches[-1]) < bs else (batches, [])
            shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
            grouped += shuffled + rest
        return torch.cat(grouped)

    def optimizer_step(self, step: int, batches: list) -> tuple[dict, torch.Tensor]:
        """One optimiser step over this rank's micro-batches.

        Returns (loss parts averaged over the micro-batches, as 0-dim device tensors, with the
        method's host values such as the stage; the gradient norm): nothing here waits for the
        device, so the host prepares the next batch while this one runs.
        """
        prepared = [self.method.prepare_step(batch, step) for batch in batches]
        inputs, info = [p[0] for p in prepared], prepared[-1][1]
        if self.graphs is not None:
            parts, grad_norm = self.graphs.run(inputs, info)
        else:
            parts, grad_norm = self._update(to_device(inputs, self.device), info)
        self.guard.record(step, parts, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**parts, **info}, grad_norm

    def _update(self, inputs: list, info: dict) -> tuple[dict, torch.Tensor]:
        """The device part of a step: every micro-batch's passes, clipping, the optimiser step.
        Host-sync free (but for fp16's scaler), so that ``cuda_graph`` can capture it."""
        runtime = self.runtime
        runtime.loss_factor = 1.0 / len(inputs)
        totals: dict = {}
        for i, micro in enumerate(inputs):
            last = i == len(inputs) - 1
            with contextlib.nullcontext() if last else self.method.no_sync():
                parts = self.method.compute_step(micro, info)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / len(inputs)
        if runtime.scaler is not None:
            runtime.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.max_grad_norm)
        if runtime.scaler is not None:
            runtime.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            runtime.scaler.update()
        else:
            self.optimizer.step()
        return totals, grad_norm

    def evaluate(self) -> dict:
        for module in self.method.modules.values():
            module.eval()
        try:
            if hasattr(self.method, "evaluate"):
                return self.method.evaluate(self.eval_sets)
            return evaluate(self.method.predict, self.eval_sets, self.collate, self.task, self.cfg.eval_batch_size,
                            self.device)
        finally:
            for module in self.method.modules.values():
                module.train()

    def _evaluate_and_keep_best(self, metrics_log: Optional[MetricsLog]) -> dict:
        """Rank 0 evaluates and keeps the best model; the others wait (and get {})."""
        metrics = {}
        self.check_finite()  # a diverged model is never evaluated into best/
        if self.runtime.is_main:
            metrics = self.evaluate()
            metrics_log.write("eval", self.step, metrics)
            value = metrics.get(self.main_key)
            improved = self.best["value"] is None or (value > self.best["value"] if self.higher_is_better
                                                      else value < self.best["value"])
            if value is not None and improved:
                self.best = {"value": value, "step": self.step, "metrics": metrics}
                self.method.save_best(self.checkpoints / "best")
                metrics_log.write("event", self.step, {"event": "new_best", self.main_key: value})
        self.runtime.barrier()
        return metrics

    def fit(self, resume: bool = False, on_step: Optional[Callable[[int], None]] = None) -> dict:
        """Train to the end; returns the final dev metrics (on rank 0). Ctrl-C saves a checkpoint first."""
        from tqdm.auto import tqdm

        main = self.runtime.is_main
        self.output.mkdir(parents=True, exist_ok=True)
        if main:
            for stale in ckpt.remove_stale(self.checkpoints):
                log.info("removed %s, left by an interrupted write", stale)
        self.runtime.barrier()
        resumed = self.resume() if resume else False
        metrics_log = MetricsLog(self.output, self.cfg.tensorboard, self.step if resumed else None) if main else None
        if main and not resumed and hasattr(self.method, "run_info"):
            metrics_log.run_info(self.step, self.method.run_info())
        for module in self.method.modules.values():
            module.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=getattr(self.method, "name", self.cfg.task), dynamic_ncols=True,
                   disable=not main)
        last_saved = self.step
        try:
            with contextlib.closing(bar):
                for step, batches in self.batches(self.step):
                    parts, grad_norm = self.optimizer_step(step, batches)
                    self.step = step + 1
                    bar.update(1)
                    if self.step % self.cfg.logging_steps == 0 or self.step == self.total_steps:
                        # The only host sync of a step, and only on logging steps.
                        self.check_finite()
                        parts = self.runtime.mean_dict(
                            {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in parts.items()})
                        bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items() if k != "stage"}, refresh=False)
                        if main:
                            extra = {"skipped_steps": self.guard.skipped_total()} if self.guard.fp16 else {}
                            metrics_log.write("train", self.step, {**parts, "lr": float(self.scheduler.get_last_lr()[0]),
                                                                   "grad_norm": float(grad_norm), **extra})
                    for event in getattr(self.method, "pop_events", lambda: [])():
                        if main:
                            bar.write(f"step {self.step}: {event}")
                            metrics_log.write("event", self.step, {"event": event})
                    if self.step % self.cfg.eval_steps == 0 and self.step < self.total_steps:
                        self._evaluate_and_keep_best(metrics_log)
                    if self.step % self.cfg.save_steps == 0 and self.step < self.total_steps:
                        self.save()
                        last_saved = self.step
                    if on_step is not None:
                        on_step(self.step)
            final = self._evaluate_and_keep_best(metrics_log)
            self.save()
            if main:
                metrics_log.write("event", self.step, {"event": "done", "best_step": self.best["step"],
                                                       f"best/{self.main_key}": self.best["value"]})
        except KeyboardInterrupt:
            if self.step > last_saved and main and self.guard.failure(self.step) is None:
                path = self.save(collective=not self.runtime.distributed)
                log.warning("interrupted: saved %s; continue with --resume", path)
            raise
        except TrainingDiverged as exc:
            if main:
                metrics_log.write("event", self.step, {"event": "diverged", "error": str(exc)})
            raise
        finally:
            if main:
                metrics_log.close()
        return final
