"""Grad-CAM (medclassify.explain): gradients on reloaded .h5 models, heatmap range, overlay."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from medclassify.explain import (GradCAM, colormap, explainer_for, gradcam, overlay, target_tensor,  # noqa: E402
                                 with_colour_key)
from medclassify.models import build_cnn, load_model  # noqa: E402
from medclassify.registry import get_task  # noqa: E402


def _tiny_h5(tmp_path, task: str, widths=(4, 8, 8), train: bool = False) -> str:
    """A very small CNN (optionally after one training step), saved to .h5."""
    spec = get_task(task)
    keras.utils.set_random_seed(0)
    model = build_cnn(spec, augment=False, widths=widths, dropout=0.0)
    if train:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        model.train_on_batch(rng.integers(0, 256, (8, *spec.input_shape)).astype("float32"),
                             rng.integers(0, spec.num_classes, 8))
    path = tmp_path / f"tiny_{task}_{len(widths)}.h5"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def reloaded(tiny_models):
    """The session's tiny trained models (conftest), reloaded from their .h5 files."""
    return {task: load_model(tiny_models[task].path) for task in ("blood", "breast")}


def _image(task: str, seed: int = 1) -> np.ndarray:
    spec = get_task(task)
    return np.random.default_rng(seed).integers(0, 256, spec.input_shape).astype(np.uint8)


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_gradcam_on_reloaded_h5_model(reloaded, task):
    model = reloaded[task]
    spec = get_task(task)
    for class_index in range(spec.num_classes):
        heatmap = gradcam(model, _image(task), class_index)
        assert heatmap.shape == (28, 28)
        assert heatmap.dtype == np.float32
        assert np.isfinite(heatmap).all()
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_gradients_are_not_none_and_not_all_zero(reloaded):
    """The gradient model really reaches the logits: some class gets a non-empty map."""
    model = reloaded["blood"]
    explainer = explainer_for(model)
    image = _image("blood", seed=3)
    maps = [explainer.raw(image, c) for c in range(8)]
    assert all(m.ndim == 2 for m in maps)
    assert any(float(m.max()) > 0.0 for m in maps)
    # normalised maps reach exactly 1 where they are non-empty
    assert any(np.isclose(explainer(image, c).max(), 1.0) for c in range(8))


def test_explainer_is_built_once_per_model(reloaded):
    model = reloaded["breast"]
    first = explainer_for(model)
    assert explainer_for(model) is first
    assert explainer_for(reloaded["blood"]) is not first


def test_target_is_the_feature_map_before_pooling(reloaded):
    model = reloaded["blood"]
    tensor, name = target_tensor(model)
    assert tensor is model.get_layer("pool").input
    assert len(tensor.shape) == 4 and min(tensor.shape[1:3]) >= 4
    assert "'pool'" in name


@pytest.mark.slow
def test_fallback_when_the_last_feature_map_is_tiny(tmp_path):
    # four stages: 28 -> 14 -> 7 -> 3 px; Grad-CAM should explain a map with some spatial extent
    model = load_model(_tiny_h5(tmp_path, "breast", widths=(4, 4, 4, 4)))
    tensor, _ = target_tensor(model)
    assert min(tensor.shape[1:3]) >= 4
    heatmap = GradCAM(model).warm_up()(_image("breast"), 0)
    assert heatmap.shape == (28, 28)


@pytest.mark.slow
def test_ensemble_sums_the_members_maps(tmp_path):
    from medclassify import models

    members = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        members.append(load_model(_tiny_h5(tmp_path / str(i), "blood", train=True)))
    path = tmp_path / "ensemble.h5"
    models.build_ensemble(members).save(path)
    ensemble = load_model(path)
    explainer = GradCAM(ensemble)
    assert len(explainer.target_names) == 2
    heatmap = explainer(_image("blood"), 2)
    assert heatmap.shape == (28, 28) and 0.0 <= heatmap.min() <= heatmap.max() <= 1.0


def test_grayscale_image_without_channel_axis(reloaded):
    heatmap = gradcam(reloaded["breast"], _image("breast")[..., 0], 1)
    assert heatmap.shape == (28, 28)


def test_wrong_shape_is_refused(reloaded):
    with pytest.raises(ValueError):
        gradcam(reloaded["breast"], np.zeros((32, 32, 1), np.uint8), 0)


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_gradcam_on_shipped_models(task):
    from medclassify.inference import get_predictor

    predictor = get_predictor(task)
    heatmap = explainer_for(predictor.model)(_image(task), 0)
    assert heatmap.shape == (28, 28)
    assert 0.0 <= heatmap.min() <= heatmap.max() <= 1.0


def test_overlay_blends_with_opacity():
    image = np.full((28, 28, 3), 100, np.uint8)
    heat = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    only_image = overlay(image, heat, 0.0)
    assert only_image.dtype == np.uint8 and only_image.shape == (28, 28, 3)
    assert (only_image == 100).all()
    only_heat = overlay(image, heat, 1.0)
    assert not (only_heat == 100).all()
    half = overlay(image, heat, 0.5).astype(int)
    assert np.abs(half - (only_image.astype(int) + only_heat.astype(int)) / 2).max() <= 1


def test_colour_key_runs_from_the_lowest_to_the_highest_heat_colour():
    picture = np.full((196, 196, 3), 7, np.uint8)
    keyed = with_colour_key(picture, height=10, gap=4)
    assert keyed.shape == (210, 196, 3) and keyed.dtype == np.uint8
    assert (keyed[:196] == picture).all() and (keyed[196:200] == 255).all()
    key = keyed[200:]
    assert (key == key[0]).all()  # every row of the strip is the same scale
    assert (key[0, 0] == colormap(np.zeros((1, 1)))[0, 0]).all()
    assert (key[0, -1] == colormap(np.ones((1, 1)))[0, 0]).all()


def test_overlay_grayscale_and_display_size():
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    heat = np.zeros((28, 28), np.float32)
    big = overlay(image, heat, 0.3, size=196)
    assert big.shape == (196, 196, 3) and big.dtype == np.uint8
    # nearest-neighbour enlargement keeps model pixels as 7x7 blocks
    assert (overlay(image, heat, 0.0, size=196)[:7, :7] == image[0, 0, 0]).all()
    # out-of-range opacity is clipped, never an error
    assert overlay(image, heat, 5.0).shape == (28, 28, 3)


def test_gradcam_explains_the_requested_class_not_the_top_one(tmp_path):
    """Every class's map equals a Grad-CAM written out with ``tf.GradientTape`` for that class's logit; the
    maps of the top class and the others differ, so a heatmap of the top logit for every request would fail."""
    import tensorflow as tf

    model = load_model(_tiny_h5(tmp_path, "blood", train=True))
    image = _image("blood", seed=5)
    x = tf.constant(image[None].astype(np.float32))
    grad_model = keras.Model(model.inputs, [model.get_layer("pool").input, model.get_layer("logits").output])

    def reference(class_index: int) -> np.ndarray:
        with tf.GradientTape() as tape:
            maps, logits = grad_model(x, training=False)
            score = logits[0, class_index]
        weights = tf.reduce_mean(tape.gradient(score, maps), axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(maps * weights[:, None, None, :], axis=-1))
        return tf.image.resize(cam[..., None], (28, 28), method="bilinear")[0, ..., 0].numpy()

    top = int(np.argmax(model(x, training=False)[0]))
    explainer = GradCAM(model)
    maps = {c: reference(c) for c in range(8)}
    for c in range(8):
        np.testing.assert_allclose(explainer.raw(image, c), maps[c], rtol=1e-4, atol=1e-6, err_msg=f"class {c}")
    assert any(not np.allclose(maps[c], maps[top], rtol=1e-3, atol=1e-6) for c in range(8) if c != top)
