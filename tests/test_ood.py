"""Out-of-distribution rules: modality, blank images and the Mahalanobis feature distance."""
from __future__ import annotations

import numpy as np
import pytest

from medclassify.ood import (
    BLANK_MAX_STD,
    GRAYSCALE_MAX_COLOURFULNESS,
    OODDetector,
    ood_path,
)
from medclassify.preprocessing import prepare
from medclassify.registry import get_task

BLOOD, BREAST = get_task("blood"), get_task("breast")


def test_ood_path(tmp_path):
    assert ood_path(tmp_path / "model_blood.h5") == tmp_path / "model_blood.ood.npz"


def test_distances_match_a_direct_computation():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (3, 4))
    a = rng.normal(0, 1, (4, 4))
    precision = a @ a.T + np.eye(4)
    detector = OODDetector(BLOOD, means, precision, threshold=10.0)
    features = rng.normal(0, 2, (5, 4))
    expected = [min(float((f - m) @ precision @ (f - m)) for m in means) for f in features]
    np.testing.assert_allclose(detector.distances(features), expected, rtol=1e-10)
    np.testing.assert_allclose(detector.distances(features[0]), expected[:1])  # one row is fine too
    np.testing.assert_allclose(detector.distances(means), 0.0, atol=1e-12)


def _prepared(array, task):
    return prepare(np.asarray(array, dtype=np.uint8), task)


def colourful(seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((28, 28, 3), np.uint8)
    image[..., 0] = rng.integers(150, 256, (28, 28))
    image[..., 1] = rng.integers(0, 80, (28, 28))
    image[..., 2] = rng.integers(100, 200, (28, 28))
    return image


def grayscale(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def test_modality_rules_without_statistics():
    blood = OODDetector(BLOOD)
    breast = OODDetector(BREAST)
    dummy = np.zeros((1, 4))
    assert not blood.check(_prepared(colourful(), "blood"), None, dummy).flagged
    verdict = blood.check(_prepared(grayscale(), "blood"), None, dummy)
    assert verdict.flagged and "grayscale" in verdict.reasons[0] and verdict.score is None
    assert not breast.check(_prepared(grayscale(), "breast"), None, dummy).flagged
    verdict = breast.check(_prepared(colourful(), "breast"), None, dummy)
    assert verdict.flagged and verdict.reasons[0] == ("colour image: the breast model expects a grayscale breast "
                                                      "ultrasound image")  # named from the spec


def test_blood_min_colourfulness_from_the_card():
    image = _prepared(colourful(), "blood")
    assert image.colourfulness > GRAYSCALE_MAX_COLOURFULNESS
    strict = OODDetector(BLOOD, min_colourfulness=image.colourfulness + 1)
    assert strict.check(image, None, np.zeros((1, 4))).flagged





@pytest.mark.parametrize("task", ["blood", "breast"])
def test_blank_images_are_flagged(task):
    channels = get_task(task).channels
    flat = np.full((28, 28, 3) if channels == 3 else (28, 28), 200, np.uint8)
    if channels == 3:
        flat[..., 1] = 40  # colourful but constant
    verdict = OODDetector(get_task(task)).check(_prepared(flat, task), None, np.zeros((1, 4)))
    assert verdict.flagged
    assert any("blank" in r for r in verdict.reasons)
    array = _prepared(flat, task).array
    assert float(array.reshape(-1, array.shape[-1]).std(axis=0).max()) < BLANK_MAX_STD


def test_blank_gray_image_is_flagged_for_blood():
    flat = np.full((28, 28, 3), 128, np.uint8)
    verdict = OODDetector(BLOOD).check(_prepared(flat, "blood"), None, np.zeros((1, 4)))
    assert any("blank" in r for r in verdict.reasons) and any("grayscale" in r for r in verdict.reasons)


def test_feature_distance_rule():
    means = np.zeros((2, 3))
    detector = OODDetector(BREAST, means, np.eye(3), threshold=4.0)
    image = _prepared(grayscale(), "breast")
    near = detector.check(image, None, np.array([[1.0, 0.0, 0.0]]))
    assert not near.flagged and near.score == pytest.approx(1.0)
    far = detector.check(image, None, np.array([[3.0, 0.0, 0.0]]))
    assert far.flagged and far.score == pytest.approx(9.0)
    assert "distance score 9, 2.2 times the model's limit of 4" in far.reasons[0]  # how far out, not only that
    barely = detector.check(image, None, np.array([[2.05, 0.0, 0.0]]))  # 4.2: "1.1 times" would read as 1.0
    assert "distance score 4, just over the model's limit of 4" in barely.reasons[0]


def test_statistics_fitted_on_other_features_are_reported(tiny_models, tmp_path, capsys):
    """fit-ood under MEDCLASSIFY_SERVING_PRECISION=float, then served by the int8 copy: the flag rates the
    card reports no longer hold, and the operator is told so."""
    import json
    import shutil

    from medclassify.inference import Predictor

    model = tmp_path / "m.h5"
    for suffix in (".h5", ".card.json", ".ood.npz"):
        shutil.copyfile(tiny_models["breast"].path.with_suffix(suffix), model.with_suffix(suffix))
    Predictor("breast", model, warm=False)
    assert "fitted on" not in capsys.readouterr().err  # float features, float model
    card = json.loads(model.with_suffix(".card.json").read_text())
    card["ood"]["features"] = "int8"
    model.with_suffix(".card.json").write_text(json.dumps(card))
    Predictor("breast", model, warm=False)
    err = capsys.readouterr().err
    assert "fitted on int8 features and the float model is serving" in err and "fit-ood --task breast" in err


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_fit_ood_on_a_tiny_model(tiny_models, fixture_data_dir, task):
    from medclassify.cards import read_card
    from medclassify.data import load_split
    from medclassify.inference import Predictor

    spec = get_task(task)
    tiny = tiny_models[task]
    settings = tiny.ood
    assert settings["distance_threshold"] > 0
    assert settings["statistics_file"] == tiny.path.with_suffix(".ood.npz").name
    assert settings["features"] == "float"  # a tiny model has no int8 copy
    assert ("min_colourfulness" in settings) == (spec.channels == 3)
    if spec.channels == 3:
        assert settings["min_colourfulness"] >= GRAYSCALE_MAX_COLOURFULNESS
    assert read_card(tiny.path)["ood"] == settings

    with np.load(ood_path(tiny.path)) as stats:
        feature_dim = stats["means"].shape[1]
        assert stats["means"].shape == (spec.num_classes, feature_dim)
        assert stats["precision"].shape == (feature_dim, feature_dim)

    predictor = Predictor(task, tiny.path, warm=False)
    detector = OODDetector.for_model(spec, tiny.path, predictor.card)
    assert detector.threshold == pytest.approx(settings["distance_threshold"])
    val = load_split(task, "val", data_dir=fixture_data_dir)
    _, features = predictor.predict_arrays(val.images)
    flagged = detector.distances(features) > detector.threshold
    assert flagged.mean() <= 0.05 + 1.0 / len(val.images)  # the 99% quantile of these very distances
    # something wildly unlike the data is flagged
    _, far = predictor.predict_arrays(np.full((1, *spec.input_shape), 255, np.uint8))
    _, noise = predictor.predict_arrays(np.random.default_rng(0).integers(0, 256, (1, *spec.input_shape)))
    assert max(detector.distances(far)[0], detector.distances(noise)[0]) > detector.threshold


def test_for_model_takes_the_image_rules_limits_from_the_card(tmp_path):
    """The card records the limits its rules were fitted with; those, not today's constants, decide."""
    dummy = np.zeros((1, 4))
    flat = _prepared(np.full((28, 28), 120, np.uint8), "breast")
    lenient = OODDetector.for_model(BREAST, tmp_path / "none.h5", {"ood": {"blank_max_std": 0.0}})
    assert not lenient.check(flat, None, dummy).flagged
    coloured = _prepared(colourful(), "breast")
    tolerant = OODDetector.for_model(BREAST, tmp_path / "none.h5", {"ood": {"grayscale_max_colourfulness": 1e6}})
    assert not tolerant.check(coloured, None, dummy).flagged
    # blood without its own min_colourfulness falls back to the card's grayscale limit
    image = _prepared(colourful(), "blood")
    strict = OODDetector.for_model(BLOOD, tmp_path / "none.h5",
                                   {"ood": {"grayscale_max_colourfulness": image.colourfulness + 1}})
    assert strict.check(image, None, dummy).flagged
    # a card from before the limits were recorded (or that records null) gets the constants
    for settings in ({}, {"blank_max_std": None, "grayscale_max_colourfulness": None}):
        detector = OODDetector.for_model(BREAST, tmp_path / "none.h5", {"ood": settings})
        assert (detector.blank_max_std, detector.grayscale_max_colourfulness) == \
            (BLANK_MAX_STD, GRAYSCALE_MAX_COLOURFULNESS)
        assert detector.check(flat, None, dummy).flagged and detector.check(coloured, None, dummy).flagged


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_shipped_cards_hold_the_constants(task):
    """Reading the limits from the card changed nothing for the shipped models."""
    import json

    settings = json.loads(get_task(task).card_path.read_text())["ood"]
    assert settings["blank_max_std"] == BLANK_MAX_STD
    assert settings["grayscale_max_colourfulness"] == GRAYSCALE_MAX_COLOURFULNESS


def test_for_model_without_statistics(tmp_path):
    detector = OODDetector.for_model(BLOOD, tmp_path / "none.h5", {})
    assert detector.means is None and detector.threshold is None
    assert detector.check(_prepared(colourful(), "blood"), None, np.zeros((1, 4))).score is None


@pytest.mark.parametrize("content", [None, b"not an npz"])
def test_a_card_whose_statistics_are_gone_gets_no_answer(tmp_path, capsys, content):
    """The card promises the distance rule; without its statistics every image is withheld, not answered
    unchecked."""
    model = tmp_path / "model_blood.h5"
    if content is not None:
        ood_path(model).write_bytes(content)
    detector = OODDetector.for_model(BLOOD, model, {"ood": {"distance_threshold": 10.0}})
    err = capsys.readouterr().err
    assert "model_blood.ood.npz" in err and "`python -m medclassify fit-ood --task blood`" in err
    verdict = detector.check(_prepared(colourful(), "blood"), None, np.zeros((1, 4)))
    assert verdict.flagged and verdict.score is None
    assert verdict.reasons == [f"the check for images unlike the training data cannot run (model_blood.ood.npz "
                               f"{'is missing' if content is None else 'cannot be read'}): no answer is given"]


def test_flag_counts_leaves_refused_images_out_of_the_share():
    from types import SimpleNamespace

    from medclassify.oodcheck import flag_counts

    class Stub:
        def predict_many(self, images):
            for name, kind in enumerate(images):
                yield name, ("image is too small (14x14)" if kind == "small" else SimpleNamespace(ood=kind == "odd"))

    assert flag_counts(Stub(), ["odd", "fine", "small", "odd", "small"]) == (2 / 3, 3, {"image is too small": 2})
    share, answered, refusals = flag_counts(Stub(), ["small"])
    assert np.isnan(share) and answered == 0 and refusals == {"image is too small": 1}


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_distance_threshold_is_the_quantile_of_the_validation_distances(tiny_models, fixture_data_dir, task):
    """The card's rule, "99% quantile of validation distances", recomputed from the statistics file: the
    statistics come from train, the threshold from validation (the tiny models' train and validation
    quantiles differ by far more than the tolerance, so the split is told apart)."""
    from medclassify.data import load_split
    from medclassify.inference import Predictor
    from medclassify.ood import VALIDATION_QUANTILE

    tiny = tiny_models[task]
    predictor = Predictor(task, tiny.path, warm=False)
    with np.load(ood_path(tiny.path)) as stats:
        means, precision = stats["means"].astype(np.float64), stats["precision"].astype(np.float64)

    def quantile_of_distances(split: str) -> float:
        _, features = predictor.predict_arrays(load_split(task, split, data_dir=fixture_data_dir).images)
        diffs = features.astype(np.float64)[:, None, :] - means[None]
        distances = np.einsum("nkd,de,nke->nk", diffs, precision, diffs).min(axis=1)
        return float(np.quantile(distances, VALIDATION_QUANTILE))

    expected, on_train = quantile_of_distances("val"), quantile_of_distances("train")
    assert tiny.ood["threshold_rule"] == f"{VALIDATION_QUANTILE:.0%} quantile of validation distances"
    assert tiny.ood["distance_threshold"] == pytest.approx(expected, rel=1e-4)
    assert on_train != pytest.approx(expected, rel=1e-2)  # the control: the splits give different thresholds
