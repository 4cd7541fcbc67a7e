"""Tokenised, cached datasets and the batch collator."""

from __future__ import annotations

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
