"""The int8 serving copy (``medclassify.quantization``) and how ``Predictor`` picks it up."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medclassify import quantization
from medclassify.cards import card_path, read_card
from medclassify.cli import main
from medclassify.inference import Predictor
from medclassify.models import build_cnn, build_ensemble, load_model
from medclassify.ood import ood_path
from medclassify.registry import get_task


def _copy_model(source, folder):
    """The tiny model with its card and OOD statistics in a folder of its own (quantize writes beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    for path, out in ((source, target), (card_path(source), card_path(target)), (ood_path(source), ood_path(target))):
        shutil.copyfile(path, out)
    return target


def _pixels(task: str, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *get_task(task).input_shape)).astype(np.uint8)


@pytest.fixture
def quantized(tiny_models, fixture_data_dir, tmp_path, monkeypatch):
    """A copy of the tiny blood model with its int8 serving copy (any number of changed decisions accepted:
    the tiny model is close to random, so many of its decisions sit on a boundary)."""
    monkeypatch.setattr(quantization, "allowed_changes", lambda n: n)
    path = _copy_model(tiny_models["blood"].path, tmp_path / "model")
    section = quantization.quantize("blood", path, str(fixture_data_dir))
    return path, section


def test_allowed_changes_is_one_percent_but_at_least_one():
    assert quantization.allowed_changes(78) == 1  # BreastMNIST validation
    assert quantization.allowed_changes(1712) == 17  # BloodMNIST validation
    assert quantization.allowed_changes(0) == 1


@pytest.mark.parametrize("members", [1, 2])
def test_backbone_and_head_reproduce_the_model(members):
    """Cutting at the pooled features loses nothing, for a single CNN and for an ensemble."""
    models = [build_cnn("blood", augment=False, widths=(4, 8), name=f"m{i}") for i in range(members)]
    model = models[0] if members == 1 else build_ensemble(models)
    backbone, head = quantization.split_at_features(model)
    x = _pixels("blood", 5).astype(np.float32)
    features = backbone(x, training=False)
    assert features.shape == (5, 8 * members)
    np.testing.assert_allclose(head(features, training=False), model(x, training=False), rtol=1e-5, atol=1e-6)


def test_quantize_writes_the_copy_and_its_comparison(quantized):
    path, section = quantized
    card = read_card(path)
    assert card["serving"] == json.loads(json.dumps(section))
    for key in ("file", "head_file"):
        blob = (path.parent / section[key]).read_bytes()
        assert len(blob) == section[key.replace("file", "bytes")] > 0
    assert section["calibration"]["split"] == "train"  # activation ranges never come from val or test
    for split in ("val", "test"):
        part = section[split]
        assert part["n"] > 0 and 0 <= part["decisions_changed"] <= part["n"]
        assert part["decision_agreement"] == pytest.approx(1 - part["decisions_changed"] / part["n"])
        assert 0.0 <= part["int8_metrics"]["accuracy"] <= 1.0


def test_predictor_serves_the_copy_for_single_images_and_batches(quantized):
    path, _ = quantized
    predictor = Predictor("blood", path)
    assert predictor.precision == "int8" and predictor.single_runtime == "tflite-int8"
    x = _pixels("blood", 6, seed=3)
    probs, feats = predictor.predict_arrays(x)
    assert probs.shape == (6, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # the float head: not int8-rounded
    assert not np.allclose(probs * 256, np.round(probs * 256))  # not rounded to 1/256 steps
    single, single_feats = predictor.predict_arrays(x[2])
    np.testing.assert_allclose(single[0], probs[2], rtol=1e-5, atol=1e-6)  # one image = its row of a batch
    np.testing.assert_allclose(single_feats[0], feats[2], rtol=1e-5, atol=1e-6)
    float_probs = load_model(path)(x.astype(np.float32), training=False).numpy()
    assert np.abs(probs - float_probs).max() < 0.1  # close to the float model, not equal
    empty_probs, empty_feats = predictor.predict_arrays(np.zeros((0, 28, 28, 3), np.uint8))
    assert empty_probs.shape == (0, 8) and empty_feats.shape[0] == 0
    prediction = predictor.predict(x[2])
    np.testing.assert_allclose(list(prediction.probabilities.values()), probs[2], rtol=1e-5, atol=1e-6)


def test_float_is_served_when_asked_or_when_the_files_do_not_match_the_card(quantized, monkeypatch, capsys):
    path, section = quantized
    monkeypatch.setenv(quantization.PRECISION_ENV, "float")
    assert Predictor("blood", path, warm=False).precision == "float"
    monkeypatch.setenv(quantization.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=quantization.PRECISION_ENV):
        Predictor("blood", path, warm=False)
    monkeypatch.delenv(quantization.PRECISION_ENV)
    head = path.parent / section["head_file"]
    head.write_bytes(head.read_bytes() + b"\0")  # a file the card does not vouch for
    predictor = Predictor("blood", path, warm=False)
    assert predictor.precision == "float" and "SHA-256" in capsys.readouterr().err
    head.unlink()
    assert Predictor("blood", path, warm=False).precision == "float"
    assert "not found" in capsys.readouterr().err


def test_a_copy_made_from_another_model_is_not_served(quantized, capsys):
    """The card vouches for the float model the copy was made from: a copy left beside another .h5 (a
    half-finished ship, a model copied over by hand) would answer for a model it is not."""
    path, section = quantized
    assert section["model_file"] == path.name and section["model_sha256"] == quantization.sha256_file(path)
    assert Predictor("blood", path, warm=False).precision == "int8"
    model = load_model(path)
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel, bias + 1.0])  # another model under the same name
    model.save(str(path))
    assert quantization.sha256_file(path) != section["model_sha256"]
    assert Predictor("blood", path, warm=False).precision == "float"
    assert "was made from another tiny_blood.h5" in capsys.readouterr().err


def test_quantize_refuses_a_copy_that_breaks_the_breast_sensitivity_target(tiny_models, fixture_data_dir,
                                                                          tmp_path, monkeypatch):
    """The threshold was chosen for a validation sensitivity; the served copy must keep it."""
    monkeypatch.setattr(quantization, "allowed_changes", lambda n: n)
    path = _copy_model(tiny_models["breast"].path, tmp_path / "model")
    card = read_card(path)
    card["decision"]["threshold"] = 0.01  # the float model (near random) calls every image malignant
    card["training"]["config"]["target_sensitivity"] = 0.9
    card_path(path).write_text(json.dumps(card))
    real_copy = quantization.int8_copy

    def never_malignant(graph, calibration):
        lite = real_copy(graph, calibration)

        class Benign:
            def __call__(self, images):
                probs, features = lite(images)
                return np.tile([0.0, 1.0], (len(probs), 1)).astype(probs.dtype), features

            def __getattr__(self, name):
                return getattr(lite, name)
        return Benign()

    monkeypatch.setattr(quantization, "int8_copy", never_malignant)
    with pytest.raises(ValueError, match="sensitivity to 0.000, under the threshold's target of 0.9"):
        quantization.quantize("breast", path, str(fixture_data_dir))
    assert not quantization.quantized_path(path).exists()


def test_quantize_judges_a_breast_card_without_a_threshold_at_the_registry_default(tiny_models, fixture_data_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    """The copy is compared at the threshold Predictor would serve, and held to no sensitivity target: the
    registry's fallback was chosen for none."""
    path = _copy_model(tiny_models["breast"].path, tmp_path / "model")
    card = read_card(path)
    card["decision"]["threshold"] = None
    card["training"]["config"]["target_sensitivity"] = 0.9
    card_path(path).write_text(json.dumps(card))
    seen = []

    def record(spec, labels, float_probs, int8_probs, threshold, target_sensitivity):
        seen.append((threshold, target_sensitivity))
        return "stop here"

    monkeypatch.setattr(quantization, "refusal", record)
    with pytest.raises(ValueError, match="stop here"):
        quantization.quantize("breast", path, str(fixture_data_dir))
    assert seen == [(get_task("breast").default_threshold, None)]
    assert f"{path.name} has no threshold in its card; deciding at MedMNIST's 0.5" in capsys.readouterr().err


def test_refusal_gives_the_first_rule_the_copy_breaks():
    spec = get_task("breast")  # label 0 = malignant is the positive class; the decision is P(malignant) >= t
    labels = np.array([0] * 10 + [1] * 90)
    float_probs = np.tile([0.6, 0.4], (100, 1))  # every image called malignant at t = 0.5: sensitivity 1
    int8_probs = float_probs.copy()
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, 0.9) is None
    int8_probs[10] = [0.4, 0.6]  # one benign image changes its decision: 1 of 100 is allowed
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, 0.9) is None
    int8_probs[0] = [0.4, 0.6]  # one malignant image too: 2 changes, over the allowance
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, 0.9) == \
        "int8 changes 2 of 100 validation decisions (at most 1 allowed)"
    int8_probs[10] = [0.6, 0.4]  # one change, but sensitivity 0.9 -> keep a target of 0.95
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, 0.9) is None
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, 0.95) == \
        "int8 brings the validation sensitivity to 0.900, under the threshold's target of 0.95"
    assert quantization.refusal(spec, labels, float_probs, int8_probs, 0.5, None) is None  # no target: no rule
    # a target the float model misses too is not the copy's fault
    assert quantization.refusal(spec, labels, int8_probs, int8_probs, 0.5, 0.95) is None


def test_a_thread_count_typo_does_not_switch_the_served_model(monkeypatch, capsys):
    monkeypatch.setenv(quantization.LITE_THREADS_ENV, "auto")
    assert quantization.lite_threads() >= 1
    assert "ignoring" in capsys.readouterr().err
    monkeypatch.setenv(quantization.LITE_THREADS_ENV, "3")
    assert quantization.lite_threads() == 3


def test_quantize_refuses_a_copy_that_changes_too_many_decisions(tiny_models, fixture_data_dir, tmp_path,
                                                                monkeypatch):
    path = _copy_model(tiny_models["breast"].path, tmp_path / "model")
    before = card_path(path).read_text()
    monkeypatch.setattr(quantization, "allowed_changes", lambda n: -1)  # no copy can pass
    with pytest.raises(ValueError, match="validation decisions"):
        quantization.quantize("breast", path, str(fixture_data_dir))
    assert card_path(path).read_text() == before
    assert not quantization.quantized_path(path).exists() and not quantization.head_path(path).exists()
    assert Predictor("breast", path, warm=False).precision == "float"


def test_quantize_command_refits_the_ood_statistics(tiny_models, fixture_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantization, "refusal", lambda *args: None)  # the tiny model's copy may change anything
    path = _copy_model(tiny_models["breast"].path, tmp_path / "model")
    stats_before = np.load(ood_path(path))["means"]
    code = main(["quantize", "--task", "breast", "--model", str(path), "--data-dir", str(fixture_data_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    section = json.loads(out.strip().splitlines()[-1])
    assert section["command"].startswith("python -m medclassify quantize --task breast")
    assert read_card(path)["serving"]["sha256"] == section["sha256"]
    # the statistics now come from the int8 features that are served
    assert not np.array_equal(np.load(ood_path(path))["means"], stats_before)

    monkeypatch.setattr(quantization, "refusal", lambda *args: "int8 changes 9 of 8 validation decisions")
    assert main(["quantize", "--task", "breast", "--model", str(path), "--data-dir", str(fixture_data_dir)]) == 1
    assert capsys.readouterr().err == "error: int8 changes 9 of 8 validation decisions; keeping the float model\n"


def test_int8_calibration_images_come_from_the_training_split(tiny_models, fixture_data_dir, tmp_path, monkeypatch):
    """The card says the activation ranges were calibrated on "train": the images ``int8_copy`` gets are
    training images (validation decides whether the copy is kept, so it must not have shaped it)."""
    from medclassify.data import load_split

    path = _copy_model(tiny_models["blood"].path, tmp_path / "model")
    seen = []

    class Stop(Exception):
        pass

    def record(graph, calibration):
        seen.append(np.asarray(calibration).copy())
        raise Stop

    monkeypatch.setattr(quantization, "int8_copy", record)
    with pytest.raises(Stop):
        quantization.quantize("blood", path, str(fixture_data_dir), calibration_images=20)
    train = load_split("blood", "train", data_dir=fixture_data_dir)
    val = load_split("blood", "val", data_dir=fixture_data_dir)
    train_rows = {image.tobytes() for image in train.images}
    val_rows = {image.tobytes() for image in val.images}
    calibration = seen[0]
    assert len(calibration) == min(20, len(train.images))
    assert all(image.tobytes() in train_rows for image in calibration)
    assert not any(image.tobytes() in val_rows for image in calibration)
    assert len({image.tobytes() for image in calibration}) == len(calibration)  # drawn without replacement
