"""Metrics against sklearn and hand-computed values, the breast operating point, calibration and CIs."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medclassify.evaluation import (
    SCALAR_METRICS,
    auc,
    compute_metrics,
    decide,
    decision_threshold,
    evaluate,
    expected_calibration_error,
    reliability_curve,
    sensitivity_specificity,
    uncalibrate,
)
from medclassify.registry import get_task

BLOOD, BREAST = get_task("blood"), get_task("breast")


def random_case(k: int, n: int = 300, seed: int = 0, skill: float = 2.0):
    """Labels and probabilities that are better than chance (so every metric is non-trivial)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits)
    return labels, probs / probs.sum(1, keepdims=True)


def test_blood_metrics_match_sklearn():
    labels, probs = random_case(8, n=400)
    m = compute_metrics("blood", labels, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    for average in ("macro", "weighted"):
        assert m[f"precision_{average}"] == pytest.approx(precision_score(labels, pred, average=average))
        assert m[f"recall_{average}"] == pytest.approx(recall_score(labels, pred, average=average))
        assert m[f"f1_{average}"] == pytest.approx(f1_score(labels, pred, average=average))
    assert not {"precision", "recall", "f1"} & set(m)  # one key per number (no nested copies of the flat keys)
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=range(8)).tolist()
    assert m["n"] == 400
    assert list(m["per_class"]) == list(BLOOD.class_names)
    per_f1 = f1_score(labels, pred, average=None, labels=range(8))
    for i, name in enumerate(BLOOD.class_names):
        assert m["per_class"][name]["f1"] == pytest.approx(per_f1[i])
        assert m["per_class"][name]["support"] == int((labels == i).sum())
    assert "threshold" not in m and "sensitivity" not in m
    assert set(SCALAR_METRICS) <= set(m)


def test_metrics_accept_column_labels_and_a_spec():
    labels, probs = random_case(8, n=50, seed=1)
    a = compute_metrics("blood", labels, probs)
    b = compute_metrics(BLOOD, labels.reshape(-1, 1).astype(np.uint8), probs.astype(np.float32))
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_absent_predicted_classes_give_zero_not_errors():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    probs = np.full((8, 8), 0.01)
    probs[:, 0] = 0.93  # everything called basophil
    m = compute_metrics("blood", labels, probs)
    assert m["accuracy"] == pytest.approx(1 / 8)
    assert m["per_class"]["platelet"]["precision"] == 0.0


# --------------------------------------------------------------------------- breast

# label 0 = malignant (the positive class); probabilities are [P(malignant), P(normal/benign)]
BREAST_LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 1])
P_MALIGNANT = np.array([0.92, 0.40, 0.12, 0.55, 0.30, 0.20, 0.08, 0.02])
BREAST_PROBS = np.stack([P_MALIGNANT, 1 - P_MALIGNANT], axis=1)


@pytest.mark.parametrize("threshold, sens, spec, acc", [
    (0.5, 1 / 3, 4 / 5, 5 / 8),   # called malignant: 0.92, 0.55 -> TP 1, FP 1, FN 2, TN 4
    (0.25, 2 / 3, 3 / 5, 5 / 8),  # 0.92, 0.40, 0.55, 0.30 -> TP 2, FP 2, FN 1, TN 3
    (0.10, 1.0, 2 / 5, 5 / 8),    # + 0.12, 0.20 -> TP 3, FP 3, TN 2
    (0.40, 2 / 3, 4 / 5, 6 / 8),  # p >= threshold is positive: 0.40 counts
])
def test_breast_threshold_sensitivity_specificity(threshold, sens, spec, acc):
    m = compute_metrics("breast", BREAST_LABELS, BREAST_PROBS, threshold=threshold)
    assert m["threshold"] == threshold
    assert m["sensitivity"] == pytest.approx(sens)
    assert m["specificity"] == pytest.approx(spec)
    assert m["accuracy"] == pytest.approx(acc)
    predictions = np.where(P_MALIGNANT >= threshold, 0, 1)
    assert m["confusion_matrix"] == confusion_matrix(BREAST_LABELS, predictions, labels=[0, 1]).tolist()
    assert m["per_class"]["malignant"]["recall"] == pytest.approx(sens)
    assert m["per_class"]["normal/benign"]["recall"] == pytest.approx(spec)


def test_sensitivity_specificity_read_the_positive_class_from_the_registry():
    spec = get_task("breast")  # label 0 = malignant is the positive class
    labels, predictions = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    assert sensitivity_specificity(spec, labels, predictions) == pytest.approx((1 / 2, 2 / 3))
    assert sensitivity_specificity(spec, 1 - labels, 1 - predictions) == pytest.approx((2 / 3, 1 / 2))
    assert sensitivity_specificity(spec, np.array([1, 1]), np.array([0, 1])) == (0.0, 0.5)  # no malignant image


def test_breast_accuracy_at_0_5_and_auc():
    m = compute_metrics("breast", BREAST_LABELS, BREAST_PROBS, threshold=0.1)
    # MedMNIST's operating point: label 1 when P(label 1) > 0.5, whatever the model's threshold
    assert m["accuracy_at_0_5"] == pytest.approx(5 / 8)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # AUC of the label-1 score (= AUC of P(malignant) for malignant): 11 of 15 (malignant, benign) pairs ordered correctly
    assert m["auc"] == pytest.approx(roc_auc_score(BREAST_LABELS, BREAST_PROBS[:, 1]))
    assert m["auc"] == pytest.approx(roc_auc_score(BREAST_LABELS == 0, P_MALIGNANT))
    assert m["auc"] == pytest.approx(11 / 15)


def test_breast_default_threshold():
    m = compute_metrics("breast", BREAST_LABELS, BREAST_PROBS)
    assert m["threshold"] == BREAST.default_threshold
    np.testing.assert_array_equal(decide(BREAST, BREAST_PROBS), np.where(P_MALIGNANT >= 0.5, 0, 1))


def test_decide():
    probs = np.array([[0.1, 0.7, 0.2] + [0.0] * 5, [0.5, 0.1, 0.4] + [0.0] * 5])
    np.testing.assert_array_equal(decide(BLOOD, probs), [1, 0])
    np.testing.assert_array_equal(decide(BREAST, np.array([[0.3, 0.7], [0.2, 0.8]]), threshold=0.25), [0, 1])


def test_auc_edge_cases():
    assert np.isnan(auc(BLOOD, np.zeros(5, int), np.full((5, 8), 1 / 8)))
    labels = np.array([0, 0, 3, 3])
    probs = np.full((4, 8), 0.1)
    probs[[0, 1], 0] = 0.3
    probs[[2, 3], 3] = 0.3
    assert auc(BLOOD, labels, probs) == pytest.approx(1.0)  # one-vs-rest over the classes present


# --------------------------------------------------------------------------- calibration

def test_ece_hand_computed():
    probs = np.array([[0.95, 0.05], [0.35, 0.65], [0.75, 0.25]])
    labels = np.array([0, 0, 0])  # correct, wrong, correct
    assert expected_calibration_error(labels, probs) == pytest.approx((0.05 + 0.65 + 0.25) / 3)


def test_ece_of_a_calibrated_model_is_small_and_of_an_overconfident_one_large():
    rng = np.random.default_rng(0)
    n = 50_000
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < confidence  # right with exactly the stated probability
    labels = np.where(correct, 0, 1)
    probs = np.stack([confidence, 1 - confidence], axis=1)
    assert expected_calibration_error(labels, probs) < 0.01
    sharpened = np.stack([np.minimum(confidence + 0.2, 0.999), 1 - np.minimum(confidence + 0.2, 0.999)], axis=1)
    assert expected_calibration_error(labels, sharpened) > 0.1


def test_reliability_curve():
    labels, probs = random_case(8, n=500, seed=3)
    curve = reliability_curve(labels, probs)
    assert len(curve["count"]) == 10 and sum(curve["count"]) == 500
    assert curve["bin_lower"][0] == 0.0 and curve["bin_upper"][-1] == 1.0
    for c, lo, hi in zip(curve["confidence"], curve["bin_lower"], curve["bin_upper"]):
        assert c is None or lo - 1e-9 <= c <= hi + 1e-9
    weighted = sum(n * abs(a - c) for n, a, c in zip(curve["count"], curve["accuracy"], curve["confidence"]) if n)
    assert weighted / 500 == pytest.approx(expected_calibration_error(labels, probs))


def test_uncalibrate_inverts_temperature_scaling():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (20, 8))

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    np.testing.assert_allclose(uncalibrate(softmax(logits / 2.5), 2.5), softmax(logits), rtol=1e-6)
    labels = logits.argmax(1)
    m = compute_metrics("blood", labels, softmax(logits / 2.5), temperature=2.5)
    assert m["temperature"] == 2.5
    assert m["ece_uncalibrated"] == pytest.approx(expected_calibration_error(labels, softmax(logits)))


# --------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("task", ["blood", "breast"])
def test_bootstrap_ci_contains_the_point_estimate(task):
    spec = get_task(task)
    labels, probs = random_case(spec.num_classes, n=200, seed=4, skill=1.5)
    m = compute_metrics(task, labels, probs, threshold=0.4 if task == "breast" else None, bootstrap=60)
    assert m["bootstrap_resamples"] == 60
    expected_keys = set(SCALAR_METRICS) | ({"sensitivity", "specificity", "accuracy_at_0_5"} if task == "breast" else set())
    assert set(m["ci95"]) == expected_keys
    for key, (low, high) in m["ci95"].items():
        assert low <= m[key] <= high, key
        assert high - low < 0.3, key  # n=200: the intervals are informative
    from medclassify.evaluation import bootstrap_ci

    small = [bootstrap_ci(spec, labels[:60], probs[:60], None, resamples=10, seed=7) for _ in range(2)]
    assert small[0] == small[1]  # seeded


def test_bootstrap_leaves_out_resamples_without_a_class():
    """A perfect classifier with one malignant case in ten: every resample that holds it catches it. The ones
    without it have no sensitivity (as they have no AUC); counted as 0, they gave the interval [0, 1]."""
    spec = get_task("breast")
    labels = np.array([0] + [1] * 9)  # label 0 = malignant
    probs = np.column_stack([1.0 - labels, labels]).astype(float)  # P(malignant) 1 for it, 0 for the rest
    m = compute_metrics(spec, labels, probs, threshold=0.5, bootstrap=200, seed=1)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert m["ci95"]["sensitivity"] == [1.0, 1.0] and m["ci95"]["auc"] == [1.0, 1.0]
    # the point estimate of a split without a class stays 0, as sklearn's recall with zero_division=0
    assert sensitivity_specificity(spec, labels[1:], labels[1:]) == (0.0, 1.0)
    # a split with no malignant case at all: no interval for sensitivity (NaN would be invalid JSON in a card)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "All-NaN slice" must not arise either
        warnings.filterwarnings("ignore", category=UserWarning)  # sklearn: one class in the split
        benign = compute_metrics(spec, labels[1:], probs[1:], threshold=0.5, bootstrap=20)
    assert "sensitivity" not in benign["ci95"] and benign["ci95"]["specificity"] == [1.0, 1.0]


def test_no_bootstrap_by_default():
    labels, probs = random_case(8, n=40)
    assert "ci95" not in compute_metrics("blood", labels, probs)


# --------------------------------------------------------------------------- evaluate() on a saved model

@pytest.mark.parametrize("task", ["blood", "breast"])
def test_evaluate_saved_model(tiny_models, fixture_data_dir, task):
    tiny = tiny_models[task]
    m = evaluate(task, tiny.path, "test", fixture_data_dir, bootstrap=20)
    assert m["task"] == task and m["split"] == "test" and m["model"] == str(tiny.path)
    assert m["n"] == (96 if task == "blood" else 10)
    assert sum(m["reliability"]["count"]) == m["n"]
    assert m["temperature"] == pytest.approx(tiny.result.temperature, rel=1e-5)
    assert "ci95" in m
    if task == "breast":
        assert m["threshold"] == pytest.approx(tiny.result.threshold)  # from the card, not 0.5
    val = evaluate(task, tiny.path, "val", fixture_data_dir)
    assert val["n"] == (96 if task == "blood" else 10)


def test_decision_threshold_is_the_cards_else_the_registrys_and_says_so(capsys):
    assert decision_threshold({"decision": {"threshold": 0.18}}, BREAST, "m.h5") == 0.18
    assert decision_threshold({"decision": {"threshold": None}}, BLOOD, "m.h5") is None  # argmax: no threshold
    assert decision_threshold({}, BLOOD, "m.h5") is None
    assert capsys.readouterr().err == ""
    for card in ({}, None, {"decision": {"threshold": None}}):
        assert decision_threshold(card, BREAST, "m.h5") == BREAST.default_threshold
        err = capsys.readouterr().err
        assert err.count("\n") == 1  # once per read
        assert f"m.h5 has no threshold in its card; deciding at MedMNIST's {BREAST.default_threshold}" in err


def test_evaluate_decides_at_the_registry_default_when_the_card_has_no_threshold(tiny_models, fixture_data_dir,
                                                                                 tmp_path, monkeypatch, capsys):
    """Like Predictor, export and quantize: the registry's default, with the same warning."""
    import dataclasses
    import shutil

    from medclassify import registry
    from medclassify.models import load_model

    model = tmp_path / "model_breast.h5"
    shutil.copyfile(tiny_models["breast"].path, model)  # no card beside it
    # a default other than 0.5 shows where the number comes from
    monkeypatch.setitem(registry.TASKS, "breast", dataclasses.replace(registry.TASKS["breast"], default_threshold=0.4))
    m = evaluate("breast", model, "val", fixture_data_dir)
    assert "model_breast.h5 has no threshold in its card; deciding at MedMNIST's 0.4" in capsys.readouterr().err
    assert m["threshold"] == 0.4
    from medclassify.data import load_split
    from medclassify.evaluation import predict_split

    data = load_split("breast", "val", data_dir=fixture_data_dir)
    probs = predict_split(load_model(model, get_task("breast")), data.images)
    expected = np.where(probs[:, 0] >= 0.4, 0, 1)
    assert m["confusion_matrix"] == confusion_matrix(data.labels, expected, labels=[0, 1]).tolist()


def _separable_at(threshold: float, n: int = 120, seed: int = 0):
    """Breast labels and probabilities that ``threshold`` separates perfectly and 0.5 does not: every P(malignant)
    sits on the same side of 0.5, malignant cases above ``threshold`` and benign ones below it."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))  # label 0 = malignant
    if threshold > 0.5:
        p = np.where(labels == 0, rng.uniform(threshold + 0.02, 0.99, n), rng.uniform(0.51, threshold - 0.02, n))
    else:
        p = np.where(labels == 0, rng.uniform(threshold + 0.02, 0.49, n), rng.uniform(0.01, threshold - 0.02, n))
    return labels, np.column_stack([p, 1.0 - p])


@pytest.mark.parametrize("threshold", [0.2, 0.8])
def test_bootstrap_decides_at_the_given_threshold(threshold):
    """The intervals describe the card's operating point, not 0.5: at a threshold that separates the classes
    perfectly, every resample has sensitivity, specificity and accuracy 1 (at 0.5, one of them would be 0)."""
    from medclassify.evaluation import bootstrap_ci

    labels, probs = _separable_at(threshold)
    assert compute_metrics(BREAST, labels, probs, threshold=0.5)["accuracy"] == 0.5  # the control: 0.5 fails
    m = compute_metrics(BREAST, labels, probs, threshold=threshold, bootstrap=50, seed=3)
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == 1.0
    for key in ("sensitivity", "specificity", "accuracy", "balanced_accuracy", "f1_macro"):
        assert m["ci95"][key] == [1.0, 1.0], key
    assert bootstrap_ci(BREAST, labels, probs, threshold, resamples=50, seed=3)["accuracy"] == [1.0, 1.0]


def test_bootstrap_intervals_are_95_percent_wide():
    """A 95% interval of a proportion is about 2 x 1.96 binomial standard errors wide (a 50% one, 25th to 75th
    percentile, would be 2 x 0.67: a third of that; 10th to 90th, two thirds)."""
    rng = np.random.default_rng(11)
    n = 400
    labels = rng.integers(0, 2, n)
    # noisy scores: accuracy, sensitivity and specificity all well inside (0, 1)
    p_malignant = np.clip(np.where(labels == 0, 0.6, 0.4) + rng.normal(0, 0.25, n), 0.001, 0.999)
    probs = np.column_stack([p_malignant, 1.0 - p_malignant])
    m = compute_metrics(BREAST, labels, probs, threshold=0.5, bootstrap=250, seed=0)
    counts = {"accuracy": n, "sensitivity": int((labels == 0).sum()), "specificity": int((labels == 1).sum())}
    for key, count in counts.items():
        p = m[key]
        assert 0.6 < p < 0.9, (key, p)
        expected = 2 * 1.96 * np.sqrt(p * (1 - p) / count)
        low, high = m["ci95"][key]
        assert 0.75 * expected < high - low < 1.25 * expected, (key, high - low, expected)  # a 50% one is 0.34
        assert low < p < high
    # and exactly the 2.5th and 97.5th percentiles (a 90% interval would pass the width bounds): the accuracy
    # of the same resamples, drawn here with the same seed
    rng = np.random.default_rng(0)
    correct = (np.where(p_malignant >= 0.5, 0, 1) == labels).astype(float)
    accuracies = [correct[rng.integers(0, n, n)].mean() for _ in range(250)]
    assert m["ci95"]["accuracy"] == pytest.approx(np.percentile(accuracies, [2.5, 97.5]).tolist())
