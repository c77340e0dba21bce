"""Model builders: layer names, saving, inference-time behaviour and temperature."""
from __future__ import annotations

import numpy as np
import pytest

from medclassify.models import (
    augmentation_layers,
    build_cnn,
    build_model,
    build_vgg16,
    inference_model,
    last_conv_layer,
    load_model,
    model_temperature,
    set_base_trainable,
    with_temperature,
)
from medclassify.registry import get_task

TASK_NAMES = ("blood", "breast")
SMALL = (8, 16, 16)
HEAD_LAYERS = ("logits", "temperature", "probabilities")  # the last three layers; "pool" (features) comes before


def batch(task: str, n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *get_task(task).input_shape)).astype(np.float32)


def run(model, x, training=False) -> np.ndarray:
    return np.asarray(model(x, training=training))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_cnn_layer_names_and_shapes(task):
    spec = get_task(task)
    model = build_cnn(task, widths=SMALL)
    names = [layer.name for layer in model.layers]
    assert names[0] == "image"
    assert model.input_shape == (None, *spec.input_shape)
    assert model.output_shape == (None, spec.num_classes)
    assert names[-3:] == list(HEAD_LAYERS)
    assert names[-5:-3] == ["pool", "head_dropout"]
    assert "rescale" in names
    for stage in (1, 2, 3):
        for suffix in ("a_conv", "a_bn", "a_relu", "b_conv", "b_bn", "_proj", "_add", "_out"):
            assert f"stage{stage}{suffix}" in names
    assert "stage1_pool" not in names and "stage2_pool" in names and "stage3_pool" in names
    assert {"aug_flip", "aug_rotate", "aug_translate", "aug_zoom", "aug_contrast"} <= set(names)
    assert "head_dropout" in names
    assert model.get_layer("pool").output.shape[-1] == SMALL[-1]
    assert model.name == f"{task}_cnn"
    assert model_temperature(model) == pytest.approx(1.0)


def test_cnn_options():
    model = build_cnn("breast", augment=False, widths=(4, 8), dropout=0.0, name="custom")
    names = {layer.name for layer in model.layers}
    assert not any(name.startswith("aug_") for name in names)
    assert "head_dropout" not in names
    assert "stage3a_conv" not in names
    assert model.name == "custom"


def test_augmentations_respect_the_modality():
    blood = {layer.name: layer for layer in augmentation_layers(get_task("blood"))}
    breast = {layer.name: layer for layer in augmentation_layers(get_task("breast"))}
    assert blood["aug_flip"].mode == "horizontal_and_vertical"
    assert breast["aug_flip"].mode == "horizontal"  # ultrasound has a top: no vertical flip
    assert abs(breast["aug_rotate"].factor[1]) < abs(blood["aug_rotate"].factor[1])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_flips_policy_never_interpolates(task):
    """``flips`` (the shipped blood recipe) only mirrors and shifts by whole pixels: every augmented pixel is
    one of the image's own values, where the default policy's rotations and zooms blend neighbours."""
    spec = get_task(task)
    layers = {layer.name: layer for layer in augmentation_layers(spec, "flips")}
    assert set(layers) == {"aug_flip", "aug_translate"}
    assert layers["aug_flip"].mode == ("horizontal_and_vertical" if task == "blood" else "horizontal")
    image = batch(task, n=4, seed=3).astype("float32")
    blended = 0
    for seed in range(5):
        out = image
        for layer in layers.values():
            out = layer(out, training=True)
        out = np.asarray(out)
        for original, augmented in zip(image, out):
            assert set(np.unique(augmented)) <= set(np.unique(original))
        default = image
        for layer in augmentation_layers(spec, "default"):
            default = layer(default, training=True)
        blended += int(not set(np.unique(np.asarray(default))) <= set(np.unique(image)))
    assert blended  # the check can fail: the default policy does create new values
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        augmentation_layers(spec, "cutout")


def _roughness(images: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours: what a low-pass round trip lowers."""
    return float(np.abs(np.diff(images, axis=2)).mean())


@pytest.mark.parametrize("task", TASK_NAMES)
def test_resample_policy_softens_some_batches_and_nothing_at_inference(task):
    """``resample`` (breast's cnn_resample): a resize round trip for about half the batches, i.e. a
    low-pass filter that keeps the range and the mean; off at inference; left out of the saved model."""
    from medclassify.models import RESAMPLE_MIN_SCALE

    spec = get_task(task)
    (layer,) = augmentation_layers(spec, "resample")
    assert layer.name == "aug_resample" and layer.min_scale == RESAMPLE_MIN_SCALE
    layer = type(layer).from_config({**layer.get_config(), "seed": 7})  # seeded: the coin count below is fixed
    image = batch(task, n=4, seed=5)
    assert np.array_equal(np.asarray(layer(image, training=False)), image)
    softened = untouched = 0
    for _ in range(16):
        out = np.asarray(layer(image, training=True))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
        if np.array_equal(out, image):
            untouched += 1
            continue
        softened += 1
        assert _roughness(out) < 0.8 * _roughness(image)  # noise loses most of its pixel-to-pixel detail
        assert abs(out.mean() - image.mean()) < 8  # area averaging and bicubic keep the brightness
    assert softened and untouched  # a coin per batch
    flat = np.full_like(image, 97.0)
    assert np.allclose(np.asarray(layer(flat, training=True)), 97.0, atol=1e-3)
    clone = type(layer).from_config(layer.get_config())
    assert clone.min_scale == layer.min_scale
    model = build_cnn(spec, augment=True, augmentation="resample", widths=(4,))
    assert "aug_resample" in [l.name for l in model.layers]
    assert "aug_resample" not in [l.name for l in inference_model(model).layers]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_flips_resample_policy_is_flips_then_the_round_trip(task):
    """``flips_resample`` (blood's cnn_flips_resample_wide): the lossless ``flips`` layers, then the resample."""
    spec = get_task(task)
    flips = [layer.get_config() for layer in augmentation_layers(spec, "flips")]
    *lossless, resample = augmentation_layers(spec, "flips_resample")
    assert [layer.get_config() for layer in lossless] == flips and resample.name == "aug_resample"
    model = build_cnn(spec, augment=True, augmentation="flips_resample", widths=(4,))
    assert {"aug_flip", "aug_translate", "aug_resample"} <= {layer.name for layer in model.layers}
    assert not [layer.name for layer in inference_model(model).layers if layer.name.startswith("aug_")]


def test_build_model_dispatch():
    assert build_model("cnn", "blood", widths=(4,)).name == "blood_cnn"
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("resnet", "blood")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_outputs_are_probabilities(task):
    model = build_cnn(task, widths=SMALL)
    probs = run(model, batch(task))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_augmentation_is_inactive_at_inference(task):
    model = build_cnn(task, widths=SMALL)
    x = batch(task, seed=1)
    first, second = run(model, x), run(model, x)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.asarray(model.predict(x, verbose=0)), first)
    # ...while training=True does randomise (augmentation + dropout): the layers are really there.
    assert not np.allclose(run(model, x, training=True), run(model, x, training=True))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_h5_round_trip_preserves_predictions(task, tmp_path):
    model = with_temperature(build_cnn(task, widths=SMALL), 1.7)
    x = batch(task, seed=2)
    expected = run(model, x)
    path = tmp_path / f"model_{task}.h5"
    model.save(str(path))
    loaded = load_model(path)
    np.testing.assert_allclose(run(loaded, x), expected, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in loaded.layers][-3:] == list(HEAD_LAYERS)
    assert model_temperature(loaded) == pytest.approx(1.7)
    assert last_conv_layer(loaded).name == last_conv_layer(model).name
    # What training saves is the inference model: reloaded, it answers a bare call (no ``training=False``, as
    # a user's own script would call it) without augmenting, the same twice and the same as the model's.
    # (A model that kept its augmentation layers randomises a bare call: Keras's preprocessing layers default
    # to training=True.)
    inference_model(model).save(str(tmp_path / f"served_{task}.h5"))
    served = load_model(tmp_path / f"served_{task}.h5")
    bare = np.asarray(served(x))
    np.testing.assert_array_equal(np.asarray(served(x)), bare)
    np.testing.assert_allclose(bare, expected, rtol=1e-5, atol=1e-6)


def test_last_conv_layer_is_a_convolution():
    import keras

    for widths in (SMALL, (4, 8)):
        layer = last_conv_layer(build_cnn("blood", widths=widths))
        assert isinstance(layer, keras.layers.Conv2D)
        assert layer.name.startswith(f"stage{len(widths)}")
        assert layer.output.shape[1:3] == (28 // 2 ** (len(widths) - 1),) * 2


def test_last_conv_layer_is_the_main_path_convolution():
    for widths in (SMALL, (4, 8)):
        assert last_conv_layer(build_cnn("blood", widths=widths)).name == f"stage{len(widths)}b_conv"


def test_bare_call_of_a_fresh_model_augments():
    """Keras 3's random augmentation layers default to training=True: callers must pass training=False."""
    model = build_cnn("blood", widths=SMALL, dropout=0.0)
    x = batch("blood", seed=4)
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x)))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_bare_call_of_a_saved_model_equals_inference(tiny_models, task):
    """Trained models are saved without live augmentation, so even a bare model(x) call gives the inference output."""
    import keras

    model = load_model(tiny_models[task].path)
    x = batch(task, seed=4)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(np.asarray(model(x)), run(model, x))
    for layer in model.layers:
        if layer.name.startswith("aug_"):
            assert isinstance(layer, keras.layers.Identity), layer.name


def test_with_temperature_changes_probabilities_not_argmax():
    model = build_cnn("blood", augment=False, widths=SMALL)
    x = batch("blood", n=16, seed=3)
    logits_model = __import__("keras").Model(model.inputs, model.get_layer("logits").output)
    logits = np.asarray(logits_model(x, training=False))
    base = run(model, x)
    for temperature in (0.25, 0.5, 2.0, 5.0):
        scaled = with_temperature(model, temperature)
        probs = run(scaled, x)
        assert model_temperature(scaled) == pytest.approx(temperature)
        np.testing.assert_array_equal(probs.argmax(1), base.argmax(1))
        assert not np.allclose(probs, base)
        expected = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
        np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
        # T > 1 softens, T < 1 sharpens the top-class confidence
        if temperature > 1:
            assert (probs.max(1) <= base.max(1) + 1e-6).all()
        else:
            assert (probs.max(1) >= base.max(1) - 1e-6).all()
    # shared weights: the calibrated model is the same network
    scaled = with_temperature(model, 2.0)
    assert scaled.get_layer("logits") is model.get_layer("logits")
    # re-scaling replaces (not stacks) the temperature
    assert model_temperature(with_temperature(with_temperature(model, 3.0), 2.0)) == pytest.approx(2.0)


def test_last_conv_layer_without_convolutions():
    import keras

    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, keras.layers.Flatten()(inputs), name="flat")
    with pytest.raises(ValueError, match="no convolution"):
        last_conv_layer(model)
    assert model_temperature(model) == 1.0


# --------------------------------------------------------------------------- VGG16 (needs the ImageNet weights)

@pytest.fixture(scope="module")
def vgg_models(vgg16_weights):
    return {task: build_vgg16(task, weights=str(vgg16_weights)) for task in TASK_NAMES}


@pytest.mark.realdata(needs=("weights",))
@pytest.mark.parametrize("task", TASK_NAMES)
def test_vgg16_layers(vgg_models, task):
    model = vgg_models[task]
    spec = get_task(task)
    names = [layer.name for layer in model.layers]
    assert model.input_shape == (None, *spec.input_shape)
    assert model.output_shape == (None, spec.num_classes)
    assert names[-3:] == list(HEAD_LAYERS)
    assert "pool" in names
    assert {"upsample", "vgg_preprocess", "block1_conv1", "block5_conv3", "block5_pool"} <= set(names)
    assert last_conv_layer(model).name == "block5_conv3"  # inlined, so Grad-CAM can reach it
    assert not model.get_layer("vgg_preprocess").trainable
    assert not model.get_layer("block1_conv1").trainable  # frozen base by default
    x = batch(task, n=3)
    # training=False turns augmentation and dropout off (they are there: training=True randomises), and the
    # inference model training saves (augmentation dropped) gives the same answers
    np.testing.assert_array_equal(run(model, x), run(model, x))
    assert not np.allclose(run(model, x, training=True), run(model, x, training=True))
    served = inference_model(model)
    assert not any(layer.name.startswith("aug_") for layer in served.layers)
    np.testing.assert_allclose(run(served, x), run(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.realdata(needs=("weights",))
@pytest.mark.parametrize("task", TASK_NAMES)
def test_vgg16_caffe_preprocessing(vgg_models, task):
    import keras

    model = vgg_models[task]
    x = batch(task, n=2, seed=5)
    upsampled = np.asarray(keras.Model(model.inputs, model.get_layer("upsample").output)(x, training=False))
    pre = np.asarray(keras.Model(model.inputs, model.get_layer("vgg_preprocess").output)(x, training=False))
    rgb = np.repeat(upsampled, 3, axis=-1) if upsampled.shape[-1] == 1 else upsampled
    expected = keras.applications.vgg16.preprocess_input(rgb.copy())
    np.testing.assert_allclose(pre, expected, atol=1e-3)


@pytest.mark.realdata(needs=("weights",))
def test_vgg16_uses_the_imagenet_weights(vgg16_weights, vgg_models):
    import h5py

    kernel = vgg_models["blood"].get_layer("block1_conv1").get_weights()[0]
    with h5py.File(vgg16_weights, "r") as h5:
        group = h5["block1_conv1"]
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
        reference = np.asarray(group[names[0]])
    np.testing.assert_allclose(kernel, reference)


@pytest.mark.realdata(needs=("weights",))
def test_vgg16_unfreezing(vgg_models):
    model = vgg_models["breast"]
    set_base_trainable(model, True, from_block=4)
    try:
        assert not model.get_layer("block3_conv3").trainable
        assert model.get_layer("block4_conv1").trainable and model.get_layer("block5_conv3").trainable
        assert not model.get_layer("vgg_preprocess").trainable
    finally:
        set_base_trainable(model, False)
    assert not model.get_layer("block5_conv3").trainable


# --------------------------------------------------------------------------- inference models and ensembles

def _logits(model, x):
    import keras

    return np.asarray(keras.Model(model.inputs, model.get_layer("logits").output)(x, training=False))


def test_inference_model_drops_augmentation_and_keeps_predictions():
    from medclassify.models import inference_model

    model = build_cnn("blood", widths=SMALL)
    clone = inference_model(model)
    x = batch("blood", seed=6)
    np.testing.assert_allclose(run(clone, x), run(model, x), rtol=1e-5, atol=1e-6)
    random_layers = [layer.name for layer in clone.layers if type(layer).__name__.startswith("Random")]
    assert random_layers == []
    assert not [layer.name for layer in clone.layers if layer.name.startswith("aug_")]
    # nothing in the saved graph forces training mode on a bare call
    np.testing.assert_allclose(np.asarray(clone(x)), run(clone, x), rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in clone.layers][-3:] == list(HEAD_LAYERS)
    # independent weights: training the original later does not change the clone
    assert clone.get_layer("logits") is not model.get_layer("logits")


def test_ensemble_averages_member_logits(tmp_path):
    from medclassify.models import build_ensemble, feature_tensor, inference_model

    members = [inference_model(build_cnn("breast", widths=(4, 8), name=f"member{i}")) for i in range(2)]
    ensemble = build_ensemble(members, name="pair")
    x = batch("breast", seed=7)
    mean_logits = (_logits(members[0], x) + _logits(members[1], x)) / 2
    np.testing.assert_allclose(_logits(ensemble, x), mean_logits, rtol=1e-5, atol=1e-6)
    expected = np.exp(mean_logits - mean_logits.max(1, keepdims=True))
    np.testing.assert_allclose(run(ensemble, x), expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert feature_tensor(ensemble).shape[-1] == 16  # both members' pooled features side by side
    assert feature_tensor(members[0]).shape[-1] == 8
    assert isinstance(last_conv_layer(ensemble), __import__("keras").layers.Conv2D)
    scaled = with_temperature(ensemble, 2.0)
    path = tmp_path / "ensemble.h5"
    scaled.save(str(path))
    loaded = load_model(path)
    np.testing.assert_allclose(run(loaded, x), run(scaled, x), rtol=1e-5, atol=1e-6)
    assert model_temperature(loaded) == pytest.approx(2.0)


def test_a_one_member_ensemble_is_its_member(tmp_path):
    """It had no layer named 'logits', so temperature fitting and Grad-CAM failed on it."""
    from medclassify.models import build_ensemble, inference_model

    member = inference_model(build_cnn("breast", widths=(4, 8), name="only"))
    single = with_temperature(build_ensemble([member]), 1.5)
    x = batch("breast", seed=3)
    np.testing.assert_allclose(_logits(single, x), _logits(member, x), rtol=1e-5, atol=1e-6)
    path = tmp_path / "single.h5"
    single.save(str(path))
    assert model_temperature(load_model(path)) == pytest.approx(1.5)


def test_vgg16_weights_that_cannot_be_had_are_one_line(tmp_path, monkeypatch):
    """A missing file, a damaged one, or no network for the ImageNet download: DataError, which the CLI
    prints as one line (Keras says 'weights argument should be...' or raises a bare Exception)."""
    import keras

    from medclassify.data import DataError

    with pytest.raises(DataError, match="VGG16 weights file .*nope.h5 not found") as info:
        build_vgg16("breast", weights=str(tmp_path / "nope.h5"))
    assert "\n" not in str(info.value)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="could not be loaded") as info:
        build_vgg16("breast", weights=str(damaged))
    assert "\n" not in str(info.value)

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -3]\nmore")

    monkeypatch.delenv("VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(DataError, match="could not be downloaded .*URL fetch failure.*set VGG16_WEIGHTS") as info:
        build_vgg16("breast")
    assert "\n" not in str(info.value)


@pytest.mark.realdata(needs=("weights",))
def test_vgg16_inference_model_answers_a_bare_call(vgg_models, tmp_path):
    """A saved VGG16 model called without ``training=False`` (a user's own script) must not augment, drop out
    or normalise with batch statistics: the same answer twice, and the answer of ``training=False``, before and
    after the .h5 round trip that training does.  (Keras's Resizing layer defaults to training=True.)"""
    served = inference_model(vgg_models["blood"])
    x = batch("blood", n=3)
    expected = run(served, x)
    served.save(str(tmp_path / "vgg.h5"))
    for model in (served, load_model(tmp_path / "vgg.h5")):
        bare = np.asarray(model(x))
        np.testing.assert_array_equal(np.asarray(model(x)), bare)
        np.testing.assert_allclose(bare, expected, rtol=1e-5, atol=1e-6)
