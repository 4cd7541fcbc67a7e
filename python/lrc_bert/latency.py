"""CPU/GPU latency of several models on the same input, measured fairly on a busy machine.

The models are timed interleaved (one forward of each per round, the order alternating), so
a burst of load from elsewhere hits them alike, and each gets the median of ``repeats``. A
ratio is reported only when both spreads are tight: on a shared 2-core machine a ratio of
two medians taken minutes apart once read "0.2x faster" for a 7x smaller model.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

SPREAD_LIMIT = 0.25  # (p75 - p25) / median above which a ratio is not trusted


def compare_latency(models: dict, tokenizer, batch_size: int, length: int, repeats: int = 30) -> dict:
    """{name: {"median_ms", "spread"}} for a forward pass of each model on one padded batch."""
    import torch

    text = ["a man is playing a guitar on a stage in front of a crowd ."] * batch_size
    inputs = tokenizer(text, text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    times = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            model(**inputs)  # warm-up
        for round_ in range(repeats):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        median = statistics.median(values)
        out[name] = {"median_ms": 1e3 * median, "spread": (q[2] - q[0]) / median}
    return out


def speedup(slow: dict, fast: dict) -> Optional[float]:
    """slow / fast median time, or None when either spread is too wide to trust."""
    if max(slow["spread"], fast["spread"]) > SPREAD_LIMIT:
        return None
    return slow["median_ms"] / fast["median_ms"]
