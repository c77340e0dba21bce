"""``python -m medclassify export``: a SavedModel TensorFlow Serving can serve, matching the Keras model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medclassify import cli
from medclassify.export import export_savedmodel
from medclassify.inference import Predictor
from medclassify.preprocessing import prepare
from medclassify.registry import TASKS, get_task

TASK_NAMES = sorted(TASKS)


def fixture_batch(fixture_images, task: str) -> np.ndarray:
    """The real test-split thumbnails of ``task``, prepared exactly as the app and CLI prepare them."""
    paths = sorted(info.path for info in fixture_images.values() if info.task == task)
    assert paths
    return np.stack([prepare(path, task).array for path in paths])


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serving")
    return {task: export_savedmodel(task, base / task, tiny_models[task].path) for task in TASK_NAMES}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_layout_is_what_tf_serving_expects(exported, tiny_models, task):
    version = exported[task]
    assert version.name == "1"  # <base>/<version>/saved_model.pb
    assert (version / "saved_model.pb").is_file()
    assert (version / "variables").is_dir()
    card = json.loads((version / "assets.extra" / "card.json").read_text())
    assert card["task"] == task


@pytest.mark.parametrize("task", TASK_NAMES)
def test_reloaded_signature_matches_keras(exported, tiny_models, fixture_images, task):
    import tensorflow as tf

    spec = get_task(task)
    loaded = tf.saved_model.load(str(exported[task]))
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert list(inputs) == ["image"]
    assert inputs["image"].dtype == tf.float32 and tuple(inputs["image"].shape) == (None, *spec.input_shape)
    assert set(serve.structured_outputs) == {"probabilities", "class_index", "label"}

    images = fixture_batch(fixture_images, task)
    out = serve(image=tf.constant(images.astype(np.float32)))
    predictor = Predictor(task, tiny_models[task].path)
    keras_probs = predictor.model(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_probs, rtol=1e-5, atol=1e-6)
    # the decision (argmax, or the breast threshold from the card) is the Predictor's
    expected = [predictor._decide(row) for row in out["probabilities"].numpy()]
    assert out["class_index"].numpy().tolist() == expected
    assert [label.decode() for label in out["label"].numpy()] == [spec.class_names[i] for i in expected]
    # one image, as a TF Serving REST "instances" request would send it
    one = serve(image=tf.constant(images[:1].astype(np.float32)))
    np.testing.assert_allclose(one["probabilities"].numpy()[0], keras_probs[0], rtol=1e-5, atol=1e-6)


def test_versions_increment_and_never_overwrite(tiny_models, tmp_path):
    path = tiny_models["breast"].path
    base = tmp_path / "breast"
    assert export_savedmodel("breast", base, path) == base / "1"
    assert export_savedmodel("breast", base, path) == base / "2"
    # a numeric last component is the version folder itself
    assert export_savedmodel("breast", base / "7", path) == base / "7"
    assert export_savedmodel("breast", base, path) == base / "8"
    with pytest.raises(FileExistsError):
        export_savedmodel("breast", base / "7", path)
    with pytest.raises(FileNotFoundError):
        export_savedmodel("breast", tmp_path / "other", tmp_path / "missing.h5")


def test_existing_version_refused_before_the_model_loads(tiny_models, tmp_path, monkeypatch):
    import medclassify.models

    target = tmp_path / "breast" / "3"
    target.mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"")
    monkeypatch.setattr(medclassify.models, "load_model", lambda *a, **k: pytest.fail("model loaded first"))
    with pytest.raises(FileExistsError, match="already exists"):
        export_savedmodel("breast", target, tiny_models["breast"].path)
    assert [p.name for p in target.iterdir()] == ["saved_model.pb"]


def test_cli_export(tiny_models, tmp_path, capsys):
    base = tmp_path / "blood"
    code = cli.main(["export", "--task", "blood", "--format", "savedmodel", "--model", str(tiny_models["blood"].path),
                     "--out", str(base)])
    assert code == 0
    assert str(base / "1") in capsys.readouterr().out
    assert (base / "1" / "saved_model.pb").is_file()


def test_savedmodel_calls_a_probability_on_the_threshold_positive(tiny_models, tmp_path):
    """The served rule is the metrics' rule, ``P(malignant) >= threshold``, at exact ties too: the card's
    threshold is set to a probability the exported graph gives, and that image must come back malignant."""
    import shutil

    import tensorflow as tf

    from medclassify.cards import card_path, read_card, write_card

    spec = get_task("breast")
    model = tmp_path / "model_breast.h5"
    shutil.copyfile(tiny_models["breast"].path, model)
    shutil.copyfile(card_path(tiny_models["breast"].path), card_path(model))
    images = tf.constant(np.random.default_rng(3).integers(0, 256, (8, *spec.input_shape)).astype(np.float32))

    def serve():
        version = export_savedmodel("breast", tmp_path / "serving", model)
        out = tf.saved_model.load(str(version)).signatures["serving_default"](image=images)
        return out["probabilities"].numpy(), out["class_index"].numpy()

    probs, _ = serve()
    p_malignant = probs[:, spec.positive_class]
    tie = int(np.argsort(p_malignant)[len(p_malignant) // 2])  # a middle one: others fall on both sides
    card = read_card(model)
    card["decision"]["threshold"] = float(p_malignant[tie])  # float32 -> float64 -> float32 is exact
    write_card(model, card)
    again, classes = serve()
    np.testing.assert_array_equal(again, probs)  # the same graph: the tie is exact
    assert classes[tie] == spec.positive_class
    assert classes.tolist() == np.where(p_malignant >= p_malignant[tie], spec.positive_class,
                                        1 - spec.positive_class).tolist()
    assert len(set(classes.tolist())) == 2
