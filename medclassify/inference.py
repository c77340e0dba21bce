"""The serving path: load once, warm up, predict through one compiled call.

``model.predict`` builds a data pipeline on every call (tens of milliseconds);
the serving path instead calls one traced TensorFlow graph (a concrete function
with a fixed input signature) that

* takes the uint8 pixels as they come from ``prepare`` (the cast to float32 is
  inside the graph: no NumPy conversion pass, a quarter of the bytes copied),
* never runs augmentation layers: models saved by training have none
  (``models.inference_model``), and ``serving_model`` starts any older model's
  graph after them (same layer objects and weights; the augmentations are the
  identity at inference, so the outputs are bit-identical),
* returns the calibrated probabilities and the pooled features (for the
  out-of-distribution check) from the same call.

A model whose card lists an int8 serving copy (``quantization``: the shipped
models) answers single images and batches through that copy on TensorFlow
Lite.  Without one (``MEDCLASSIFY_SERVING_PRECISION=float``, trained models
that were never quantised), a server's single images (``get_predictor``, or
``single_image_runtime="tflite"``; a plain ``Predictor`` stays on TensorFlow,
which batch tools prefer) go through TensorFlow Lite
(``LiteSingleImage``): the same float graph converted in memory at load time
and run by the XNNPACK CPU kernels, which have a fraction of TensorFlow's
per-call overhead (measured in ``benchmarks/RESULTS.md``).  That conversion is
checked against the Keras outputs at load; when it cannot be built or
disagrees, TensorFlow is used.  Float batches stay on TensorFlow (same
throughput, and one graph for any N).

The app (``get_predictor``), the CLI (``cli._predict``), ``fit_ood`` and the
benchmarks (``benchmarks/benchmark.py``) all go through ``Predictor``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .cards import read_card
from .preprocessing import ImageError, ImageLike, Prepared, first_line, prepare
from .quantization import lite_threads, load_quantized, new_interpreter, serving_precision, to_tflite
from .registry import TaskSpec, get_task

#: Environment variables read by ``configure_threads`` when a process builds its first ``Predictor``.
THREADS_ENV = "MEDCLASSIFY_TF_INTRA_OP_THREADS"
SINGLE_RUNTIME_ENV = "MEDCLASSIFY_SINGLE_IMAGE_RUNTIME"  # "tflite" (default) or "tensorflow"
#: A server's model file for a task, instead of the shipped one: $MEDCLASSIFY_BLOOD_MODEL, $MEDCLASSIFY_BREAST_MODEL.
MODEL_ENV = "MEDCLASSIFY_{TASK}_MODEL"

#: What the CLI and the app say instead of a label for an image unlike the training data.
NO_ANSWER = "no reliable answer"
DEFAULT_BATCH_SIZE = 256
#: Longest exception text a one-line error message quotes.
GIST_CHARS = 120

log = logging.getLogger(__name__)


#: A folder path inside a message: "/srv/app/lib/pydicom/x.py" keeps only "x.py".
_FOLDERS = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])+")


def without_folders(text: str) -> str:
    """``text`` with every path cut to its file name: a message for a user names no folder of the server."""
    return _FOLDERS.sub("", text)


def exception_gist(exc: BaseException) -> str:
    """``Type: first line of the text``, cut to ``GIST_CHARS`` and without folders: enough to tell failures
    apart in one line."""
    name, line = type(exc).__name__, without_folders(first_line(exc))
    if line == name:  # no text of its own
        return name
    line = line if len(line) <= GIST_CHARS else line[:GIST_CHARS - 1].rstrip() + "…"
    return f"{name}: {line}"


def reading_error(source, exc: BaseException) -> ImageError:
    """A reader that failed with something other than ``ImageError`` (a decoder bug, a format it half-knows):
    logged whole, and an ``ImageError`` naming the failure for the user, alike for single images and batches."""
    log.warning("could not read %s", describe_source(source), exc_info=exc)
    return ImageError(f"could not read image ({exception_gist(exc)})")


def describe_source(source) -> str:
    """A path as itself, anything else by its type: an upload's bytes never go into a log."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


#: Two classes whose calibrated probabilities are closer than this are a close call, not a firm answer.
CLOSE_CALL = 0.10
#: A thresholded answer (breast) is a close call when P(malignant) is this close to the threshold: the shift of
#: probability that flips a blood close call (half the gap moving from the first class to the second). A
#: convention for "nearly a coin toss", not a measured stability margin (answers can change with image size
#: away from the threshold too).
BORDERLINE = CLOSE_CALL / 2


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
    source_size: Optional[tuple[int, int]] = None  # (width, height) of the image as uploaded

    @property
    def close_call(self) -> bool:
        """Whether the answer is nearly a coin toss: P(positive) within ``BORDERLINE`` of the threshold where a
        threshold decides, else the two likeliest classes within ``CLOSE_CALL``."""
        if get_task(self.task).decision == "threshold":
            return abs(float(self.p_positive) - float(self.threshold)) < BORDERLINE
        top = sorted(self.probabilities.values(), reverse=True)
        return len(top) > 1 and top[0] - top[1] < CLOSE_CALL

    def to_json(self, file: Optional[str] = None) -> dict:
        out = {}
        if file is not None:
            out["file"] = file
        out.update(task=self.task, label=self.label, class_index=self.class_index,
                   probabilities={k: round(v, 6) for k, v in self.probabilities.items()},
                   ood=self.ood, close_call=self.close_call, warnings=list(self.warnings))
        if self.p_positive is not None:
            out["p_malignant"] = round(self.p_positive, 6)
            out["threshold"] = self.threshold
        return out


def _is_augmentation(layer) -> bool:
    """Augmentation layers are named ``aug_*`` (``m<i>_aug_*`` inside an ensemble)."""
    name = layer.name
    return name.startswith("aug_") or ("_aug_" in name and name.split("_aug_")[0].lstrip("m").isdigit())


def serving_model(model, features: bool = True):
    """The inference graph of ``model`` without its augmentation layers.

    Returns ``(serving, n_inputs)``: a Keras model that shares every layer (and
    so every weight) with ``model`` and maps the image to ``[probabilities,
    features]`` (the pooled features the OOD rule reads, ``models.feature_tensor``;
    the probabilities alone when ``features`` is False), and
    how many times the image must be passed to it.  The augmentation layers (a
    chain right after the input, one chain per member of an ensemble) are the
    identity at inference, so the outputs equal ``model(x, training=False)``;
    the serving graph starts after them and does not carry their ops.  A model
    whose graph looks different is used whole (still correct, a little slower).
    """
    import keras

    from .models import feature_tensor

    outputs = [model.output, feature_tensor(model)] if features else [model.output]
    augment = [layer for layer in model.layers if _is_augmentation(layer)]
    if augment and len(model.inputs) == 1:
        try:
            produced = {id(layer.output): layer for layer in augment}
            source = model.inputs[0]
            # every augmentation layer reads the image or the previous augmentation of a chain
            if all(layer.input is source or id(layer.input) in produced for layer in augment):
                consumed = {id(layer.input) for layer in augment}
                ends = [layer.output for layer in augment if id(layer.output) not in consumed]
                serving = keras.Model(ends if len(ends) > 1 else ends[0], outputs, name=f"{model.name}_serving")
                return serving, len(ends)
        except Exception:  # an unexpected graph: fall back to the full model (still correct, a little slower)
            log.warning("serving graph of %s: augmentation layers not bypassed", model.name, exc_info=True)
    return keras.Model(model.inputs, outputs, name=f"{model.name}_serving"), 1


def compile_serving_function(model, input_shape: tuple[int, ...], dtype: str = "uint8",
                             jit_compile: bool = False, n_inputs: int = 1, batch: Optional[int] = None):
    """A concrete function ``images (N, *input_shape) -> outputs of model`` traced once.

    ``dtype`` is the input dtype (``uint8`` pixels are cast to float32 inside
    the graph); ``n_inputs`` is how many inputs ``model`` takes (all get the
    image: see ``serving_model``); ``batch`` fixes N (XLA compiles once per
    shape).  Calling the concrete function skips ``tf.function``'s per-call
    signature matching.
    """
    import tensorflow as tf

    tf_dtype = tf.as_dtype(dtype)

    @tf.function(input_signature=[tf.TensorSpec([batch, *input_shape], tf_dtype, name="image")],
                 jit_compile=jit_compile, reduce_retracing=True, autograph=False)
    def serve(image):
        x = tf.cast(image, tf.float32)
        return model(x if n_inputs == 1 else [x] * n_inputs, training=False)

    return serve.get_concrete_function()


def configure_threads(intra_op: Optional[int] = None, inter_op: Optional[int] = None) -> bool:
    """Set TensorFlow's thread pools; only possible before TensorFlow runs its first operation.

    With ``intra_op=None`` the value comes from ``$MEDCLASSIFY_TF_INTRA_OP_THREADS``
    (nothing is changed when that is unset).  Single images in a server run on
    TensorFlow Lite, so this setting only touches TensorFlow work (batches,
    Grad-CAM); ``benchmarks/RESULTS.md`` ("runtime settings") shows what one
    intra-op thread costs in batch throughput.  Returns True when the
    setting was applied, False when there was nothing to set or it was too
    late (the process keeps TensorFlow's defaults then).
    """
    if intra_op is None:
        value = os.environ.get(THREADS_ENV, "").strip()
        if not value:
            return False
        try:
            intra_op = int(value)
        except ValueError:
            print(f"warning: ignoring {THREADS_ENV}={value!r} (not an integer)", file=sys.stderr)
            return False
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op if inter_op is not None
                                                             else (1 if intra_op == 1 else 0))
    except RuntimeError:  # TensorFlow is already running: keep its settings
        return False
    return True


_THREADS_CONFIGURED = False


def _configure_threads_once() -> None:
    global _THREADS_CONFIGURED
    if not _THREADS_CONFIGURED:
        _THREADS_CONFIGURED = True
        configure_threads()


class LiteSingleImage:
    """One image at a time through TensorFlow Lite (XNNPACK), same outputs as ``keras_model``.

    ``keras_model`` maps float pixels (1, *input_shape) to a list of outputs.
    The interpreter is not thread-safe, so calls are serialised by a lock (one
    call takes about a millisecond).  Raises ``RuntimeError`` when the
    converted model does not reproduce ``keras_model`` within ``atol``.
    """

    def __init__(self, keras_model, input_shape: tuple[int, ...], threads: Optional[int] = None,
                 atol: float = 1e-4, seed: int = 0):
        self._interpreter = new_interpreter(to_tflite(keras_model), threads or lite_threads())
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._lock = threading.Lock()
        # TFLite orders outputs its own way: map them onto the Keras outputs by value on a probe image
        probe = np.random.default_rng(seed).integers(0, 256, (1, *input_shape)).astype(np.float32)
        expected = [np.asarray(t) for t in _as_list(keras_model([probe], training=False))]
        got = self._run(probe, [d["index"] for d in self._interpreter.get_output_details()])
        order = []
        for want in expected:
            match = [i for i, g in enumerate(got) if g.shape == want.shape and np.allclose(g, want, atol=atol)]
            if not match:
                raise RuntimeError("TensorFlow Lite conversion does not reproduce the Keras model")
            order.append(match[0])
        details = self._interpreter.get_output_details()
        self._outputs = [details[i]["index"] for i in order]

    def _run(self, image: np.ndarray, outputs: list[int]) -> list[np.ndarray]:
        with self._lock:
            self._interpreter.set_tensor(self._input, image)
            self._interpreter.invoke()
            return [self._interpreter.get_tensor(i) for i in outputs]  # get_tensor returns a copy

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        """``image``: (1, *input_shape) pixels 0..255 (any dtype) -> the Keras outputs as arrays."""
        return self._run(np.asarray(image, dtype=np.float32), self._outputs)


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def served_model_path(task: str) -> Path:
    """The model file a server loads for ``task``: ``$MEDCLASSIFY_<TASK>_MODEL`` (a retrained model, served
    without replacing the shipped one), else the shipped model."""
    spec = get_task(task)
    chosen = os.environ.get(MODEL_ENV.format(TASK=spec.name.upper()), "").strip()
    return Path(chosen).expanduser() if chosen else spec.model_path


def serving_runtime(default: str = "tflite") -> str:
    """The single-image runtime: ``$MEDCLASSIFY_SINGLE_IMAGE_RUNTIME``, else ``default`` (TFLite, for servers)."""
    return os.environ.get(SINGLE_RUNTIME_ENV, "").strip().lower() or default


class Predictor:
    """One loaded model of one task, ready to classify images quickly.

    Thread-safe: the compiled functions and the OOD detector hold no per-call
    state, and the TFLite interpreters are behind locks, so one instance serves
    every session of the app.

    When the card lists an int8 copy of the model (``quantization``) whose
    SHA-256 matches, that copy serves every call, single images and batches
    alike, so both give the same numbers; ``MEDCLASSIFY_SERVING_PRECISION=float``
    turns it off.  ``precision`` tells which one is in use.  Without it:

    ``single_image_runtime`` picks what runs batches of one image (``predict``
    and ``predict_arrays``): ``"tflite"`` (``LiteSingleImage``: 2-3x faster
    per image than the TensorFlow graph, after a conversion at load that
    takes ~2 s for the blood CNN and ~8 s for the 5-member breast ensemble)
    or ``"tensorflow"`` (no conversion).  Default: ``$MEDCLASSIFY_SINGLE_IMAGE_RUNTIME``,
    else ``"tensorflow"``, which suits the batch tools (CLI, OOD fitting)
    that start often and answer batches; ``get_predictor``, the long-lived
    cache the app serves single images from, asks for ``"tflite"``.
    ``single_runtime`` tells which one is in use.
    """

    def __init__(self, task: str | TaskSpec, model_path: Optional[str | os.PathLike] = None, warm: bool = True,
                 single_image_runtime: Optional[str] = None):
        from .evaluation import decision_threshold
        from .models import load_model
        from .ood import OODDetector

        _configure_threads_once()
        # settings first: a typo in one is reported before, not after, a model load of several seconds
        precision = serving_precision()
        runtime = (single_image_runtime or serving_runtime(default="tensorflow")).strip().lower()
        if runtime not in ("tflite", "tensorflow"):
            raise ValueError(f"single-image runtime must be 'tflite' or 'tensorflow', not {runtime!r}")
        self.spec = get_task(task) if isinstance(task, str) else task
        self.model_path = Path(model_path) if model_path else self.spec.model_path
        self.model = load_model(self.model_path, self.spec)  # a missing file: FileNotFoundError, said there
        self.card = read_card(self.model_path)
        self.threshold = decision_threshold(self.card, self.spec, self.model_path.name)
        self._serving_model, self._serving_inputs = serving_model(self.model)
        self._graphs = {}  # dtype -> TensorFlow graph, traced on first use: the int8 copy usually serves
        self._graph_lock = threading.Lock()
        self._quantized = None
        self._serve_single = None
        if precision == "int8":
            try:
                self._quantized = load_quantized(self.model_path, self.card)
            except Exception as exc:  # a damaged file: the float model is still correct
                print(f"warning: serving the float model ({exc})", file=sys.stderr)
        # a legacy graph with augmentation branches (see serving_model) stays on TensorFlow
        if self._quantized is None and runtime == "tflite" and self._serving_inputs == 1:
            try:
                self._serve_single = LiteSingleImage(self._serving_model, self.spec.input_shape)
            except Exception as exc:  # an op TFLite lacks, or outputs that disagree: TensorFlow is still correct
                print(f"warning: single images use TensorFlow ({exc})", file=sys.stderr)
        self.ood = OODDetector.for_model(self.spec, self.model_path, self.card)
        fitted_on = ((self.card or {}).get("ood") or {}).get("features")  # absent in cards before it was recorded
        if fitted_on and fitted_on != self.precision:
            print(f"warning: the OOD statistics of {self.model_path.name} were fitted on {fitted_on} features and "
                  f"the {self.precision} model is serving: its flag rates are not the measured ones until "
                  f"`python -m medclassify fit-ood --task {self.spec.name}` is run with the same precision",
                  file=sys.stderr)
        if warm:
            self.warm_up()

    @property
    def precision(self) -> str:
        """``"int8"`` when the card's quantised file serves every call, else ``"float"``."""
        return "float" if self._quantized is None else "int8"

    @property
    def single_runtime(self) -> str:
        """What runs batches of one image: ``"tflite-int8"``, ``"tflite"`` or ``"tensorflow"``."""
        if self._quantized is not None:
            return "tflite-int8"
        return "tensorflow" if self._serve_single is None else "tflite"

    def compile(self, dtype: str = "uint8", jit_compile: bool = False, batch: Optional[int] = None):
        """A fresh concrete function over this predictor's serving graph (the benchmarks compare variants)."""
        return compile_serving_function(self._serving_model, self.spec.input_shape, dtype, jit_compile,
                                        self._serving_inputs, batch)

    def warm_up(self, batch_sizes: Iterable[int] = (1,)) -> "Predictor":
        """Run the graph once per batch size so the first user does not pay for graph or kernel set-up."""
        for n in batch_sizes:
            for _ in range(2):
                self.predict_arrays(np.zeros((n, *self.spec.input_shape), dtype=np.uint8))
        return self

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel batch (N, H, W, C), uint8 0..255 (or float 0..255) -> (probabilities (N, K), features (N, D))."""
        images = np.asarray(images)
        if images.ndim == len(self.spec.input_shape):
            images = images[None]
        if self._quantized is not None:
            return self._quantized(images)
        if images.dtype == np.uint8:
            if self._serve_single is not None and images.shape[0] == 1:
                return tuple(self._serve_single(images))  # already NumPy
            probs, feats = self._graph("uint8")(images)
        else:
            probs, feats = self._graph("float32")(images.astype(np.float32, copy=False))
        return probs.numpy(), feats.numpy()

    def _graph(self, dtype: str):
        with self._graph_lock:
            if dtype not in self._graphs:
                self._graphs[dtype] = self.compile(dtype)
            return self._graphs[dtype]

    def _decide(self, probs: np.ndarray) -> int:
        from .evaluation import decide  # the rule the card's metrics were measured with (loaded by __init__)

        return int(decide(self.spec, probs[None], self.threshold)[0])

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
            source_size=prepared.original_size,
        )

    def predict(self, source: ImageLike) -> Prediction:
        """One image (bytes, path, PIL image or array) -> Prediction.  Raises ImageError."""
        try:
            prepared = prepare(source, self.spec)
        except ImageError:
            raise
        except Exception as exc:
            raise reading_error(source, exc) from exc
        probs, feats = self.predict_arrays(prepared.array[None])
        return self._result(prepared, probs[0], feats[0])

    def _prepare_batch(self, chunk: list) -> list[tuple[object, Prepared | str]]:
        out = []
        for source in chunk:
            try:
                out.append((source, prepare(source, self.spec)))
            except ImageError as exc:
                out.append((source, str(exc)))
            except Exception as exc:  # never let one odd file stop a batch
                out.append((source, str(reading_error(source, exc))))
        return out

    def _predict_prepared(self, batch: list[tuple[object, Prepared | str]]) -> Iterator[tuple[object, Prediction | str]]:
        good = [i for i, (_, p) in enumerate(batch) if isinstance(p, Prepared)]
        results: dict[int, Prediction] = {}
        if good:
            probs, feats = self.predict_arrays(np.stack([batch[i][1].array for i in good]))
            for row, i in enumerate(good):
                results[i] = self._result(batch[i][1], probs[row], feats[row])
        for i, (source, prepared) in enumerate(batch):
            yield source, results.get(i, prepared)

    def predict_many(self, sources: Iterable, batch_size: int = DEFAULT_BATCH_SIZE,
                     prefetch: bool = True) -> Iterator[tuple[object, Prediction | str]]:
        """Stream ``(source, Prediction or one-line error)`` in input order, batching model calls.

        ``sources`` may be any iterable (a generator of paths is read lazily).
        With ``prefetch`` one background thread reads and prepares the next
        batch while the model runs on the current one; at most two batches of
        prepared images are held at any time, so memory stays flat however many
        files there are.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        iterator = iter(sources)

        def next_chunk() -> list:
            chunk = []
            for source in iterator:
                chunk.append(source)
                if len(chunk) >= batch_size:
                    break
            return chunk

        def read_batch():
            return self._prepare_batch(next_chunk())

        if not prefetch:
            while True:
                batch = read_batch()
                if not batch:
                    return
                yield from self._predict_prepared(batch)

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medclassify-prepare")
        try:
            pending = executor.submit(read_batch)
            while True:
                batch = pending.result()
                if not batch:
                    return
                pending = executor.submit(read_batch)  # prepare the next batch while this one runs
                yield from self._predict_prepared(batch)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


_PREDICTORS: dict[tuple[str, str], Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()  # one for every model: Keras loads are not known to be thread-safe, and
# each model loads once per process, so a second task waiting for the first costs a few seconds once


def get_predictor(task: str, model_path: Optional[str] = None) -> Predictor:
    """Process-wide cache for servers: each model is loaded, converted for single images and warmed once.

    Without ``model_path``, the model of ``served_model_path``. Single images run on TensorFlow Lite unless
    ``$MEDCLASSIFY_SINGLE_IMAGE_RUNTIME`` says otherwise: a server pays the conversion once and then answers
    every user faster.
    """
    spec = get_task(task)
    model_path = Path(model_path) if model_path else served_model_path(spec.name)
    key = (spec.name, str(model_path.resolve()))
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            _PREDICTORS[key] = Predictor(spec, model_path, single_image_runtime=serving_runtime())
        return _PREDICTORS[key]
