""""Unlike the training data" checks.

Three rules, all calibrated on the official splits (never on test):

1. Modality: BloodMNIST images are stained (colourful); BreastMNIST images
   are grayscale.  A grayscale image sent to the blood model, or a colour
   image sent to the ultrasound model, is the wrong kind of image.
2. Blank: an image with (almost) no contrast carries nothing to classify.
3. Feature distance: the Mahalanobis distance of the model's pooled features
   to the nearest class mean (class means and a shared covariance from the
   training split; Lee et al. 2018).  The threshold is the 99th percentile of
   the validation distances, so about 1% of in-distribution images are flagged.

Statistics live in ``model_x.ood.npz`` beside the model; thresholds in the card.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .registry import TaskSpec, get_task

#: Colourfulness (Hasler & Suesstrunk) above which an image is not grayscale.
GRAYSCALE_MAX_COLOURFULNESS = 8.0
#: Standard deviation of the 28-px image below which it counts as blank.
BLANK_MAX_STD = 3.0
VALIDATION_QUANTILE = 0.99


def ood_path(model_path) -> Path:
    return Path(model_path).with_suffix(".ood.npz")


@dataclass
class Verdict:
    flagged: bool
    reasons: list[str] = field(default_factory=list)
    score: Optional[float] = None


class OODDetector:
    def __init__(self, spec: TaskSpec, means=None, precision=None, threshold: Optional[float] = None,
                 min_colourfulness: Optional[float] = None, unavailable: Optional[str] = None,
                 grayscale_max_colourfulness: float = GRAYSCALE_MAX_COLOURFULNESS,
                 blank_max_std: float = BLANK_MAX_STD):
        self.spec = spec
        self.means = None if means is None else np.asarray(means, dtype=np.float64)
        self.precision = None if precision is None else np.asarray(precision, dtype=np.float64)
        self.threshold = threshold
        self.min_colourfulness = min_colourfulness
        self.unavailable = unavailable  # why the distance rule the card declares cannot run
        self.grayscale_max_colourfulness = grayscale_max_colourfulness
        self.blank_max_std = blank_max_std

    @classmethod
    def for_model(cls, spec: TaskSpec, model_path, card: dict) -> "OODDetector":
        settings = (card or {}).get("ood") or {}
        path = ood_path(model_path)
        means = precision = unavailable = None
        try:
            with np.load(path) as stats:
                means, precision = stats["means"], stats["precision"]
        except Exception as exc:  # missing, truncated, or not our statistics
            if settings.get("distance_threshold") is not None:
                # The card promises this check; answering without it would hide the one warning users rely on.
                unavailable = f"{path.name} {'is missing' if not path.exists() else 'cannot be read'}"
                print(f"warning: {unavailable} ({type(exc).__name__}); every answer of {Path(model_path).name} is "
                      f"withheld until `python -m medclassify fit-ood --task {spec.name}` rewrites it", file=sys.stderr)
        # The card records the limits its rules were fitted with; a card from before they were recorded
        # gets today's constants.
        limits = {key: settings[key] for key in ("grayscale_max_colourfulness", "blank_max_std")
                  if settings.get(key) is not None}
        return cls(spec, means, precision, settings.get("distance_threshold"), settings.get("min_colourfulness"),
                   unavailable, **limits)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, per row."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        diffs = features[:, None, :] - self.means[None, :, :]  # (N, K, D)
        # one matrix product; an unplanned einsum here cost more than the model call
        return ((diffs @ self.precision) * diffs).sum(axis=-1).min(axis=1)

    def check(self, prepared, probabilities: np.ndarray, features: np.ndarray) -> Verdict:
        reasons = []
        colour = prepared.colourfulness
        if self.spec.channels == 1 and colour > self.grayscale_max_colourfulness:
            reasons.append(f"colour image: the {self.spec.name} model expects a grayscale {self.spec.image_kind}")
        if self.spec.channels == 3:
            minimum = self.grayscale_max_colourfulness if self.min_colourfulness is None else self.min_colourfulness
            if colour < minimum:
                reasons.append(f"grayscale or washed-out image: the {self.spec.name} model expects a colour "
                               f"{self.spec.image_kind}")
        pixels = np.asarray(prepared.array, dtype=np.float32).reshape(-1, prepared.array.shape[-1])
        if float(pixels.std(axis=0).max()) < self.blank_max_std:  # per channel: a flat colour is blank too
            reasons.append("blank image: there is almost no contrast to classify")
        score = None
        if self.unavailable:
            reasons.append(f"the check for images unlike the training data cannot run ({self.unavailable}): "
                           "no answer is given")
        elif self.means is not None and self.threshold is not None:
            score = float(self.distances(features)[0])
            if score > self.threshold:
                # the ratio says "just outside" or "far outside"; the bare scores mean nothing to a reader
                ratio = score / self.threshold if self.threshold > 0 else float("inf")
                times = "just over" if ratio < 1.1 else f"{ratio:.1f} times"
                reasons.append(f"unlike the training images (distance score {score:.0f}, {times} the model's "
                               f"limit of {self.threshold:.0f}): the prediction is not reliable")
        return Verdict(bool(reasons), reasons, score)


def fit_ood(task: str, model_path=None, data_dir=None, quantile: float = VALIDATION_QUANTILE) -> dict:
    """Fit the feature statistics on train and the thresholds on validation; write npz + card."""
    from sklearn.covariance import LedoitWolf

    from .cards import set_section
    from .data import load_split
    from .inference import Predictor
    from .preprocessing import colourfulness

    spec = get_task(task)
    model_path = Path(model_path) if model_path else spec.model_path
    predictor = Predictor(spec, model_path, warm=False)
    train = load_split(spec, "train", data_dir=data_dir)
    val = load_split(spec, "val", data_dir=data_dir)
    train_feats = _features(predictor, train.images)
    val_feats = _features(predictor, val.images)
    means = np.stack([train_feats[train.labels == c].mean(axis=0) for c in range(spec.num_classes)])
    centred = train_feats - means[train.labels]
    covariance = LedoitWolf().fit(centred).covariance_
    precision = np.linalg.pinv(covariance)
    np.savez_compressed(ood_path(model_path), means=means.astype(np.float32), precision=precision.astype(np.float32))
    detector = OODDetector(spec, means, precision)
    val_d = detector.distances(val_feats)
    threshold = float(np.quantile(val_d, quantile))
    settings = {
        "method": "Mahalanobis distance of pooled features to the nearest class mean (train statistics, "
                  "Ledoit-Wolf covariance); modality and blank-image rules",
        "distance_threshold": threshold,
        "threshold_rule": f"{quantile:.0%} quantile of validation distances",
        "statistics_file": ood_path(model_path).name,
        "features": predictor.precision,  # the statistics fit only the features they were measured on
        "grayscale_max_colourfulness": GRAYSCALE_MAX_COLOURFULNESS,
        "blank_max_std": BLANK_MAX_STD,
    }
    if spec.channels == 3:
        val_colour = np.array([colourfulness(img) for img in val.images])
        settings["min_colourfulness"] = float(max(GRAYSCALE_MAX_COLOURFULNESS, 0.5 * val_colour.min()))
    set_section(model_path, "ood", settings)
    return settings


def _features(predictor, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    out = [predictor.predict_arrays(images[i:i + batch_size])[1] for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float64)
