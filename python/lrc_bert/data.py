"""Tokenised, cached datasets and the batch collator."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig
from .tasks import TaskSpec, load_split

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def tokenize_split(task: TaskSpec, split: str, tokenizer, cfg: TrainConfig, limit: Optional[int] = None):
    """Load a split and tokenise it with ``Dataset.map`` (cached by datasets)."""
    ds = load_split(task, split, Path(cfg.data_dir) if cfg.data_dir else None, cfg.cache_dir, limit)
    pair = "text_b" in ds.column_names

    def encode(batch):
        args = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        return tokenizer(*args, truncation=True, max_length=cfg.max_length,
                         padding="max_length" if cfg.max_length else False)

    ds = ds.map(encode, batched=True, desc=f"{task.name}/{split}: tokenize")
    keep = [c for c in (*MODEL_INPUTS, "label") if c in ds.column_names]
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def data_fingerprint(dataset) -> str:
    """SHA-256 (16 hex digits) of a tokenised dataset's size, token ids and labels, in order.

    Hashes the Arrow buffers in slices (a second or so for SNLI), so a resume or a teacher
    cache notices another data file, tokenizer, ``--max-length`` or ``--limit-train``.
    """
    import numpy as np

    digest = hashlib.sha256(str(len(dataset)).encode())
    columns = [c for c in ("input_ids", "label") if c in dataset.column_names]
    table_view = dataset.with_format("arrow", columns=columns)
    for start in range(0, len(dataset), 16384):
        table = table_view[start:start + 16384]
        for name in columns:
            for chunk in table.column(name).chunks:
                if hasattr(chunk, "offsets"):  # a list column: row lengths, then the flat ids
                    offsets = np.asarray(chunk.offsets, dtype=np.int64)
                    digest.update((offsets - offsets[0]).tobytes())
                    chunk = chunk.flatten()
                digest.update(np.asarray(chunk.to_numpy(zero_copy_only=False)).astype(np.float64).tobytes())
    return digest.hexdigest()[:16]


class Collator:
    """dict of lists -> padded tensors; ``label`` becomes ``labels`` (float for regression)."""

    def __init__(self, tokenizer, regression: bool):
        self.tokenizer, self.regression = tokenizer, regression

    def __call__(self, rows: dict) -> dict:
        features = {k: rows[k] for k in MODEL_INPUTS if k in rows}
        batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
        batch["labels"] = torch.tensor(rows["label"], dtype=torch.float32 if self.regression else torch.long)
        return batch


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
