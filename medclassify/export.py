"""TensorFlow Serving export of a saved model (``python -m medclassify export``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .cards import read_card
from .inference import serving_model
from .registry import get_task


def _next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def export_savedmodel(task: str, out: str | os.PathLike, model_path: Optional[str] = None,
                      version: Optional[int] = None) -> Path:
    """Write a TensorFlow SavedModel for TensorFlow Serving; returns the version folder.

    ``out`` is the *model base folder* TF Serving watches (mounted as
    ``/models/<name>``): the SavedModel goes to ``out/<version>/`` where
    ``version`` is 1 for a new folder and one more than the highest existing
    numeric version otherwise (TF Serving serves the highest version, so
    exporting a retrained model rolls it out).  If the last component of
    ``out`` is itself a number (``models/blood/3``), ``out`` is taken as the
    version folder.  An existing version folder is never overwritten.

    Signature ``serving_default``:

    * input ``image``: float32 ``(N, 28, 28, C)`` pixel values 0..255, already
      reduced to 28x28 like ``medclassify.preprocessing.prepare`` does (RGB for
      blood, grayscale for breast);
    * outputs ``probabilities`` float32 ``(N, K)`` (calibrated, class order of
      the model card), ``class_index`` int64 ``(N,)`` and ``label`` string
      ``(N,)``, using the same decision rule as ``Predictor`` (argmax, or the
      card's threshold on P(malignant) for breast).

    The model card is copied to ``<version>/assets.extra/card.json``.
    """
    import shutil

    import tensorflow as tf

    from .cards import card_path
    from .evaluation import decision_threshold
    from .models import load_model

    spec = get_task(task)
    model_path = Path(model_path) if model_path else spec.model_path
    if not model_path.is_file():  # first: a missing model file is the error, not the target folder
        raise FileNotFoundError(f"model file {model_path} not found")
    out = Path(out)
    if version is None and out.name.isdigit():
        target = out
    else:
        target = out / str(version if version is not None else _next_version(out))
    if target.exists() and any(target.iterdir()):  # before the model load, which takes seconds
        raise FileExistsError(f"{target} already exists; export to a new version folder")
    model = load_model(model_path, spec)

    graph, n_inputs = serving_model(model, features=False)
    threshold = decision_threshold(read_card(model_path), spec, model_path.name)
    names = tf.constant(list(spec.class_names))

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = graph

        @tf.function(input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.float32, name="image")])
        def serve(self, image):
            probs = self.model(image if n_inputs == 1 else [image] * n_inputs, training=False)
            if spec.decision == "threshold":
                positive = spec.positive_class
                is_positive = probs[:, positive] >= tf.constant(threshold, tf.float32)
                index = tf.where(is_positive, tf.constant(positive, tf.int64), tf.constant(1 - positive, tf.int64))
            else:
                index = tf.argmax(probs, axis=-1, output_type=tf.int64)
            return {"probabilities": probs, "class_index": index, "label": tf.gather(names, index)}

    module = ServingModule()
    target.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})
    if card_path(model_path).exists():
        (target / "assets.extra").mkdir(exist_ok=True)
        shutil.copyfile(card_path(model_path), target / "assets.extra" / "card.json")
    return target
