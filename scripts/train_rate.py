"""Training throughput of a finished run, from its metrics.jsonl: samples per second between
the first and the last logged training step (start-up, the first logging window and the
final evaluation left out).

    python scripts/train_rate.py RUN/metrics.jsonl BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_rate(metrics: Path, batch_size: int) -> dict:
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["type"] == "train"]
    if len(train) < 2:
        raise SystemExit(f"{metrics}: fewer than two training records; log more often (--logging-steps)")
    first, last = train[0], train[-1]
    steps, seconds = last["step"] - first["step"], last["time"] - first["time"]
    return {"steps": steps, "seconds": round(seconds, 2), "samples_per_s": round(steps * batch_size / seconds, 1),
            "final_loss": last["loss"]}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(json.dumps(train_rate(Path(sys.argv[1]), int(sys.argv[2]))))
