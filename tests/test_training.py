"""Training: the 1-epoch smoke runs, SMOTE, temperature scaling and the breast threshold."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medclassify import training
from medclassify.data import Split
from medclassify.models import load_model, model_temperature
from medclassify.registry import get_task
from medclassify.training import (
    InvalidConfig,
    TrainConfig,
    balanced_class_weight,
    choose_threshold,
    config_dict,
    environment,
    fit_temperature,
    smote_oversample,
    train,
)

TASK_NAMES = ("blood", "breast")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- recipe validation

@pytest.mark.parametrize("setting", [
    {"task": "chest"}, {"model": "resnet"}, {"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0},
    {"weight_decay": -1e-4}, {"label_smoothing": 1.0}, {"mixup": -0.4}, {"ema": 1.0}, {"ema": -0.1},
    {"augmentation": "heavy"}, {"widths": ()}, {"widths": (32, 0)}, {"dropout": 1.0}, {"limit": 0},
    {"vgg16_input_size": 28}, {"finetune_epochs": -1}, {"finetune_learning_rate": 0.0},
    {"target_sensitivity": 0.0}, {"target_sensitivity": 1.01}, {"ensemble": 0},
])
def test_train_config_refuses_settings_out_of_range(setting):
    name, value = next(iter(setting.items()))
    with pytest.raises(InvalidConfig) as caught:
        TrainConfig(**{"task": "breast", **setting})
    assert caught.value.field == name and caught.value.value == value and str(caught.value).startswith(f"{name} must")


def test_train_config_accepts_the_edges_of_every_range():
    edges = TrainConfig(task="breast", ema=0.0, mixup=0.0, dropout=0.0, label_smoothing=0.0, weight_decay=0.0,
                        target_sensitivity=1.0, limit=1, widths=(1,), finetune_epochs=0, vgg16_input_size=32)
    assert (edges.ema, edges.target_sensitivity, edges.widths) == (0.0, 1.0, (1,))


# --------------------------------------------------------------------------- smoke training (tiny_models fixture)

@pytest.mark.parametrize("task", TASK_NAMES)
def test_smoke_training_run(tiny_models, task):
    """One epoch on the fixture data through train() + save_trained() + fit_ood()."""
    spec = get_task(task)
    tiny = tiny_models[task]
    result = tiny.result
    assert result.config.task == task and result.config.epochs == 1
    assert result.best_epoch == 1
    assert {"loss", "accuracy"} <= set(result.history)
    assert all(len(v) == 1 and math.isfinite(v[0]) for v in result.history.values())
    assert 0.05 <= result.temperature <= 20.0
    assert result.wall_time_s > 0
    metrics = result.val_metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["n"] == (24 if task == "blood" else 8)  # limit // 4 (at least 2 per class), proportions kept
    if spec.decision == "threshold":
        assert result.threshold is not None and 0.0 <= result.threshold <= 1.0
        assert metrics["threshold"] == pytest.approx(result.threshold)
        assert metrics["sensitivity"] >= result.config.target_sensitivity  # chosen to keep it on val
    else:
        assert result.threshold is None

    # the saved model is the calibrated one
    assert tiny.path.exists()
    assert tiny.path.with_suffix(".card.json").exists()
    assert tiny.path.with_suffix(".ood.npz").exists()
    model = load_model(tiny.path)
    assert model_temperature(model) == pytest.approx(result.temperature, rel=1e-5)
    assert model.output_shape == (None, spec.num_classes)


def test_smote_balances_the_training_split_only(fixture_data_dir, monkeypatch):
    calls = []
    real = training.smote_oversample

    def spy(images, labels, seed=0):
        out = real(images, labels, seed)
        calls.append((images.shape, np.bincount(labels, minlength=2), np.bincount(out[1], minlength=2)))
        return out

    monkeypatch.setattr(training, "smote_oversample", spy)
    seen = {}

    def fit_spy(model, train_split, val_split, spec, cfg, epochs, learning_rate, class_weight):
        # what the optimiser would see; skip the (slow) fitting itself -- the smoke runs cover it
        seen["train"] = np.bincount(train_split.labels, minlength=2)
        seen["val"] = np.bincount(val_split.labels, minlength=2)
        return {"loss": [1.0]}, 1

    monkeypatch.setattr(training, "_fit", fit_spy)
    cfg = TrainConfig(task="breast", epochs=1, limit=30, smote=True, widths=(4, 8), batch_size=64,
                      data_dir=str(fixture_data_dir), verbose=0)
    result = train(cfg)
    assert len(calls) == 1  # once, on the training split
    shape, before, after = calls[0]
    assert shape == (30, 28, 28, 1)  # limit 30: the fixture's 30 training images, imbalanced as they are
    assert before.tolist() == [10, 20]
    assert after.tolist() == [20, 20]
    assert seen["train"].tolist() == [20, 20]
    assert seen["val"].tolist() == [4, 4]  # validation untouched: the real (stratified) subset
    assert result.val_metrics["n"] == 8


def test_smote_oversample_directly(fixture_data_dir):
    from medclassify.data import load_split

    split = load_split("blood", "train", data_dir=fixture_data_dir)
    keep = np.concatenate([np.flatnonzero(split.labels == c)[: 3 + c] for c in range(8)])
    images, labels = split.images[keep], split.labels[keep]
    new_images, new_labels = smote_oversample(images, labels, seed=0)
    counts = np.bincount(new_labels)
    assert (counts == counts.max()).all() and counts.max() == 10
    assert new_images.dtype == np.uint8 and new_images.shape[1:] == images.shape[1:]
    assert new_labels.dtype == np.int64
    # the originals are kept, the synthetic cases are new
    np.testing.assert_array_equal(new_images[: len(images)], images)
    # deterministic for a seed
    again, _ = smote_oversample(images, labels, seed=0)
    np.testing.assert_array_equal(again, new_images)


def test_smote_with_a_singleton_class_is_a_no_op():
    images = np.zeros((5, 28, 28, 1), np.uint8)
    labels = np.array([0, 1, 1, 1, 1])
    out_images, out_labels = smote_oversample(images, labels)
    assert out_images is images and out_labels is labels


def test_balanced_class_weight():
    weights = balanced_class_weight(np.array([0, 0, 0, 1]), 2)
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})


# --------------------------------------------------------------------------- temperature

@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.0, 4.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(int(true_t * 10))
    n, k = 20000, 5
    logits = rng.normal(0.0, 3.0, (n, k))
    # labels drawn from softmax(logits / T): the model's T=1 probabilities are miscalibrated by T
    true_probs = softmax(logits / true_t)
    labels = (rng.random((n, 1)) > np.cumsum(true_probs, axis=1)).sum(axis=1)
    fitted = fit_temperature(softmax(logits), labels)
    assert fitted == pytest.approx(true_t, rel=0.06)


def test_fit_temperature_is_bounded():
    probs = np.array([[0.99, 0.01], [0.01, 0.99]] * 50)
    labels = np.array([1, 0] * 50)  # always confidently wrong: the NLL wants T as large as allowed
    assert fit_temperature(probs, labels) == pytest.approx(20.0, rel=0.01)


# --------------------------------------------------------------------------- threshold

def test_choose_threshold_hand_example():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    positive = np.array([1, 1, 1, 1, 0, 0, 0])
    assert choose_threshold(p, positive, 0.75) == pytest.approx(0.7)  # 3 of 4 positives
    assert choose_threshold(p, positive, 1.0) == pytest.approx(0.6)
    assert choose_threshold(p, positive, 0.0) == pytest.approx(0.9)  # at least one positive is kept
    assert choose_threshold(p, np.zeros(7), 0.95) == 0.5  # no positives: the default


@settings(max_examples=100)
@given(p=st.lists(st.floats(0, 1), min_size=2, max_size=60), seed=st.integers(0, 1000),
       target=st.floats(0.01, 1.0))
def test_choose_threshold_keeps_sensitivity_and_is_the_highest(p, seed, target):
    p = np.array(p)
    positive = np.random.default_rng(seed).random(len(p)) < 0.5
    if not positive.any():
        positive[0] = True
    t = choose_threshold(p, positive, target)
    sensitivity = (p[positive] >= t).mean()
    assert sensitivity >= target - 1e-12
    higher = p[positive][p[positive] > t]
    if len(higher):  # the next higher candidate would lose sensitivity
        assert (p[positive] >= higher.min()).mean() < target


# --------------------------------------------------------------------------- helpers

def test_stratified_subset():
    labels = np.repeat(np.arange(4), 10)
    split = Split(np.arange(40)[:, None, None, None].astype(np.uint8), labels)
    head = training._stratified_subset(split, 8, seed=0)
    assert np.bincount(head.labels).tolist() == [2, 2, 2, 2]
    assert len(set(head.images[:, 0, 0, 0].tolist())) == 8  # no duplicates
    np.testing.assert_array_equal(labels[head.images[:, 0, 0, 0]], head.labels)
    # class proportions are kept (so class weights and SMOTE still have something to do), every class present
    imbalanced = Split(np.arange(103)[:, None, None, None].astype(np.uint8), np.repeat([0, 1, 2], [75, 25, 3]))
    assert np.bincount(training._stratified_subset(imbalanced, 20, seed=1).labels).tolist() == [15, 5, 1]


def test_config_dict_and_environment():
    data = config_dict(TrainConfig(task="blood", widths=(1, 2)))
    assert data["widths"] == [1, 2] and data["task"] == "blood"
    env = environment()
    assert {"python", "tensorflow", "keras", "cpu_count", "medclassify"} <= set(env)


def test_unknown_model_kind():
    from medclassify.models import build_model

    with pytest.raises(InvalidConfig, match="model must be"):  # refused before any data is read
        TrainConfig(task="breast", model="resnet")
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("resnet", "breast")


def test_missing_data_is_a_data_error(tmp_path, monkeypatch):
    from medclassify import data

    monkeypatch.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(data.DataError("offline")))
    with pytest.raises(data.DataError):
        train(TrainConfig(task="breast", epochs=1, data_dir=str(tmp_path), verbose=0))


def test_ensemble_training_path(fixture_data_dir, monkeypatch, tmp_path):
    """``ensemble=2``: two members (fitting stubbed out; the smoke runs cover fitting) -> one saved model."""
    from medclassify.inference import Predictor
    from medclassify.ood import fit_ood
    from medclassify.training import save_trained

    fits = []

    def fake_fit(model, train_split, val_split, spec, cfg, epochs, learning_rate, class_weight):
        fits.append(model.name)
        return {"loss": [1.0]}, 1

    monkeypatch.setattr(training, "_fit", fake_fit)
    cfg = TrainConfig(task="breast", epochs=1, limit=30, ensemble=2, widths=(4, 8), data_dir=str(fixture_data_dir),
                      verbose=0)
    result = train(cfg)
    assert len(fits) == 2
    assert result.best_epoch == [1, 1]
    assert set(result.history) == {"member0", "member1"}
    names = {layer.name for layer in result.model.layers}
    assert {"m0_logits", "m1_logits", "logits", "temperature", "probabilities"} <= names
    path = save_trained(result, tmp_path / "ensemble.h5", command="tests: ensemble")
    assert model_temperature(load_model(path)) == pytest.approx(result.temperature, rel=1e-5)
    settings = fit_ood("breast", path, str(fixture_data_dir))
    assert settings["distance_threshold"] > 0
    predictor = Predictor("breast", path)
    probs, features = predictor.predict_arrays(np.zeros((2, 28, 28, 1), np.uint8))
    assert probs.shape == (2, 2) and features.shape == (2, 16)  # both members' pooled features


def _max_weight_difference(single, ensemble, member: int) -> float:
    differences = [0.0]
    for layer in single.layers:
        if layer.weights:
            member_layer = ensemble.get_layer(f"m{member}_{layer.name}")
            differences += [float(np.abs(a - b).max()) for a, b in zip(layer.get_weights(), member_layer.get_weights())]
    return max(differences)


@pytest.mark.slow
def test_first_ensemble_member_is_the_single_run_with_the_same_seed(fixture_data_dir):
    """What README's "Reproducing the shipped models" relies on: cnn_ens5's member 0 is the cnn row's seed-0 run.

    Member 1 is not the seed-1 run: inside the ensemble it shuffles the data with the ensemble's seed.
    """
    cfg = TrainConfig(task="breast", epochs=2, widths=(4, 8), data_dir=str(fixture_data_dir), verbose=0)
    ensemble = train(dataclasses.replace(cfg, ensemble=2)).model
    assert _max_weight_difference(train(cfg).model, ensemble, 0) == 0.0
    assert _max_weight_difference(train(dataclasses.replace(cfg, seed=1)).model, ensemble, 1) > 0.0


# --------------------------------------------------------------------------- mixup

def _one_epoch(cfg: TrainConfig, images: np.ndarray, targets: np.ndarray):
    batches = list(training.training_dataset(images, targets, cfg))
    return (np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches]))


def test_mixup_blends_images_and_targets_alike():
    # each image is constant at 100 x its class, so its mixed value says how it was mixed: the target must agree
    classes = np.arange(12) % 3
    images = np.stack([np.full((4, 4, 1), 100.0 * c, np.float32) for c in classes])
    targets = np.eye(3, dtype=np.float32)[classes]
    mixed, mixed_targets = _one_epoch(TrainConfig(task="breast", batch_size=4, mixup=0.4, seed=0), images, targets)
    assert mixed.shape == images.shape and mixed_targets.shape == targets.shape
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-5)  # still a distribution
    np.testing.assert_allclose(mixed[:, 0, 0, 0], mixed_targets @ np.array([0.0, 100.0, 200.0]), rtol=1e-4,
                               atol=1e-2)
    assert mixed.min() >= 0.0 and mixed.max() <= 200.0
    assert not np.allclose(mixed_targets.max(axis=1), 1.0)  # Beta(0.4, 0.4) weights lie strictly inside (0, 1)


def test_without_mixup_the_batches_are_the_examples_reshuffled():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    targets = np.eye(2, dtype=np.float32)[np.arange(10) % 2]
    seen, seen_targets = _one_epoch(TrainConfig(task="breast", batch_size=4, seed=0), images, targets)
    order = seen[:, 0, 0, 0].astype(int)
    assert sorted(order) == list(range(10))
    np.testing.assert_array_equal(seen_targets, targets[order])


def test_mixup_follows_the_global_seed():
    # one class per example, so a mixed target's largest entry is that example's mixing weight, whatever the order
    images = np.random.default_rng(0).uniform(0, 255, (16, 4, 4, 1)).astype(np.float32)
    targets = np.eye(16, dtype=np.float32)
    cfg = TrainConfig(task="breast", batch_size=8, mixup=0.4, seed=0)

    def weights_after(global_seed: int):
        training.set_seed(global_seed)  # what train() does for a run, and for each ensemble member
        return np.sort(_one_epoch(cfg, images, targets)[1].max(axis=1))

    np.testing.assert_array_equal(weights_after(5), weights_after(5))
    # ensemble members (seeds 0, 1, ...) draw their own weights, not one shared sequence
    assert not np.allclose(weights_after(5), weights_after(6))


def test_mixup_training_run(fixture_data_dir):
    result = train(TrainConfig(task="breast", epochs=1, limit=30, widths=(4, 8), mixup=0.4,
                               data_dir=str(fixture_data_dir), verbose=0))
    assert result.config.mixup == 0.4 and math.isfinite(result.history["loss"][0])
    assert config_dict(result.config)["mixup"] == 0.4


# --------------------------------------------------------------------------- weight averaging (EMA)

def _distance_moved(fixture_data_dir, ema: float) -> float:
    """How far 3 tiny epochs move the CNN's trainable weights from their initial values (sum of |change|)."""
    from medclassify.data import load_split
    from medclassify.models import build_cnn

    spec = get_task("breast")
    cfg = TrainConfig(task="breast", epochs=3, batch_size=8, widths=(4, 8), augment=False, ema=ema,
                      data_dir=str(fixture_data_dir), verbose=0)
    train_split = training._stratified_subset(load_split(spec, "train", data_dir=str(fixture_data_dir)), 30, 0)
    val_split = load_split(spec, "val", data_dir=str(fixture_data_dir))
    training.set_seed(0)
    initial = [w.numpy() for w in build_cnn(spec, augment=False, widths=(4, 8), dropout=cfg.dropout).trainable_weights]
    training.set_seed(0)
    model, _, _ = training._train_single(cfg, spec, train_split, val_split, None)
    return float(sum(np.abs(w.numpy() - w0).sum() for w, w0 in zip(model.trainable_weights, initial)))


def test_ema_keeps_the_averaged_weights(fixture_data_dir):
    # With a momentum this close to 1 the average stays where the first step left it, so the kept model
    # must have moved far less than plain training's, which takes all 12 steps (or the 4 of epoch 1).
    plain = _distance_moved(fixture_data_dir, ema=0.0)
    averaged = _distance_moved(fixture_data_dir, ema=0.999999)
    assert plain > 0 and averaged < 0.5 * plain


def test_eager_steps_learn_what_traced_steps_learn(fixture_data_dir, monkeypatch):
    """``run_eagerly`` (the notebooks' smoke mode) skips graph tracing; the weights it learns must not change."""
    import keras

    fitted_eagerly, real_fit = [], keras.Model.fit

    def spy(model, *args, **kwargs):
        fitted_eagerly.append(model.run_eagerly)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    cfg = TrainConfig(task="breast", epochs=1, limit=40, widths=(4, 8), batch_size=8, mixup=0.2,
                      data_dir=str(fixture_data_dir), verbose=0)
    def largest_difference(a, b) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(a.model.get_weights(), b.model.get_weights()))

    traced, eager = train(cfg), train(dataclasses.replace(cfg, run_eagerly=True))
    assert fitted_eagerly == [False, True]
    assert largest_difference(traced, eager) < 1e-4  # float summation order only
    assert largest_difference(traced, train(dataclasses.replace(cfg, seed=1))) > 1e-2  # the check can fail


def test_ema_training_run_records_the_setting(fixture_data_dir):
    result = train(TrainConfig(task="breast", epochs=1, limit=30, widths=(4, 8), ema=0.9,
                               data_dir=str(fixture_data_dir), verbose=0))
    assert config_dict(result.config)["ema"] == 0.9 and math.isfinite(result.history["loss"][0])


@pytest.mark.parametrize("finetune_wins", [True, False])
def test_vgg16_keeps_the_fine_tuning_phase_only_when_it_beats_the_frozen_one(monkeypatch, fixture_data_dir,
                                                                              finetune_wins):
    """Each phase keeps its own best epoch; between the phases, validation decides too."""
    from medclassify import models

    starts = []  # the logits kernel each phase starts from

    def fake_fit(model, train_split, val_split, spec, cfg, epochs, learning_rate, class_weight):
        frozen = not starts
        starts.append(model.get_layer("logits").get_weights()[0].copy())
        if not frozen:  # fine-tuning moves the weights
            model.set_weights([w + 1.0 for w in model.get_weights()])
        scores = [0.7, 0.8] if frozen else ([0.75, 0.9] if finetune_wins else [0.6, 0.78])
        return {"val_auc": scores}, 2

    monkeypatch.setattr(training, "_fit", fake_fit)
    monkeypatch.setattr(models, "build_vgg16", lambda spec, **kw: models.build_cnn(spec, widths=(4, 8)))
    monkeypatch.setattr(models, "set_base_trainable", lambda model, trainable, from_block=1: None)
    cfg = TrainConfig(task="breast", model="vgg16", epochs=2, finetune_epochs=2, limit=30,
                      data_dir=str(fixture_data_dir), verbose=0)
    result = train(cfg)
    assert result.best_epoch == (4 if finetune_wins else 2)
    assert result.history["val_auc"] == [0.7, 0.8] + ([0.75, 0.9] if finetune_wins else [0.6, 0.78])
    kept = result.model.get_layer("logits").get_weights()[0]
    np.testing.assert_allclose(kept, starts[1] + (1.0 if finetune_wins else 0.0))


def test_save_trained_drops_only_the_legacy_hdf5_notice(tmp_path, monkeypatch, caplog):
    """Keras logs "... HDF5 ... considered legacy ... We recommend ... .keras" on every .h5 save; save_trained
    drops that one message, for its own save only."""
    import logging
    import types

    import keras

    from medclassify import cards

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    absl_logger = logging.getLogger("absl")
    filters = list(absl_logger.filters)
    with caplog.at_level(logging.WARNING):
        model.save(str(tmp_path / "plain.h5"))
    assert "considered legacy" in caplog.text  # Keras still says it, so the check below means something
    caplog.clear()
    monkeypatch.setattr(cards, "write_training_card", lambda out, result, command=None: None)
    with caplog.at_level(logging.WARNING):
        path = training.save_trained(types.SimpleNamespace(model=model), tmp_path / "m.h5", command="test")
        absl_logger.warning("another message")
    assert path.exists() and "considered legacy" not in caplog.text
    assert "another message" in caplog.text and absl_logger.filters == filters


# Validation outputs per epoch for the selector test: (labels, [probabilities at epoch 1, 2, 3]). Epoch 2 is
# the best and epoch 3 the worst, so keeping the last epoch, or scoring the other class's column, is caught.
_SCRIPTED_EPOCHS = {
    # breast: label 0 = malignant; AUC of P(malignant) 0.5, 1.0, 0.0 (P(benign) would rank the other way)
    "breast": (np.array([0, 0, 0, 1, 1, 1]),
               [np.full(6, 0.5), np.array([0.9, 0.8, 0.7, 0.2, 0.3, 0.1]), np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])]),
    # blood: argmax accuracy 0.5, 1.0, 0.75
    "blood": (np.arange(8), [np.array([0, 1, 2, 3, 0, 0, 0, 0]), np.arange(8), np.array([0, 1, 2, 3, 4, 5, 0, 0])]),
}


def _scripted_probabilities(task: str, epoch: int) -> np.ndarray:
    labels, per_epoch = _SCRIPTED_EPOCHS[task]
    outputs = per_epoch[epoch]
    if task == "breast":
        return np.column_stack([outputs, 1.0 - outputs])
    probs = np.full((len(labels), 8), 0.02)
    probs[np.arange(len(labels)), outputs] = 0.86
    return probs


@pytest.mark.parametrize("task", TASK_NAMES)
def test_validation_selector_keeps_the_best_epochs_weights(task, monkeypatch):
    """``_fit`` scores each epoch on validation with the task's selection metric (breast: AUC of P(malignant),
    blood: accuracy) and restores the weights of the best epoch, not the last one."""
    import keras

    from medclassify.models import build_cnn

    spec = get_task(task)
    labels = _SCRIPTED_EPOCHS[task][0]
    val = Split(np.zeros((len(labels), *spec.input_shape), np.uint8), labels)
    rng = np.random.default_rng(0)
    train_split = Split(rng.integers(0, 256, (16, *spec.input_shape)).astype(np.uint8),
                        np.arange(16) % spec.num_classes)
    weights_seen = []

    def scripted(model, images, batch_size=512):
        assert images is val.images  # the selector scores the validation split
        weights_seen.append([w.copy() for w in model.get_weights()])
        return _scripted_probabilities(task, len(weights_seen) - 1)

    monkeypatch.setattr(training, "predict_probabilities", scripted)
    keras.utils.set_random_seed(0)
    model = build_cnn(spec, augment=False, widths=(4,), dropout=0.0)
    cfg = TrainConfig(task=task, epochs=3, batch_size=8, learning_rate=0.05, widths=(4,), verbose=0, run_eagerly=True)
    history, best_epoch = training._fit(model, train_split, val, spec, cfg, 3, cfg.learning_rate, None)
    assert len(weights_seen) == 3
    name = "val_auc" if spec.selection_metric == "auc" else "val_accuracy_selected"
    assert history[name] == ([0.5, 1.0, 0.0] if task == "breast" else [0.5, 1.0, 0.75])
    assert best_epoch == 2
    # the weights each epoch ended with differ, so "restored" can be told from "kept the last"
    assert not all(np.array_equal(a, b) for a, b in zip(weights_seen[1], weights_seen[2]))
    for restored, best in zip(model.get_weights(), weights_seen[1]):
        np.testing.assert_array_equal(restored, best)


def test_temperature_is_fitted_on_the_validation_outputs(fixture_data_dir, monkeypatch):
    """``fit_temperature`` gets the uncalibrated model's probabilities on the validation split and the
    validation labels, never the training split's (the card says "fitted on the validation split")."""
    from medclassify import models

    seen = {}

    def fit_spy(model, train_split, val_split, spec, cfg, epochs, learning_rate, class_weight):
        seen["train"], seen["val"] = train_split, val_split
        return {"loss": [1.0]}, 1

    outputs = []

    def predict_spy(model, images, batch_size=512):
        probs = models.predict_probabilities(model, images, batch_size)
        outputs.append((images, probs))
        return probs

    fitted = []

    def temperature_spy(probabilities, labels):
        fitted.append((probabilities, labels))
        return 1.5

    monkeypatch.setattr(training, "_fit", fit_spy)
    monkeypatch.setattr(training, "predict_probabilities", predict_spy)
    monkeypatch.setattr(training, "fit_temperature", temperature_spy)
    cfg = TrainConfig(task="breast", epochs=1, limit=30, widths=(4, 8), batch_size=64,
                      data_dir=str(fixture_data_dir), verbose=0)
    result = train(cfg)
    assert result.temperature == 1.5 and len(fitted) == 1
    probabilities, labels = fitted[0]
    val, train_split = seen["val"], seen["train"]
    assert len(val.labels) != len(train_split.labels)  # 8 and 30: the two cannot be confused
    np.testing.assert_array_equal(labels, val.labels)
    images = next((images for images, probs in outputs if probs is probabilities), None)  # whose outputs
    assert images is not None, "fit_temperature got probabilities the model did not give for a whole split"
    np.testing.assert_array_equal(images, val.images)
    assert probabilities.shape == (len(val.labels), 2)
