"""Int8 serving copy of a shipped model: TensorFlow Lite, convolutions in int8.

On two CPU cores the float models are arithmetic-bound (the 3-member blood
ensemble is 361 M multiply-adds per image, ~6 ms).  XNNPACK's int8 kernels
use the CPU's VNNI instructions and run the same convolutions about 3x faster,
for single images and for batches alike.  The model is cut at its pooled
features: the convolutional *backbone* (image -> features) is quantised, the
small *head* (features -> logits -> temperature -> probabilities) stays in
float, so the probabilities are not rounded to int8's 1/256 steps and the
breast threshold keeps its resolution.

Quantisation changes the numbers a little, so the int8 copy is a model of its
own and is treated like one:

* ``quantize`` calibrates the activation ranges on training images only
  (``CALIBRATION_IMAGES``, fixed seed), then compares the served outputs with
  the float model's on validation and refuses the copy when more decisions
  change than ``allowed_changes`` permits (1%, but at least one: an image
  right at the breast threshold may cross it, and 1% of BreastMNIST's 78
  validation images is less than one image), or when it loses the breast
  threshold's target sensitivity (``refusal`` holds both rules).
* The comparison on validation and on test (the test split is evaluated once,
  for the shipped model) goes into the card's ``serving`` section, next to
  the two files' SHA-256.
* ``Predictor`` serves the copy only when both files match the card;
  otherwise, or with ``MEDCLASSIFY_SERVING_PRECISION=float``, it serves the
  float model.

The backbone takes float pixels 0..255 and returns the features the
out-of-distribution rule reads, so the OOD statistics are fitted on the
features that are served.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from .registry import TaskSpec, get_task

PRECISION_ENV = "MEDCLASSIFY_SERVING_PRECISION"  # "int8" (default where the card lists the files) or "float"
LITE_THREADS_ENV = "MEDCLASSIFY_TFLITE_THREADS"
CALIBRATION_IMAGES = 500
MAX_VALIDATION_DISAGREEMENT = 0.01
RUNTIME_NAME = ("TensorFlow Lite (XNNPACK): convolutional backbone in int8 (weights and activations), "
                "head (logits, temperature, softmax) in float")


def remove_serving_copy(model_path) -> None:
    """Delete the int8 copy (backbone and head) made from whatever model was at ``model_path``: the app and
    the CLI prefer it, so a new model saved there must not be answered for by the old one's copy."""
    for stale in (quantized_path(model_path), head_path(model_path)):
        stale.unlink(missing_ok=True)


def quantized_path(model_path) -> Path:
    """The int8 backbone file; the float head is ``head_path``."""
    return Path(model_path).with_suffix(".int8.tflite")


def head_path(model_path) -> Path:
    return Path(model_path).with_suffix(".head.tflite")


def lite_threads() -> int:
    default = min(os.cpu_count() or 1, 4)
    value = os.environ.get(LITE_THREADS_ENV, "").strip()
    try:
        return int(value or 0) or default
    except ValueError:  # a typo must not switch the served model to float
        print(f"warning: ignoring {LITE_THREADS_ENV}={value!r} (not an integer)", file=sys.stderr)
        return default


def serving_precision() -> str:
    value = os.environ.get(PRECISION_ENV, "").strip().lower() or "int8"
    if value not in ("int8", "float"):
        raise ValueError(f"{PRECISION_ENV} must be 'int8' or 'float', not {value!r}")
    return value


def allowed_changes(n_validation: int) -> int:
    """How many validation decisions the int8 copy may change: 1%, but at least one."""
    return max(1, int(MAX_VALIDATION_DISAGREEMENT * n_validation))


def split_at_features(model):
    """``model`` (no augmentation layers) -> (backbone: image -> pooled features, head: features -> output).

    For an ensemble the features are the members' pools side by side (as
    ``models.feature_tensor``), and the head slices them back apart.
    """
    import keras

    from .models import feature_tensor, pooled_features

    backbone = keras.Model(model.inputs, feature_tensor(model), name=f"{model.name}_backbone")
    pools = pooled_features(model)
    inner = keras.Model(pools if len(pools) > 1 else pools[0], model.output, name=f"{model.name}_head_inner")
    features = keras.Input(shape=(sum(int(p.shape[-1]) for p in pools),), name="features")
    parts, start = [], 0
    for pool in pools:
        width = int(pool.shape[-1])
        parts.append(features[:, start:start + width])
        start += width
    head = keras.Model(features, inner(parts if len(parts) > 1 else parts[0]), name=f"{model.name}_head")
    return backbone, head


def to_tflite(keras_model, calibration: Optional[np.ndarray] = None) -> bytes:
    """Keras model -> TFLite bytes: float, or int8 with activation ranges from ``calibration``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if calibration is not None:
        def representative():
            for image in calibration:
                yield [image[None].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
    # the converter prints its SavedModel export to stdout, and warns that "statistics for quantized
    # inputs were expected" (the input stays float)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return converter.convert()


def new_interpreter(content: bytes, threads: int):
    """A LiteRT (TensorFlow Lite) interpreter with XNNPACK for ``content``, tensors not yet allocated.

    LiteRT's own package, not ``tf.lite.Interpreter``: TensorFlow deprecated that one and has announced its
    removal.  Both run the same kernels (the shipped int8 copies give bit-identical outputs on every test image).
    """
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content, num_threads=threads)


class _Runner:
    """One single-input, single-output TFLite model: an interpreter for batch 1 and one resized per batch."""

    def __init__(self, content: bytes, threads: int):
        self.content = content
        self._threads = threads
        self._single = self._make(1)
        self._output_shape = tuple(self._single[0].get_output_details()[0]["shape"][1:])  # per image
        self._single_lock = threading.Lock()
        self._batch = None
        self._batch_size = 0
        self._batch_lock = threading.Lock()

    def _make(self, batch: int) -> tuple:
        """(interpreter, input index, output index) for batches of ``batch``."""
        interpreter = new_interpreter(self.content, self._threads)
        if len(interpreter.get_input_details()) != 1 or len(interpreter.get_output_details()) != 1:
            raise ValueError("expected a TFLite model with one input and one output")
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        if batch != 1:
            interpreter.resize_tensor_input(source["index"], [batch, *source["shape"][1:]])
        interpreter.allocate_tensors()
        return interpreter, source["index"], target["index"]

    @staticmethod
    def _run(runner: tuple, inputs: np.ndarray) -> np.ndarray:
        interpreter, source, target = runner
        interpreter.set_tensor(source, inputs)
        interpreter.invoke()
        return interpreter.get_tensor(target)  # a copy

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if len(inputs) == 0:
            return np.zeros((0, *self._output_shape), dtype=np.float32)
        if len(inputs) == 1:
            with self._single_lock:
                return self._run(self._single, inputs)
        with self._batch_lock:
            if self._batch_size != len(inputs):
                self._batch = self._make(len(inputs))
                self._batch_size = len(inputs)
            return self._run(self._batch, inputs)


class LiteModel:
    """The served model: int8 backbone then float head, on any batch size, thread-safe."""

    def __init__(self, backbone: bytes, head: bytes, threads: Optional[int] = None):
        threads = threads or lite_threads()
        self.backbone = _Runner(backbone, threads)
        self.head = _Runner(head, threads)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (N, H, W, C) 0..255, any dtype -> (probabilities (N, K), features (N, D))."""
        features = self.backbone(images)
        return self.head(features), features


def int8_copy(graph, calibration: np.ndarray) -> LiteModel:
    """The int8 serving copy of ``graph`` (a model without augmentation layers): activation ranges from
    ``calibration`` (pixels 0..255)."""
    backbone, head = split_at_features(graph)
    return LiteModel(to_tflite(backbone, calibration), to_tflite(head))


def load_quantized(model_path, card: dict) -> Optional[LiteModel]:
    """The int8 copy the card lists, or None (none listed, or files the card does not vouch for).

    The card vouches for the copy's files and, when it records one, for the float model the copy was made
    from: a copy left beside another ``.h5`` (a half-finished ``ship``, a model copied over by hand)
    would answer for a model it is not.
    """
    serving = (card or {}).get("serving") or {}
    if not serving.get("file"):
        return None
    folder = Path(model_path).parent
    if serving.get("model_sha256") and sha256_file(model_path) != serving["model_sha256"]:
        print(f"warning: {serving['file']} was made from another {Path(model_path).name} (SHA-256); "
              "serving the float model", file=sys.stderr)
        return None
    blobs = []
    for name, digest in ((serving["file"], serving.get("sha256")), (serving.get("head_file"), serving.get("head_sha256"))):
        path = folder / str(name)
        if not name or not path.exists():
            print(f"warning: {name} not found; serving the float model", file=sys.stderr)
            return None
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            print(f"warning: {path.name} does not match its card (SHA-256); serving the float model", file=sys.stderr)
            return None
        blobs.append(blob)
    return LiteModel(*blobs)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refusal(spec: TaskSpec, labels: np.ndarray, float_probs: np.ndarray, int8_probs: np.ndarray,
            threshold: Optional[float], target_sensitivity: Optional[float]) -> Optional[str]:
    """Why the int8 copy must not serve, judged on validation, or None when it may.

    It may change at most ``allowed_changes`` decisions. With a threshold chosen for a target sensitivity,
    it must also keep that target wherever the float model keeps it.
    """
    from .evaluation import decide, sensitivity_specificity

    n = len(labels)
    changed = int((decide(spec, float_probs, threshold) != decide(spec, int8_probs, threshold)).sum())
    if changed > allowed_changes(n):
        return f"int8 changes {changed} of {n} validation decisions (at most {allowed_changes(n)} allowed)"
    if threshold is not None and target_sensitivity is not None:
        served, _ = sensitivity_specificity(spec, labels, decide(spec, int8_probs, threshold))
        if served < target_sensitivity <= sensitivity_specificity(spec, labels, decide(spec, float_probs, threshold))[0]:
            return f"int8 brings the validation sensitivity to {served:.3f}, under the threshold's target of " \
                   f"{target_sensitivity}"
    return None


def compare(spec: TaskSpec, labels: np.ndarray, float_probs: np.ndarray, int8_probs: np.ndarray,
            threshold: Optional[float]) -> dict:
    """How the int8 outputs differ from the float model's on one split, and the int8 model's metrics."""
    from .evaluation import compute_metrics, decide

    changed = decide(spec, float_probs, threshold) != decide(spec, int8_probs, threshold)
    metrics = compute_metrics(spec, labels, int8_probs, threshold=threshold)
    keys = ["accuracy", "balanced_accuracy", "auc", "f1_macro", "ece"]
    if spec.decision == "threshold":
        keys += ["sensitivity", "specificity", "accuracy_at_0_5"]
    difference = np.abs(float_probs - int8_probs)
    return {
        "n": int(len(labels)),
        "decisions_changed": int(changed.sum()),
        "decision_agreement": float(1.0 - changed.mean()),
        "max_abs_probability_difference": float(difference.max()),
        "mean_abs_probability_difference": float(difference.mean()),
        "int8_metrics": {key: metrics[key] for key in keys},
    }


def quantize(task: str, model_path=None, data_dir=None, splits: tuple[str, ...] = ("val", "test"),
             calibration_images: int = CALIBRATION_IMAGES, seed: int = 0, command: str = "") -> dict:
    """Write the int8 backbone and float head beside the model and the card's ``serving`` section.

    Returns the section.  Raises ``ValueError`` (and writes nothing) when ``refusal`` finds a reason
    on the validation split.
    """
    from .cards import read_card, set_section
    from .data import load_split
    from .evaluation import decision_threshold
    from .inference import serving_model
    from .models import load_model, predict_probabilities

    if not splits or splits[0] != "val":
        raise ValueError("the validation comparison comes first: it decides whether the copy is kept")
    spec = get_task(task)
    model_path = Path(model_path) if model_path else spec.model_path
    model = load_model(model_path, spec)
    card = read_card(model_path)
    threshold = decision_threshold(card, spec, model_path.name)
    # The sensitivity rule holds the copy to the target the card's threshold was chosen for; the registry's
    # fallback was chosen for none.
    target_sensitivity = ((card.get("training") or {}).get("config") or {}).get("target_sensitivity") \
        if (card.get("decision") or {}).get("threshold") is not None else None
    graph, n_inputs = serving_model(model, features=False)
    if n_inputs != 1:
        raise ValueError("this model's graph has augmentation branches; re-save it with `ship` first")
    train = load_split(spec, "train", data_dir=data_dir)
    picked = np.sort(np.random.default_rng(seed).choice(len(train.images), min(calibration_images, len(train.images)),
                                                        replace=False))
    lite = int8_copy(graph, train.images[picked])
    section = {
        "runtime": RUNTIME_NAME,
        "calibration": {"split": "train", "images": int(len(picked)), "seed": seed},
        "acceptance": "at most 1% of the validation decisions (at least one) may change"
                      + ("; the validation sensitivity stays at or above the threshold's target"
                         if threshold is not None and target_sensitivity is not None else ""),
        "command": command or f"python -m medclassify quantize --task {spec.name}",
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
    }
    for split in splits:
        data = load_split(spec, split, data_dir=data_dir)
        float_probs = predict_probabilities(model, data.images)
        int8_probs = np.concatenate([lite(data.images[i:i + 256])[0] for i in range(0, len(data.images), 256)])
        section[split] = compare(spec, data.labels, float_probs, int8_probs, threshold)
        reason = refusal(spec, data.labels, float_probs, int8_probs, threshold, target_sensitivity) \
            if split == "val" else None
        if reason:
            raise ValueError(f"{reason}; keeping the float model")
    files = {}
    for key, path, runner in (("file", quantized_path(model_path), lite.backbone),
                              ("head_file", head_path(model_path), lite.head)):
        path.write_bytes(runner.content)
        files[key] = path.name
        files[key.replace("file", "sha256")] = hashlib.sha256(runner.content).hexdigest()
        files[key.replace("file", "bytes")] = len(runner.content)
    set_section(model_path, "serving", {**files, **section})
    return {**files, **section}
