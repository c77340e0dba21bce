"""Metrics, bootstrap confidence intervals and calibration error.

AUC follows MedMNIST's definition: blood is the macro one-vs-rest AUC over the
8 classes, breast the AUC of the score.  Breast predictions use the model's
threshold on P(malignant); MedMNIST's own operating point (P(label 1) > 0.5)
is reported beside it as ``accuracy_at_0_5``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .registry import TaskSpec, get_task

SCALAR_METRICS = (
    "accuracy", "balanced_accuracy", "auc",
    "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted",
)


def decision_threshold(card: Optional[dict], spec: TaskSpec, model_name: str = "this model") -> Optional[float]:
    """The threshold a thresholded task decides at: the card's, else ``spec.default_threshold``.

    Every reader of a card (serving, export, evaluation, quantisation) takes it from here, so a model
    without one is decided at the same number everywhere and says so once per load. None for argmax tasks.
    """
    threshold = ((card or {}).get("decision") or {}).get("threshold")
    if threshold is None and spec.decision == "threshold":
        threshold = spec.default_threshold
        print(f"warning: {model_name} has no threshold in its card; deciding at MedMNIST's {threshold}, "
              "which was not chosen for any sensitivity", file=sys.stderr)
    return threshold


def decide(spec: TaskSpec, probabilities: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """Class indices from probabilities with the task's decision rule."""
    probabilities = np.asarray(probabilities)
    if spec.decision == "threshold":
        threshold = spec.default_threshold if threshold is None else threshold
        positive = spec.positive_class
        other = 1 - positive
        return np.where(probabilities[:, positive] >= threshold, positive, other)
    return probabilities.argmax(axis=1)


def auc(spec: TaskSpec, labels: np.ndarray, probabilities: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    if spec.num_classes == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    present = np.unique(labels)
    if len(present) < spec.num_classes:
        # one-vs-rest over the classes present (bootstrap resamples of tiny sets)
        scores = [roc_auc_score(labels == c, probabilities[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE of the top-class confidence with equal-width bins: the bins of ``reliability_curve``, weighted by
    their share of the images."""
    curve = reliability_curve(labels, probabilities, bins)
    n = len(probabilities)
    ece = 0.0
    for count, accuracy, confidence in zip(curve["count"], curve["accuracy"], curve["confidence"]):
        if count:
            ece += count / n * abs(accuracy - confidence)
    return float(ece)


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Per equal-width bin of top-class confidence: its edges, image count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = {"bin_lower": [], "bin_upper": [], "confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = which == b
        rows["bin_lower"].append(float(edges[b]))
        rows["bin_upper"].append(float(edges[b + 1]))
        rows["count"].append(int(mask.sum()))
        rows["confidence"].append(float(confidence[mask].mean()) if mask.any() else None)
        rows["accuracy"].append(float(correct[mask].mean()) if mask.any() else None)
    return rows


def sensitivity_specificity(spec: TaskSpec, labels: np.ndarray, predictions: np.ndarray,
                            absent: float = 0.0) -> tuple[float, float]:
    """Recall of the positive class (malignant, for breast) and of the others; ``absent`` for a class the
    labels lack (0, as sklearn's ``zero_division=0``; the bootstrap passes NaN so such a resample is left out).

    Plain counts rather than sklearn's ``recall_score``: the bootstrap calls this a thousand times per split.
    """
    positive = np.asarray(labels) == spec.positive_class
    called = np.asarray(predictions) == spec.positive_class
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    return (float((called & positive).sum() / n_positive) if n_positive else absent,
            float((~called & ~positive).sum() / n_negative) if n_negative else absent)


def _scalars(spec: TaskSpec, labels: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray,
             absent: float = 0.0) -> dict:
    classes = np.arange(spec.num_classes)
    out = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "auc": auc(spec, labels, probabilities),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=classes, average=average,
                                                     zero_division=0)
        out[f"precision_{average}"] = float(p)
        out[f"recall_{average}"] = float(r)
        out[f"f1_{average}"] = float(f)
    if spec.decision == "threshold":
        out["sensitivity"], out["specificity"] = sensitivity_specificity(spec, labels, predictions, absent)
        # MedMNIST's operating point: label 1 when its score exceeds 0.5
        out["accuracy_at_0_5"] = float(accuracy_score(labels, (probabilities[:, 1] > 0.5).astype(int)))
    return out


def compute_metrics(spec: TaskSpec | str, labels, probabilities, threshold: Optional[float] = None,
                    bootstrap: int = 0, seed: int = 0, temperature: Optional[float] = None) -> dict:
    """All metrics of one split.  ``bootstrap`` > 0 adds 95% percentile CIs under ``ci95``."""
    spec = get_task(spec) if isinstance(spec, str) else spec
    labels = np.asarray(labels).reshape(-1).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = decide(spec, probabilities, threshold)
    metrics = _scalars(spec, labels, probabilities, predictions)
    classes = np.arange(spec.num_classes)
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=classes, zero_division=0)
    metrics["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(spec.class_names)
    }
    metrics["confusion_matrix"] = confusion_matrix(labels, predictions, labels=classes).tolist()
    metrics["n"] = int(len(labels))
    metrics["ece"] = expected_calibration_error(labels, probabilities)
    if temperature is not None:
        metrics["temperature"] = float(temperature)
        metrics["ece_uncalibrated"] = expected_calibration_error(labels, uncalibrate(probabilities, temperature))
    if spec.decision == "threshold":
        metrics["threshold"] = float(spec.default_threshold if threshold is None else threshold)
    if bootstrap:
        metrics["ci95"] = bootstrap_ci(spec, labels, probabilities, threshold, bootstrap, seed)
        metrics["bootstrap_resamples"] = int(bootstrap)
    return metrics


def uncalibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The model's probabilities before temperature scaling (softmax(T * log p))."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) * temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def bootstrap_ci(spec: TaskSpec, labels: np.ndarray, probabilities: np.ndarray, threshold: Optional[float],
                 resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile bootstrap intervals of every scalar metric (resampling cases).

    A resample without a class has no recall for it: its sensitivity or specificity is left out (NaN), as its
    AUC is, rather than counted as 0, which pulled small sets' intervals down to 0.
    """
    rng = np.random.default_rng(seed)
    predictions = decide(spec, probabilities, threshold)
    n = len(labels)
    samples: dict[str, list] = {}
    with warnings.catch_warnings():  # a resample holding one class makes sklearn warn about each metric
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        for _ in range(resamples):
            idx = rng.integers(0, n, n)
            values = _scalars(spec, labels[idx], probabilities[idx], predictions[idx], absent=np.nan)
            for key, value in values.items():
                samples.setdefault(key, []).append(value)
    # A metric no resample defines (sensitivity of a split without malignant cases) has no interval: NaN
    # would be written to the card as invalid JSON.
    return {key: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for key, v in samples.items()
            if not np.isnan(v).all()}


def predict_split(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    from .models import predict_probabilities

    return predict_probabilities(model, images, batch_size)


def evaluate(task: str, model_path=None, split: str = "test", data_dir=None, bootstrap: int = 0,
             seed: int = 0) -> dict:
    """Evaluate a saved model on one official split with its card's threshold."""
    from .cards import read_card
    from .data import load_split
    from .models import load_model, model_temperature

    spec = get_task(task)
    path = model_path or spec.model_path
    model = load_model(path, spec)  # a missing file: FileNotFoundError('model file X not found')
    threshold = decision_threshold(read_card(path), spec, Path(path).name)
    data = load_split(spec, split, data_dir=data_dir)
    probabilities = predict_split(model, data.images)
    metrics = compute_metrics(spec, data.labels, probabilities, threshold=threshold, bootstrap=bootstrap,
                              seed=seed, temperature=model_temperature(model))
    metrics["reliability"] = reliability_curve(data.labels, probabilities)
    metrics["split"] = split
    metrics["task"] = spec.name
    metrics["model"] = str(path)
    return metrics
