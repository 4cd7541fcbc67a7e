"""The teacher, run once: its logits and mapped-layer representations in fp16 memory maps.

``lrc-bert cache-teacher`` runs the frozen teacher over the (tokenised) training set and
writes, under ``--output``::

    cache.json     what was cached, and a fingerprint of the tokenised data it belongs to
    logits.npy     [N, C]             the teacher's logits (fp16 .npy, memory-mapped when read)
    reps.npy       [layers, N, F]     one representation per cached teacher layer, layer-major
                                      so that each layer is one contiguous [N, F] bank

F is L * d for the ``sequence`` representation (fixed padding to ``max_length``; padding
tokens zeroed by the attention mask) and d for ``cls``. The disk need is stated before
anything runs, and the command refuses when the file system does not have it. The folder
is written atomically.

``distill --teacher-cache`` then never runs the teacher: each batch reads its rows by
index, and ``--negative-source bank`` draws K negatives per sample from a whole cached
layer (the memory bank), passed to the fused op in indexed mode.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import atomic_directory
from .data import data_fingerprint
from .modeling import representation

log = logging.getLogger("lrc_bert")

VERSION = 1
# Settings that must agree between the cache and the run that reads it.
MATCHED = ("task", "representation", "max_length", "limit_train")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def write_teacher_cache(cfg, teacher, train_set, collate, teacher_layers: list[int], device: torch.device,
                        precision: str = "fp32") -> Path:
    """Run the teacher over ``train_set`` in order and write the cache folder ``cfg.output``."""
    from tqdm.auto import tqdm

    from .data import model_inputs
    from .runtime import Runtime

    if cfg.representation == "sequence" and not cfg.max_length:
        raise ValueError("cache-teacher with the sequence representation needs fixed padding: set --max-length")
    n = len(train_set)
    d = teacher.config.hidden_size
    features = d * (cfg.max_length if cfg.representation == "sequence" else 1)
    classes = teacher.config.num_labels
    need = 2 * n * (classes + len(teacher_layers) * features)
    out = Path(cfg.output)
    free = _free_bytes(out.parent if not out.exists() else out)
    log.info("teacher cache: %d examples x %d layers x %d features + %d logits, fp16: %s on disk (%s free at %s)",
             n, len(teacher_layers), features, classes, human_bytes(need), human_bytes(free), out)
    if need + (64 << 20) > free:
        raise OSError(f"--output {out}: the teacher cache needs {human_bytes(need)} but only {human_bytes(free)} "
                      "is free there; use another folder, --representation cls, or --limit-train")
    runtime = Runtime(device, precision)
    teacher = teacher.to(device).eval().requires_grad_(False)
    with atomic_directory(out) as tmp:
        logits = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float16, shape=(n, classes))
        reps = np.lib.format.open_memmap(tmp / "reps.npy", mode="w+", dtype=np.float16,
                                         shape=(len(teacher_layers), n, features))
        batch_size = cfg.eval_batch_size
        for start in tqdm(range(0, n, batch_size), desc="cache-teacher", unit="batch"):
            batch = collate(train_set[start:start + batch_size])
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            with torch.no_grad(), runtime.autocast():
                result = teacher(**inputs, output_hidden_states=True)
            stop = start + batch["input_ids"].shape[0]
            logits[start:stop] = result.logits.float().cpu().numpy()
            for j, layer in enumerate(teacher_layers):
                rep = representation(result.hidden_states[layer].float(), inputs["attention_mask"],
                                     cfg.representation)
                reps[j, start:stop] = rep.cpu().numpy()
        logits.flush()
        reps.flush()
        del logits, reps
        meta = {"version": VERSION, "teacher": str(cfg.teacher), "teacher_layers": teacher_layers,
                "num_examples": n, "features": features, "num_logits": classes,
                "fingerprint": data_fingerprint(train_set), **{k: getattr(cfg, k) for k in MATCHED}}
        (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote the teacher cache to %s", out)
    return out


class TeacherCache:
    """Read side: rows by index for each batch, and whole layers as negative banks."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "cache.json").read_text())
        if self.meta.get("version") != VERSION:
            raise ValueError(f"--teacher-cache {folder}: format version {self.meta.get('version')}, "
                             f"this lrc_bert reads version {VERSION}; write it again")
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
        self.reps = np.load(self.folder / "reps.npy", mmap_mode="r")
        self.layers = list(self.meta["teacher_layers"])

    def check(self, cfg, train_set) -> None:
        """Refuse a cache made for other data or settings, naming what differs."""
        where = f"--teacher-cache {self.folder}"
        diff = [f"{k} (cache {self.meta.get(k)!r}, run {getattr(cfg, k)!r})" for k in MATCHED
                if self.meta.get(k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"{where} was written with other settings: {', '.join(diff)}")
        if self.meta["num_examples"] != len(train_set) or self.meta["fingerprint"] != data_fingerprint(train_set):
            raise ValueError(f"{where} was written for another training set ({self.meta['num_examples']} examples, "
                             f"fingerprint {self.meta['fingerprint']}); this run has {len(train_set)}: "
                             "write the cache again")

    def check_layers(self, teacher_layers: list[int]) -> None:
        missing = sorted(set(teacher_layers) - set(self.layers))
        if missing:
            raise ValueError(f"--teacher-cache {self.folder} holds teacher layers {self.layers}; the layer map "
                             f"needs {missing} too: write it with the same --layer-map / --student-layers")

    def rows(self, index: torch.Tensor, teacher_layers: list[int], device: torch.device,
             dtype: Optional[torch.dtype] = None, pin: bool = False):
        """(logits [B, C], [reps [B, F] per teacher layer]) for the examples ``index``.

        ``pin`` (with ``device`` cpu): gathered straight into pinned memory, so that the copy
        to the GPU that follows is asynchronous.
        """
        idx = index.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
            raise IndexError(f"teacher cache rows must lie in [0, {self.num_examples}), got [{idx.min()}, {idx.max()}]")

        def load(array):
            out = torch.empty((len(idx), *array.shape[1:]), dtype=torch.float16, pin_memory=pin)
            np.take(array, idx, axis=0, out=out.numpy(), mode="clip")  # "clip": unbuffered (idx checked above)
            return out.to(device, dtype=dtype, non_blocking=True)

        logits = load(self.logits).float()
        return logits, [load(self.reps[self.layers.index(layer)]) for layer in teacher_layers]

    def bank(self, layer: int, device: torch.device, dtype: torch.dtype, chunk_rows: int = 8192) -> torch.Tensor:
        """The whole cached layer as one [N, F] tensor on ``device``, converted chunk by chunk."""
        source = self.reps[self.layers.index(layer)]
        n, features = source.shape
        need = n * features * torch.tensor([], dtype=dtype).element_size()
        if device.type == "cuda":
            free, where = torch.cuda.mem_get_info(device)[0], "GPU memory"
        else:
            free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "memory"
        if need > 0.8 * free:
            raise MemoryError(f"the memory bank of teacher layer {layer} needs {human_bytes(need)} of {where} "
                              f"and {human_bytes(free)} is free; use --representation cls or --limit-train")
        out = torch.empty((n, features), dtype=dtype, device=device)
        for start in range(0, n, chunk_rows):
            out[start:start + chunk_rows] = torch.from_numpy(np.array(source[start:start + chunk_rows]))  # a writable copy
        return out

    @property
    def num_examples(self) -> int:
        return int(self.meta["num_examples"])
