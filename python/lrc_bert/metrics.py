"""GLUE metrics with scikit-learn and scipy (no hub-loading ``evaluate``)."""

from __future__ import annotations

import numpy as np

from .tasks import TaskSpec


def compute_metrics(task: TaskSpec, predictions, labels) -> dict[str, float]:
    """Metrics of one split: class ids (or scores for STS-B) against the gold labels.

    accuracy everywhere except STS-B; plus F1 for MRPC and QQP, Matthews correlation
    for CoLA, and Pearson / Spearman correlations for STS-B.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    if task.is_regression:
        return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, predictions))
    if task.name == "cola":
        out["matthews_corrcoef"] = float(matthews_corrcoef(labels, predictions))
    return out
