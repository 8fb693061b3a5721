"""Fraud metrics: average precision, ROC-AUC, recall at the threshold, daily precision@k, threshold rules."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from core.errors import InputValidationError

PRECISION_AT_K = 100


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise InputValidationError(
            f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes"
        )
    return labels, scores


def threshold_for_precision(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Lowest threshold whose precision on (scores, labels) reaches `target`.

    When no threshold reaches it, the threshold of the best F1 is used and a UserWarning says so.
    """
    labels, scores = _check(labels, scores)
    if labels.sum() == 0:
        warnings.warn("no fraud in the validation data: threshold set to 0.5", UserWarning, stacklevel=2)
        return 0.5
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    reached = np.flatnonzero(precision[:-1] >= target)
    if len(reached):
        return float(thresholds[reached[0]])
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    warnings.warn(
        f"no threshold reaches precision {target} on validation data; using the best-F1 threshold",
        UserWarning,
        stacklevel=2,
    )
    return float(thresholds[int(np.argmax(f1))])


def threshold_for_budget(scores: np.ndarray, days: np.ndarray, alerts_per_day: float) -> float:
    """Threshold giving on average `alerts_per_day` alerts per day on the given scores."""
    scores = np.asarray(scores, dtype=np.float64)
    n_days = max(1, len(np.unique(days)))
    count = round(alerts_per_day * n_days)
    if count <= 0:
        raise InputValidationError(f"alert budget must allow at least one alert; got {alerts_per_day}/day")
    if count >= len(scores):
        return float(scores.min())
    return float(np.sort(scores)[::-1][count - 1])


def precision_at_k_per_day(labels: np.ndarray, scores: np.ndarray, days: np.ndarray, k: int) -> float:
    """Mean over days of the precision of the day's k highest scores (the handbook's daily card precision)."""
    labels, scores = _check(labels, scores)
    values = []
    for day in np.unique(days):
        chosen = days == day
        top = np.argsort(-scores[chosen], kind="stable")[:k]
        values.append(labels[chosen][top].mean())
    return float(np.mean(values))


def fraud_metrics(
    labels: np.ndarray, scores: np.ndarray, days: np.ndarray, threshold: float
) -> dict[str, float]:
    """Evaluation metrics of fraud scores.

    Args:
        labels: (N,) 0/1; scores: (N,) probabilities; days: (N,) day of each transaction; threshold: alert threshold.

    Returns:
        average_precision, roc_auc, recall_at_threshold, precision_at_threshold, alerts_at_threshold,
        precision_at_100_per_day, alerts_for_90_recall (alerts needed to catch 90% of frauds), rows, frauds.
    """
    labels, scores = _check(labels, scores)
    frauds = int(labels.sum())
    alerts = scores >= threshold
    out: dict[str, float] = {"rows": len(labels), "frauds": frauds, "threshold": float(threshold)}
    if 0 < frauds < len(labels):
        out["average_precision"] = float(average_precision_score(labels, scores))
        out["roc_auc"] = float(roc_auc_score(labels, scores))
        ranked = labels[np.argsort(-scores, kind="stable")]
        out["alerts_for_90_recall"] = int(np.searchsorted(np.cumsum(ranked), int(np.ceil(0.9 * frauds))) + 1)
    out["recall_at_threshold"] = float(labels[alerts].sum() / frauds) if frauds else 0.0
    out["precision_at_threshold"] = float(labels[alerts].mean()) if alerts.any() else 0.0
    out["alerts_at_threshold"] = int(alerts.sum())
    out[f"precision_at_{PRECISION_AT_K}_per_day"] = precision_at_k_per_day(
        labels, scores, days, PRECISION_AT_K
    )
    return out


def pr_curve(labels: np.ndarray, scores: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """A precision-recall curve thinned to about `points` points (for metrics.json and the dashboard)."""
    labels, scores = _check(labels, scores)
    if labels.sum() == 0:
        return {"precision": [], "recall": []}
    precision, recall, _ = precision_recall_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(precision) - 1, min(points, len(precision))).astype(int))
    return {"precision": precision[keep].round(5).tolist(), "recall": recall[keep].round(5).tolist()}
