"""The serving path: load once, warm up, predict through one compiled call.

``model.predict`` builds a data pipeline on every call (~40 ms); a
``tf.function`` with a fixed input signature runs the same graph in well under
a millisecond for one 28-px image.  The app, the CLI and the benchmarks all use
``Predictor``.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .cards import read_card
from .preprocessing import ImageError, ImageLike, Prepared, prepare
from .registry import TaskSpec, get_task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm"}


@dataclass
class Prediction:
    task: str
    label: str
    class_index: int
    probabilities: dict[str, float]
    model_input: np.ndarray  # the 28-px uint8 image the model saw
    ood: bool = False
    warnings: list[str] = field(default_factory=list)
    p_positive: Optional[float] = None  # breast: P(malignant)
    threshold: Optional[float] = None
    ood_score: Optional[float] = None

    def to_json(self, file: Optional[str] = None) -> dict:
        out = {}
        if file is not None:
            out["file"] = file
        out.update(task=self.task, label=self.label, class_index=self.class_index,
                   probabilities={k: round(v, 6) for k, v in self.probabilities.items()},
                   ood=self.ood, warnings=list(self.warnings))
        if self.p_positive is not None:
            out["p_malignant"] = round(self.p_positive, 6)
            out["threshold"] = self.threshold
        return out


class Predictor:
    """One loaded model of one task, ready to classify images quickly."""

    def __init__(self, task: str | TaskSpec, model_path: Optional[str | os.PathLike] = None, warm: bool = True):
        import tensorflow as tf

        from .models import load_model
        from .ood import OODDetector

        self.spec = get_task(task) if isinstance(task, str) else task
        self.model_path = Path(model_path) if model_path else self.spec.model_path
        if not self.model_path.exists():
            raise FileNotFoundError(f"model file {self.model_path} not found")
        self.model = load_model(self.model_path)
        self.card = read_card(self.model_path)
        decision = self.card.get("decision") or {}
        self.threshold = decision.get("threshold")
        if self.threshold is None and self.spec.decision == "threshold":
            self.threshold = self.spec.default_threshold
        import keras

        features = self.model.get_layer("pool").output
        self._serving_model = keras.Model(self.model.inputs, [self.model.output, features])
        signature = [tf.TensorSpec([None, *self.spec.input_shape], tf.float32)]
        self._serve = tf.function(lambda x: self._serving_model(x, training=False), input_signature=signature)
        self.ood = OODDetector.for_model(self.spec, self.model_path, self.card)
        self._lock = threading.Lock()
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Trace the graph once so the first user does not pay for it."""
        self.predict_arrays(np.zeros((1, *self.spec.input_shape), dtype=np.uint8))

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 batch (N, H, W, C) -> (probabilities (N, K), features (N, D))."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        probs, feats = self._serve(images.astype(np.float32, copy=False))
        return probs.numpy(), feats.numpy()

    def _decide(self, probs: np.ndarray) -> int:
        if self.spec.decision == "threshold":
            positive = self.spec.positive_class
            return positive if probs[positive] >= self.threshold else 1 - positive
        return int(np.argmax(probs))

    def _result(self, prepared: Prepared, probs: np.ndarray, feats: np.ndarray) -> Prediction:
        index = self._decide(probs)
        verdict = self.ood.check(prepared, probs, feats)
        return Prediction(
            task=self.spec.name,
            label=self.spec.class_names[index],
            class_index=index,
            probabilities={name: float(p) for name, p in zip(self.spec.class_names, probs)},
            model_input=prepared.array,
            ood=verdict.flagged,
            warnings=verdict.reasons,
            p_positive=float(probs[self.spec.positive_class]) if self.spec.positive_class is not None else None,
            threshold=self.threshold,
            ood_score=verdict.score,
        )

    def predict(self, source: ImageLike) -> Prediction:
        """One image (bytes, path, PIL image or array) -> Prediction.  Raises ImageError."""
        prepared = prepare(source, self.spec)
        probs, feats = self.predict_arrays(prepared.array[None])
        return self._result(prepared, probs[0], feats[0])

    def predict_many(self, sources: Iterable, batch_size: int = 256) -> Iterator[tuple[object, Prediction | str]]:
        """Stream ``(source, Prediction or one-line error)`` in input order, batching model calls."""
        pending: list[tuple[object, Prepared | str]] = []

        def flush():
            good = [(i, p) for i, (_, p) in enumerate(pending) if isinstance(p, Prepared)]
            results: dict[int, Prediction] = {}
            if good:
                probs, feats = self.predict_arrays(np.stack([p.array for _, p in good]))
                for (i, p), pr, ft in zip(good, probs, feats):
                    results[i] = self._result(p, pr, ft)
            for i, (src, p) in enumerate(pending):
                yield src, results.get(i, p)
            pending.clear()

        for source in sources:
            try:
                pending.append((source, prepare(source, self.spec)))
            except ImageError as exc:
                pending.append((source, str(exc)))
            except Exception as exc:  # never let one odd file stop a batch
                pending.append((source, f"could not read image ({type(exc).__name__})"))
            if len(pending) >= batch_size:
                yield from flush()
        if pending:
            yield from flush()


_PREDICTORS: dict[tuple[str, str], Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(task: str, model_path: Optional[str] = None) -> Predictor:
    """Process-wide cache: each model is loaded and warmed once."""
    spec = get_task(task)
    key = (spec.name, str(Path(model_path).resolve()) if model_path else str(spec.model_path))
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            _PREDICTORS[key] = Predictor(spec, model_path)
        return _PREDICTORS[key]


def expand_paths(patterns: Iterable[str]) -> Iterator[str]:
    """Files, folders (recursively, image suffixes only) and glob patterns, in a stable order.

    A pattern that matches nothing is yielded as is, so it is reported as missing.
    """
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        yield os.path.join(root, name)
        elif path.exists():
            yield str(path)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if files:
                yield from files
            else:
                yield pattern


def run_predict_cli(args) -> int:
    spec = get_task(args.task)
    try:
        predictor = Predictor(spec, args.model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: cannot load the {spec.name} model: {exc}", file=sys.stderr)
        return 1
    files = expand_paths(args.paths)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(unit="img", file=sys.stderr, desc=f"predict {spec.name}", mininterval=0.5)
    failed = 0
    out = sys.stdout
    for source, result in predictor.predict_many(files, batch_size=args.batch_size):
        if progress is not None:
            progress.update(1)
        if isinstance(result, str):
            failed += 1
            line = json.dumps({"file": source, "error": result}) if args.json else f"{source}\terror: {result}"
        elif args.json:
            line = json.dumps(result.to_json(file=source))
        else:
            top = result.probabilities[result.label]
            flag = "\tWARNING: " + "; ".join(result.warnings) if result.ood else ""
            line = f"{source}\t{result.label}\t{top:.3f}{flag}"
        out.write(line + "\n")
    out.flush()
    if progress is not None:
        progress.close()
    return 1 if failed else 0


def export_savedmodel(task: str, out: str | os.PathLike, model_path: Optional[str] = None) -> Path:
    """Write a TensorFlow SavedModel (signature ``serving_default``: image -> probabilities)."""
    import tensorflow as tf

    from .models import load_model

    spec = get_task(task)
    model = load_model(model_path or spec.model_path)
    out = Path(out)

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.float32, name="image")])
    def serve(image):
        return {"probabilities": model(image, training=False)}

    module = tf.Module()
    module.model = model
    module.serve = serve
    tf.saved_model.save(module, str(out), signatures={"serving_default": serve})
    return out
