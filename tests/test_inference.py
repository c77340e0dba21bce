"""The serving path (``medclassify.inference``): compiled calls, streaming, batching (the predict command's
tests are in ``test_cli_predict.py``).

Models: the session's ``tiny_models`` (conftest), trained on the fixture data.
Speed is measured by ``benchmarks/benchmark.py``, not here; these tests check
behaviour (same numbers as Keras, order, laziness, flat memory).
"""
from __future__ import annotations

import json
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes, task_images
from medclassify.inference import (Prediction, Predictor, get_predictor, serving_model)
from medclassify.registry import TASKS, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_NAMES = sorted(TASKS)
JSON_KEYS = {"file", "task", "label", "class_index", "probabilities", "ood", "close_call", "warnings"}


def random_batch(task: str, n: int = 6, seed: int = 0) -> np.ndarray:
    spec = get_task(task)
    return np.random.default_rng(seed).integers(0, 256, (n, *spec.input_shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictors(tiny_models) -> dict[str, Predictor]:
    return {task: Predictor(task, tiny_models[task].path) for task in TASK_NAMES}


# --------------------------------------------------------------------------- compiled serving graph

@pytest.mark.parametrize("task", TASK_NAMES)
def test_serving_model_drops_augmentation_and_shares_weights(task):
    """A model that still carries augmentation layers is served from the layer after them."""
    from medclassify.models import build_cnn

    model = build_cnn(task, widths=(4, 8, 8))
    assert any(layer.name.startswith("aug_") for layer in model.layers)
    serving, n_inputs = serving_model(model)
    assert n_inputs == 1
    assert not any(layer.name.startswith("aug_") for layer in serving.layers)
    assert serving.get_layer("logits") is model.get_layer("logits")  # same objects, same weights
    x = random_batch(task, 5).astype(np.float32)
    probs, feats = serving(x, training=False)
    np.testing.assert_array_equal(probs.numpy(), model(x, training=False).numpy())
    assert feats.shape == (5, 8)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_serving_model_of_a_saved_model(predictors, task):
    """Saved models (augmentation already stripped by training) are served as they are."""
    predictor = predictors[task]
    assert predictor._serving_inputs == 1
    assert not any("aug_" in layer.name for layer in predictor._serving_model.layers)
    x = random_batch(task, 4, seed=8).astype(np.float32)
    probs, _ = predictor._serving_model(x, training=False)
    np.testing.assert_array_equal(probs.numpy(), predictor.model(x, training=False).numpy())


def test_serving_model_strips_one_augmentation_chain_per_branch():
    """Two branches, each behind its own augmentation chain (``m<i>_aug_*``): both chains go."""
    import keras

    inputs = keras.Input((28, 28, 3), name="image")
    logits = []
    for i in range(2):
        x = keras.layers.RandomFlip("horizontal", name=f"m{i}_aug_flip")(inputs)
        x = keras.layers.RandomContrast(0.1, value_range=(0, 255), name=f"m{i}_aug_contrast")(x)
        x = keras.layers.Rescaling(1 / 255, name=f"m{i}_rescale")(x)
        x = keras.layers.Conv2D(4, 3, name=f"m{i}_conv")(x)
        pool = keras.layers.GlobalAveragePooling2D(name=f"m{i}_pool")(x)
        logits.append(keras.layers.Dense(8, name=f"m{i}_logits")(pool))
    mean = keras.layers.Average(name="logits")(logits)
    probs = keras.layers.Activation("softmax", name="probabilities")(mean)
    model = keras.Model(inputs, probs)
    serving, n_inputs = serving_model(model)
    assert n_inputs == 2
    assert not any("aug_" in layer.name for layer in serving.layers)
    x = random_batch("blood", 3, seed=9).astype(np.float32)
    out, feats = serving([x, x], training=False)
    np.testing.assert_array_equal(out.numpy(), model(x, training=False).numpy())
    assert feats.shape == (3, 8)  # both branches' pooled features


def test_serving_model_of_an_ensemble(tmp_path):
    """Ensembles serve through the same path, with the members' features side by side."""
    from medclassify import models

    members = [models.build_cnn("blood", widths=(4, 8, 8)) for _ in range(2)]
    ensemble = models.with_temperature(models.build_ensemble(members), 1.3)
    path = tmp_path / "ensemble.h5"
    ensemble.save(str(path))
    predictor = Predictor("blood", path)
    assert not any("aug_" in layer.name for layer in predictor._serving_model.layers)
    x = random_batch("blood", 3, seed=5)
    probs, feats = predictor.predict_arrays(x)
    expected = predictor.model(x.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert feats.shape == (3, 16)  # both members' pooled features


@pytest.mark.parametrize("task", TASK_NAMES)
def test_predict_arrays_matches_keras(predictors, task):
    predictor = predictors[task]
    x = random_batch(task, 7, seed=1)
    probs, feats = predictor.predict_arrays(x)
    expected = predictor.model(x.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert probs.dtype == np.float32 and probs.shape == (7, get_task(task).num_classes)
    assert feats.shape[0] == 7
    # float pixels take the float graph and give the same answer; one image without the batch axis works
    float_probs, _ = predictor.predict_arrays(x.astype(np.float32))
    np.testing.assert_allclose(float_probs, probs, rtol=1e-5, atol=1e-6)
    single, _ = predictor.predict_arrays(x[0])
    np.testing.assert_allclose(single[0], probs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_single_image_tflite_matches_the_tensorflow_graph(tiny_models, task):
    predictor = Predictor(task, tiny_models[task].path, single_image_runtime="tflite")
    assert predictor.single_runtime == "tflite"
    x = random_batch(task, 3, seed=7)
    batch_probs, batch_feats = predictor.predict_arrays(x)  # a batch: the TensorFlow graph
    for i in range(3):
        probs, feats = predictor.predict_arrays(x[i])  # one image: TensorFlow Lite
        np.testing.assert_allclose(probs[0], batch_probs[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats[0], batch_feats[i], rtol=1e-4, atol=1e-4)
    prediction = predictor.predict(x[0])  # the public single-image call takes the same runtime
    np.testing.assert_allclose(list(prediction.probabilities.values()), batch_probs[0], rtol=1e-4, atol=1e-5)


def test_single_image_runtime_defaults_and_overrides(tiny_models, monkeypatch):
    from medclassify import inference

    monkeypatch.delenv(inference.SINGLE_RUNTIME_ENV, raising=False)
    # batch tools (CLI, OOD fitting) skip the conversion; servers (get_predictor, the app) convert once
    assert Predictor("blood", tiny_models["blood"].path).single_runtime == "tensorflow"
    assert inference.serving_runtime() == "tflite"
    monkeypatch.setattr(inference, "_PREDICTORS", {})  # a fresh cache, restored afterwards
    assert get_predictor("blood", str(tiny_models["blood"].path)).single_runtime == "tflite"
    monkeypatch.setenv(inference.SINGLE_RUNTIME_ENV, "tensorflow")  # the environment wins everywhere
    assert inference.serving_runtime() == "tensorflow"
    predictor = Predictor("blood", tiny_models["blood"].path, single_image_runtime=inference.serving_runtime())
    assert predictor.single_runtime == "tensorflow" and predictor._serve_single is None
    with pytest.raises(ValueError, match="runtime"):
        Predictor("blood", tiny_models["blood"].path, single_image_runtime="onnx")


def test_the_environment_names_a_servers_model(tiny_models, monkeypatch):
    from medclassify import inference

    for task in ("blood", "breast"):
        monkeypatch.delenv(f"MEDCLASSIFY_{task.upper()}_MODEL", raising=False)
        assert inference.served_model_path(task) == get_task(task).model_path  # the shipped one
    monkeypatch.setenv("MEDCLASSIFY_BLOOD_MODEL", f"  {tiny_models['blood'].path}\n")
    monkeypatch.setenv("MEDCLASSIFY_BREAST_MODEL", "")  # set but empty: the shipped one
    assert inference.served_model_path("blood") == tiny_models["blood"].path
    assert inference.served_model_path("breast") == get_task("breast").model_path
    monkeypatch.setattr(inference, "_PREDICTORS", {})
    assert get_predictor("blood").model_path == tiny_models["blood"].path
    assert get_predictor("blood", get_task("blood").model_path).model_path == get_task("blood").model_path


@pytest.mark.parametrize("setting", [{"MEDCLASSIFY_SERVING_PRECISION": "fp16"}, {"runtime": "onnx"}])
def test_bad_serving_settings_are_reported_before_the_model_loads(monkeypatch, setting):
    from medclassify import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    for name, value in setting.items():
        if name.startswith("MEDCLASSIFY_"):
            monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="PRECISION|runtime"):
        Predictor("blood", "model_blood.h5", single_image_runtime=setting.get("runtime"))


def test_lite_runner_refuses_a_conversion_that_disagrees(tiny_models):
    from medclassify.inference import LiteSingleImage

    predictor = Predictor("blood", tiny_models["blood"].path, single_image_runtime="tensorflow")
    # a tolerance no float computation meets: the runner must refuse rather than serve other numbers
    with pytest.raises(RuntimeError, match="does not reproduce"):
        LiteSingleImage(predictor._serving_model, predictor.spec.input_shape, atol=-1.0)


def test_configure_threads(monkeypatch):
    from medclassify import inference

    monkeypatch.delenv(inference.THREADS_ENV, raising=False)
    assert inference.configure_threads() is False  # nothing asked for
    monkeypatch.setenv(inference.THREADS_ENV, "two")
    assert inference.configure_threads() is False  # not a number: ignored
    # TensorFlow already ran operations in this process, so it is too late: a no-op, not an error
    import tensorflow as tf

    tf.constant(1.0) + 1.0
    # ask for a value other than the current one (the app tests may already have set 1 in this process)
    different = tf.config.threading.get_intra_op_parallelism_threads() + 1
    assert inference.configure_threads(different) is False


def test_predict_arrays_is_thread_safe(predictors):
    predictor = predictors["blood"]
    x = random_batch("blood", 4, seed=2)
    expected, _ = predictor.predict_arrays(x)
    results, errors = [], []

    def worker():
        try:
            for _ in range(10):
                results.append(predictor.predict_arrays(x)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 40
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_predict_one_image(predictors, fixture_images, task):
    predictor = predictors[task]
    path = task_images(fixture_images, task)[0]
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        prediction = predictor.predict(source)
        assert isinstance(prediction, Prediction)
        assert prediction.task == task
        assert prediction.label == get_task(task).class_names[prediction.class_index]
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction.model_input.shape == get_task(task).input_shape
        record = prediction.to_json(file="x.png")
        assert JSON_KEYS <= set(record)
        json.dumps(record)  # serialisable


def test_a_breast_model_without_a_threshold_decides_at_0_5_and_says_so(tiny_models, tmp_path, capsys):
    import shutil

    model = tmp_path / "model_breast.h5"
    shutil.copyfile(tiny_models["breast"].path, model)  # no card beside it
    predictor = Predictor("breast", model, warm=False)
    assert predictor.threshold == 0.5
    assert "no threshold in its card; deciding at MedMNIST's 0.5" in capsys.readouterr().err
    probs, _ = predictor.predict_arrays(random_batch("breast", n=8))
    prediction = predictor.predict(random_batch("breast", n=1)[0])
    assert prediction.label == ("malignant" if prediction.probabilities["malignant"] >= 0.5 else "normal/benign")
    assert probs.shape == (8, 2)


def test_predictor_decides_with_the_rule_the_metrics_use():
    """``Predictor._decide`` is ``evaluation.decide``: the card's metrics describe what is served."""
    from medclassify.evaluation import decide

    rng = np.random.default_rng(0)
    for task, threshold in (("blood", None), ("breast", 0.3), ("breast", 0.5)):
        spec = get_task(task)
        probs = rng.dirichlet(np.ones(spec.num_classes), 200)
        if spec.decision == "threshold":
            probs[:3, spec.positive_class] = threshold  # on the threshold: positive
            probs[:3, 1 - spec.positive_class] = 1 - threshold
        predictor = types.SimpleNamespace(spec=spec, threshold=threshold)
        assert [Predictor._decide(predictor, row) for row in probs] == decide(spec, probs, threshold).tolist()


def test_export_of_a_breast_model_without_a_threshold_decides_at_0_5_and_says_so(tiny_models, tmp_path, capsys):
    import shutil

    import tensorflow as tf

    from medclassify.export import export_savedmodel

    model = tmp_path / "model_breast.h5"
    shutil.copyfile(tiny_models["breast"].path, model)  # no card beside it
    version = export_savedmodel("breast", tmp_path / "serving", model)
    assert "model_breast.h5 has no threshold in its card; deciding at MedMNIST's 0.5" in capsys.readouterr().err
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    out = serve(image=tf.constant(random_batch("breast", n=16).astype(np.float32)))
    expected = np.where(out["probabilities"].numpy()[:, 0] >= 0.5, 0, 1)
    assert out["class_index"].numpy().tolist() == expected.tolist()


def test_get_predictor_caches(tiny_models):
    path = str(tiny_models["blood"].path)
    first = get_predictor("blood", path)
    assert get_predictor("blood", path) is first


# --------------------------------------------------------------------------- predict_many

def mixed_sources(fixture_images, tmp_path) -> tuple[list, list[bool]]:
    """Good paths, bytes and broken inputs interleaved; ``ok[i]`` says whether item i can be classified."""
    images = task_images(fixture_images, "blood")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    sources = [images[0], tmp_path / "missing.png", images[1].read_bytes(), broken, images[2],
               b"", images[3], images[4], images[5], str(images[6])]
    ok = [True, False, True, False, True, False, True, True, True, True]
    return sources, ok


@pytest.mark.parametrize("batch_size", [1, 3, 256])
@pytest.mark.parametrize("prefetch", [True, False])
def test_predict_many_order_and_errors(predictors, fixture_images, tmp_path, batch_size, prefetch):
    predictor = predictors["blood"]
    sources, ok = mixed_sources(fixture_images, tmp_path)
    stream = predictor.predict_many(iter(sources), batch_size=batch_size, prefetch=prefetch)
    assert isinstance(stream, types.GeneratorType)
    results = list(stream)
    assert [source for source, _ in results] == sources  # input order, one result per input
    for (source, outcome), good in zip(results, ok):
        if good:
            assert isinstance(outcome, Prediction), outcome
        else:
            assert isinstance(outcome, str) and outcome and "\n" not in outcome
    assert "no such file" in results[1][1]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_batching_matches_single_predictions(predictors, fixture_images, task):
    predictor = predictors[task]
    paths = task_images(fixture_images, task)
    extra = [png_bytes(img) for img in random_batch(task, 7, seed=4)]  # some OOD-ish noise images too
    sources = paths + extra
    singles = [predictor.predict(s) for s in sources]
    for batch_size in (2, 5, 64):
        batched = [outcome for _, outcome in predictor.predict_many(sources, batch_size=batch_size)]
        for one, many in zip(singles, batched):
            assert many.label == one.label and many.class_index == one.class_index
            assert many.ood == one.ood and len(many.warnings) == len(one.warnings)
            if one.ood_score is not None:  # batch and single kernels differ in the last float bits
                assert many.ood_score == pytest.approx(one.ood_score, rel=1e-3, abs=1e-3)
            np.testing.assert_allclose(list(many.probabilities.values()), list(one.probabilities.values()),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(many.model_input, one.model_input)


def test_predict_many_reads_lazily(predictors, fixture_images):
    """Only a bounded number of inputs is pulled ahead of the results already handed out."""
    predictor = predictors["blood"]
    image = task_images(fixture_images, "blood")[0].read_bytes()
    pulled = 0

    def sources():
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield image

    stream = predictor.predict_many(sources(), batch_size=10)
    next(stream)
    time.sleep(0.2)  # let the prefetch thread do whatever it will
    assert pulled <= 20  # the current batch and at most one prepared ahead
    stream.close()  # stopping early shuts the prefetch thread down
    assert not [t for t in threading.enumerate() if t.name.startswith("medclassify-prepare")
                and t.is_alive()]


@pytest.mark.parametrize("prefetch", [True, False])
def test_an_unexpected_reading_error_is_one_line_with_its_text_and_logged(predictors, fixture_images, monkeypatch,
                                                                          caplog, prefetch):
    """Not an ImageError (a reader bug, say): the user gets its gist in one line, the log the traceback."""
    import logging

    from medclassify import inference

    real_prepare = inference.prepare

    def flaky_prepare(source, spec):
        if isinstance(source, bytes) and source == b"odd":
            raise KeyError("no tag (0028,0010)")
        if isinstance(source, bytes) and source == b"odder":
            raise RuntimeError("decoder state lost\nTraceback (most recent call last): ...")
        return real_prepare(source, spec)

    monkeypatch.setattr(inference, "prepare", flaky_prepare)
    good = task_images(fixture_images, "blood")[0]
    with caplog.at_level(logging.WARNING, logger="medclassify.inference"):
        results = [outcome for _, outcome in predictors["blood"].predict_many([good, b"odd", b"odder"],
                                                                               prefetch=prefetch)]
    assert isinstance(results[0], Prediction)
    assert results[1] == "could not read image (KeyError: 'no tag (0028,0010)')"
    assert results[2] == "could not read image (RuntimeError: decoder state lost)"
    records = [r for r in caplog.records if r.name == "medclassify.inference"]
    assert len(records) == 2 and all(r.exc_info for r in records)
    assert "bytes" in records[0].getMessage() and "odd" not in records[0].getMessage()  # never the upload itself


def test_exception_gist_is_short_and_one_line():
    from medclassify.inference import GIST_CHARS, exception_gist

    assert exception_gist(ValueError()) == "ValueError"
    assert exception_gist(OSError("first\nsecond")) == "OSError: first"
    long = exception_gist(RuntimeError("x" * 500))
    assert long.startswith("RuntimeError: x") and long.endswith("…")
    assert len(long) == len("RuntimeError: ") + GIST_CHARS


def test_predict_many_rejects_bad_batch_size(predictors):
    with pytest.raises(ValueError):
        list(predictors["blood"].predict_many([b""], batch_size=0))


def test_predict_many_empty(predictors):
    assert list(predictors["blood"].predict_many([])) == []


# --------------------------------------------------------------------------- out-of-distribution distances

@pytest.mark.parametrize("task", TASK_NAMES)
def test_fast_ood_distances_match_the_detector(predictors, task):
    """The served distances are the Mahalanobis formula on the statistics in the model's .ood.npz, written
    out here row by row and class by class (not the detector's own vectorised method again)."""
    from medclassify.ood import ood_path

    predictor = predictors[task]
    assert predictor.ood.means is not None  # tiny models have fitted statistics
    _, feats = predictor.predict_arrays(random_batch(task, 9, seed=6))
    with np.load(ood_path(predictor.model_path)) as stats:
        means, precision = stats["means"].astype(np.float64), stats["precision"].astype(np.float64)
    f64 = feats.astype(np.float64)
    reference = np.array([min(float((f - m) @ precision @ (f - m)) for m in means) for f in f64])
    np.testing.assert_allclose(predictor.ood.distances(feats), reference, rtol=1e-9)
    np.testing.assert_allclose(predictor.ood.distances(feats[0]), reference[:1], rtol=1e-9)


def test_close_call_is_nearly_a_coin_toss():
    from medclassify.inference import BORDERLINE, CLOSE_CALL, Prediction

    def blood(first: float, second: float) -> Prediction:
        probs = dict.fromkeys(get_task("blood").class_names, 0.0)
        probs.update(monocyte=first, neutrophil=second)
        return Prediction("blood", "monocyte", 5, probs, np.zeros((28, 28, 3), np.uint8))

    def breast(p: float, threshold: float = 0.2) -> Prediction:
        return Prediction("breast", "malignant" if p >= threshold else "normal/benign", int(p < threshold),
                          {"malignant": p, "normal/benign": 1 - p}, np.zeros((28, 28, 1), np.uint8),
                          p_positive=p, threshold=threshold)

    assert blood(0.5, 0.45).close_call and not blood(0.6, 0.6 - CLOSE_CALL - 0.01).close_call
    # breast: the distance to the threshold decides, on both sides of it, not the gap between the two classes
    assert breast(0.2 + BORDERLINE - 0.01).close_call and breast(0.2 - BORDERLINE + 0.01).close_call
    assert not breast(0.2 + BORDERLINE + 0.01).close_call and not breast(0.1).close_call
    assert not breast(0.5, threshold=0.2).close_call  # two classes tied at 0.5, far from the threshold
    assert breast(0.21).to_json()["close_call"] is True and blood(0.9, 0.05).to_json()["close_call"] is False
