"""Training: one function from a task and a recipe to a saved, calibrated model.

Selection (best epoch), the temperature and the breast threshold all come from
the validation split; the test split is never read here.  SMOTE, when asked
for, oversamples the training split only.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .data import Split, load_split
from .models import AUGMENTATION_POLICIES, MODEL_KINDS, predict_probabilities
from .registry import TASKS, TaskSpec, get_task


@dataclass(frozen=True)  # a recipe: vary it with dataclasses.replace, which checks the new values
class TrainConfig:
    task: str
    model: str = "cnn"  # "cnn" or "vgg16"
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    mixup: float = 0.0  # >0: mixup (Zhang et al. 2018) with mixing weights drawn from Beta(mixup, mixup)
    ema: float = 0.0  # >0: select and keep the exponential moving average of the weights, with this momentum
    augment: bool = True
    augmentation: str = "default"  # policy name, see models.augmentation_layers
    class_weight: bool = False
    smote: bool = False
    widths: tuple[int, ...] = (32, 64, 128)
    dropout: float = 0.3
    seed: int = 0
    limit: Optional[int] = None  # smoke runs: a random ~N training images (N/4 validation), class proportions kept
    data_dir: Optional[str] = None
    vgg16_weights: Optional[str] = None
    vgg16_input_size: int = 32
    finetune_epochs: int = 0  # VGG16: epochs with the whole base unfrozen after the frozen phase
    finetune_learning_rate: float = 1e-4
    target_sensitivity: float = 0.95  # breast: validation sensitivity the threshold must keep
    ensemble: int = 1  # >1: train this many seeds and ship the logit average as one model
    verbose: int = 2
    # True: Keras runs each step eagerly instead of tracing a graph first. Same maths; worth it only for smoke
    # runs, where tracing a train step (~10 s on 2 cores) costs more than one epoch on a hundred images.
    run_eagerly: bool = False

    def __post_init__(self):
        # Checked here, not only in the CLI, so that library code and notebooks cannot start a
        # run that would fail an hour in or, worse, silently train something else (mixup < 0
        # used to mean "off").
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidConfig(name, rule, getattr(self, name))

        need(self.task in TASKS, "task", f"one of {sorted(TASKS)}")
        need(self.model in MODEL_KINDS, "model", f"one of {list(MODEL_KINDS)}")
        need(self.epochs >= 1, "epochs", "at least 1")
        need(self.batch_size >= 1, "batch_size", "at least 1")
        need(self.learning_rate > 0, "learning_rate", "positive")
        need(self.weight_decay >= 0, "weight_decay", "0 or more")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
        need(self.mixup >= 0, "mixup", "0 (off) or more")
        need(0.0 <= self.ema < 1.0, "ema", "in [0, 1)")
        need(self.augmentation in AUGMENTATION_POLICIES, "augmentation", f"one of {list(AUGMENTATION_POLICIES)}")
        need(len(self.widths) >= 1 and all(w >= 1 for w in self.widths), "widths", "one or more positive integers")
        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(self.limit is None or self.limit >= 1, "limit", "at least 1")
        need(self.vgg16_input_size >= 32, "vgg16_input_size", "at least 32 (VGG16's smallest input)")
        need(self.finetune_epochs >= 0, "finetune_epochs", "0 or more")
        need(self.finetune_learning_rate > 0, "finetune_learning_rate", "positive")
        need(0.0 < self.target_sensitivity <= 1.0, "target_sensitivity", "in (0, 1]")
        need(self.ensemble >= 1, "ensemble", "at least 1")


class InvalidConfig(ValueError):
    """A ``TrainConfig`` setting out of range: ``field`` must be ``rule`` but is ``value``."""

    def __init__(self, field_name: str, rule: str, value):
        super().__init__(f"{field_name} must be {rule}, got {value!r}")
        self.field, self.rule, self.value = field_name, rule, value


@dataclass
class TrainResult:
    model: object
    config: TrainConfig
    history: dict
    best_epoch: object  # int, or one per ensemble member
    temperature: float
    threshold: Optional[float]
    val_metrics: dict
    wall_time_s: float


def set_seed(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def smote_oversample(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """SMOTE on flattened pixels of the training split (imbalanced-learn)."""
    from imblearn.over_sampling import SMOTE

    counts = np.bincount(labels)
    k = int(min(5, counts[counts > 0].min() - 1))
    if k < 1:
        return images, labels
    flat = images.reshape(len(images), -1).astype(np.float32)
    resampled, new_labels = SMOTE(k_neighbors=k, random_state=seed).fit_resample(flat, labels)
    resampled = np.clip(np.rint(resampled), 0, 255).astype(np.uint8)
    return resampled.reshape((-1,) + images.shape[1:]), new_labels.astype(np.int64)


def balanced_class_weight(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.arange(num_classes)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (Guo et al. 2017), from softmax outputs at T=1."""
    from scipy.optimize import minimize_scalar

    logits = np.log(np.clip(probabilities, 1e-12, 1.0))
    idx = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        log_probs = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_probs[idx, labels].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def choose_threshold(p_positive: np.ndarray, is_positive: np.ndarray, target_sensitivity: float) -> float:
    """Highest threshold on P(positive) whose validation sensitivity is >= target.

    The highest such threshold keeps the most specificity.  A case is called
    positive when ``p >= threshold``.
    """
    positives = np.sort(p_positive[is_positive.astype(bool)])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = int(math.ceil(target_sensitivity * len(positives)))
    needed = min(max(needed, 1), len(positives))
    return float(positives[needed - 1])


class _ValidationSelector:
    """Keras callback factory: score each epoch on validation and keep the best weights."""

    def __new__(cls, spec: TaskSpec, val: Split, verbose: int):
        import keras
        from sklearn.metrics import accuracy_score, roc_auc_score

        class Selector(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.best_score = -np.inf
                self.best_epoch = -1
                self.best_weights = None
                self.scores = []

            def on_epoch_end(self, epoch, logs=None):
                probs = predict_probabilities(self.model, val.images)
                if spec.selection_metric == "auc":
                    # breast: rank quality of P(malignant) is what the threshold relies on
                    score = roc_auc_score(val.labels == spec.positive_class, probs[:, spec.positive_class]) \
                        if len(np.unique(val.labels)) > 1 else 0.0
                    name = "val_auc"
                else:
                    score = accuracy_score(val.labels, probs.argmax(1))
                    name = "val_accuracy_selected"
                self.scores.append(float(score))
                if logs is not None:
                    logs[name] = float(score)
                if score > self.best_score:
                    self.best_score = float(score)
                    self.best_epoch = epoch + 1
                    self.best_weights = self.model.get_weights()
                if verbose:
                    print(f"  epoch {epoch + 1}: {name}={score:.4f} (best {self.best_score:.4f} at {self.best_epoch})",
                          file=sys.stderr, flush=True)

        return Selector()


def _optimizer(learning_rate: float, weight_decay: float, steps: int, ema: float = 0.0):
    import keras

    warmup = max(1, steps // 20)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate * 0.1,
        decay_steps=max(1, steps - warmup),
        warmup_target=learning_rate,
        warmup_steps=warmup,
        alpha=0.01,
    )
    # ema > 0: Polyak averaging. The average of the last ~1/(1-ema) steps' weights sits in a flatter region
    # than the last step's, which matters when a few hundred images make every step noisy.
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay, use_ema=ema > 0,
                                  ema_momentum=ema if ema > 0 else 0.99)  # 0.99: Keras's default, unused when off


def _fit(model, train: Split, val: Split, spec: TaskSpec, cfg: TrainConfig, epochs: int, learning_rate: float,
         class_weight):
    import keras

    steps = epochs * int(math.ceil(len(train.images) / cfg.batch_size))
    model.compile(
        optimizer=_optimizer(learning_rate, cfg.weight_decay, steps, cfg.ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
        run_eagerly=cfg.run_eagerly,
    )
    dataset = training_dataset(train.images, keras.utils.to_categorical(train.labels, spec.num_classes), cfg)
    selector = _ValidationSelector(spec, val, cfg.verbose)
    # With EMA, the averaged weights are swapped in at each epoch's end, so the selector scores and keeps them.
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), selector] if cfg.ema > 0 else [selector]
    # shuffle=False: the dataset shuffles itself (Keras would ignore shuffle=True for a dataset, with a warning)
    history = model.fit(dataset, epochs=epochs, verbose=cfg.verbose, callbacks=callbacks,
                        class_weight=class_weight, shuffle=False)
    if selector.best_weights is not None:
        model.set_weights(selector.best_weights)
    return history.history, selector.best_epoch


def training_dataset(images: np.ndarray, one_hot: np.ndarray, cfg: TrainConfig):
    """Shuffled batches of (image, one-hot target); with ``cfg.mixup`` > 0, each batch goes through mixup.

    Mixup (Zhang et al. 2018) is ``keras.layers.MixUp``: every example is blended with a partner from the
    same batch, image and target with the same weight drawn from Beta(mixup, mixup).
    """
    import keras
    import tensorflow as tf

    dataset = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), one_hot.astype(np.float32)))
        .shuffle(len(images), seed=cfg.seed, reshuffle_each_iteration=True)
        .batch(cfg.batch_size)
    )
    if cfg.mixup > 0:
        # No seed of its own: the layer then seeds itself from the global seed that `set_seed` fixed for this
        # run or ensemble member, as the weight initialisers do. With `seed=cfg.seed`, every member of an
        # ensemble trained in one call would draw the same mixing weights and partners.
        mix = keras.layers.MixUp(alpha=cfg.mixup)

        def mix_batch(batch_images, batch_targets):
            mixed = mix({"images": batch_images, "labels": batch_targets}, training=True)
            return mixed["images"], mixed["labels"]

        dataset = dataset.map(mix_batch)
    return dataset.prefetch(tf.data.AUTOTUNE)


def member_seed(cfg: TrainConfig, member: int) -> int:
    """The seed ensemble member ``member`` trains with: seed 0's members use seeds 0, 1, 2, … like single runs."""
    return cfg.seed * 1000 + member


def train(cfg: TrainConfig, reuse: Optional[dict[int, str | os.PathLike]] = None) -> TrainResult:
    """Train ``cfg``; for an ensemble, ``reuse`` maps member indices to saved runs to load instead.

    A reused member must be a single run of the same recipe with ``member_seed``
    (``experiments.matching_runs`` finds them).  It is as good a member as one
    trained here, but not the same model: a member trained here draws its
    initial weights (and mixup) from its own seed and shuffles the training data
    with the ensemble's seed, a single run shuffles with its own.  So the card
    lists the reused runs (``training.members_reused``, written by
    ``experiments.run_variant``).  The recorded wall time is the members'
    training time plus the assembly.
    """
    from .evaluation import compute_metrics
    from .models import build_ensemble, inference_model, with_temperature

    start = time.time()
    reused_wall_time = 0.0
    spec = get_task(cfg.task)
    set_seed(cfg.seed)
    train_split = load_split(spec, "train", data_dir=cfg.data_dir)
    val_split = load_split(spec, "val", data_dir=cfg.data_dir)
    if cfg.limit:
        train_split = _stratified_subset(train_split, cfg.limit, cfg.seed)
        val_split = _stratified_subset(val_split, max(cfg.limit // 4, spec.num_classes * 2), cfg.seed, at_least=2)
    if cfg.smote:
        images, labels = smote_oversample(train_split.images, train_split.labels, cfg.seed)
        train_split = Split(images, labels)
    class_weight = balanced_class_weight(train_split.labels, spec.num_classes) if cfg.class_weight else None

    if cfg.ensemble > 1:
        members, history, best_epoch = [], {}, []
        for member in range(cfg.ensemble):
            if reuse and member in reuse:
                model, member_history, member_best, member_wall_time = _load_run(reuse[member])
                reused_wall_time += member_wall_time
            else:
                set_seed(member_seed(cfg, member))
                model, member_history, member_best = _train_single(cfg, spec, train_split, val_split,
                                                                   class_weight)
            members.append(inference_model(model))
            history[f"member{member}"] = member_history
            best_epoch.append(member_best)
        model = build_ensemble(members, name=f"{spec.name}_{cfg.model}_ensemble{cfg.ensemble}")
    else:
        model, history, best_epoch = _train_single(cfg, spec, train_split, val_split, class_weight)

    model = inference_model(model)  # augmentation is for training only; see models._clone_inline
    raw_val = predict_probabilities(model, val_split.images)
    temperature = fit_temperature(raw_val, val_split.labels)
    model = with_temperature(model, temperature)
    val_probs = predict_probabilities(model, val_split.images)
    threshold = None
    if spec.decision == "threshold":
        threshold = choose_threshold(val_probs[:, spec.positive_class], val_split.labels == spec.positive_class,
                                     cfg.target_sensitivity)
    val_metrics = compute_metrics(spec, val_split.labels, val_probs, threshold=threshold)
    history = _floats(history)
    return TrainResult(model=model, config=cfg, history=history, best_epoch=best_epoch,
                       temperature=temperature, threshold=threshold, val_metrics=val_metrics,
                       wall_time_s=time.time() - start + reused_wall_time)


def _load_run(path: str | os.PathLike):
    """A saved run as (model, history, best epoch, training wall time), from the model and its card."""
    from .cards import read_card
    from .models import load_model

    training = read_card(path).get("training", {})
    return (load_model(path), training.get("history", {}), training.get("best_epoch"),
            float(training.get("wall_time_s", 0.0)))


def _train_single(cfg: TrainConfig, spec: TaskSpec, train_split: Split, val_split: Split, class_weight):
    from .models import build_cnn, build_vgg16, set_base_trainable

    if cfg.model == "cnn":
        model = build_cnn(spec, augment=cfg.augment, widths=tuple(cfg.widths), dropout=cfg.dropout,
                          augmentation=cfg.augmentation)
        history, best_epoch = _fit(model, train_split, val_split, spec, cfg, cfg.epochs, cfg.learning_rate,
                                   class_weight)
    else:  # "vgg16" (TrainConfig admits no other kind)
        model = build_vgg16(spec, weights=cfg.vgg16_weights, augment=cfg.augment,
                            input_size=cfg.vgg16_input_size, trainable_base=False, augmentation=cfg.augmentation)
        history, best_epoch = _fit(model, train_split, val_split, spec, cfg, cfg.epochs, cfg.learning_rate,
                                   class_weight)
        if cfg.finetune_epochs:
            frozen_weights, frozen_score = model.get_weights(), _best_score(history)  # the frozen phase's best
            set_base_trainable(model, True)
            more, best_ft = _fit(model, train_split, val_split, spec, cfg, cfg.finetune_epochs,
                                 cfg.finetune_learning_rate, class_weight)
            history = {k: list(history.get(k, [])) + list(more.get(k, [])) for k in set(history) | set(more)}
            if _best_score(more) > frozen_score:
                best_epoch = cfg.epochs + best_ft  # the fine-tuning phase starts from the frozen phase's best
            else:  # fine-tuning never beat the frozen model on validation: keep the frozen model
                set_base_trainable(model, False)  # the layout the weights were read in
                model.set_weights(frozen_weights)
    return model, history, best_epoch


def _best_score(history: dict) -> float:
    """The best validation selection score a ``_fit`` history logged."""
    scores = history.get("val_auc") or history.get("val_accuracy_selected")
    if not scores:  # _ValidationSelector logs one of them every epoch; without it the phases cannot be compared
        raise RuntimeError("no validation selection score in the training history")
    return max(scores)


def _floats(value):
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_floats(v) for v in value]
    return float(value) if isinstance(value, (int, float, np.floating, np.integer)) else value


def _stratified_subset(split: Split, n: int, seed: int, at_least: int = 1) -> Split:
    """A random subset of about ``n`` images with the split's class proportions (every class at least
    ``at_least`` times, as far as it has them), for smoke runs: balanced subsets would hide what class
    weights and SMOTE do."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(split.labels, return_counts=True)
    wanted = np.minimum(counts, np.maximum(at_least, np.round(n * counts / counts.sum()).astype(int)))
    picks = np.concatenate([rng.permutation(np.flatnonzero(split.labels == c))[:k] for c, k in zip(classes, wanted)])
    picks = rng.permutation(picks)
    return Split(split.images[picks], split.labels[picks])


def save_trained(result: TrainResult, out: str | os.PathLike, command: Optional[str] = None) -> Path:
    """Write the model and the training half of its card (the evaluation adds test metrics)."""
    import logging

    from .cards import write_training_card

    def not_the_legacy_notice(record) -> bool:
        # Keras logs (through absl) "You are saving your model as an HDF5 file ... considered legacy ... We
        # recommend ... `.keras`" on every .h5 save.  The .h5 format is this project's choice (the shipped
        # models and the app load it), so that one notice is dropped; any other message still shows.
        return "considered legacy" not in record.getMessage()

    from .ood import ood_path
    from .quantization import remove_serving_copy

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Files derived from a model saved here before would answer for this one (the app and CLI prefer the int8
    # copy), so they go first; the caller fits new OOD statistics, `quantize` makes a new int8 copy.
    remove_serving_copy(out)
    ood_path(out).unlink(missing_ok=True)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(not_the_legacy_notice)
    try:
        result.model.save(str(out))
    finally:
        absl_logger.removeFilter(not_the_legacy_notice)
    write_training_card(out, result, command=command or " ".join(sys.argv))
    return out


def model_files(out: str | os.PathLike) -> tuple[Path, ...]:
    """The model file and every file named after it (card, OOD statistics, int8 copy): what saving a model
    at ``out`` writes or replaces."""
    from .cards import card_path
    from .ood import ood_path
    from .quantization import head_path, quantized_path

    out = Path(out)
    return out, card_path(out), ood_path(out), quantized_path(out), head_path(out)


def config_dict(cfg: TrainConfig) -> dict:
    data = asdict(cfg)
    data["widths"] = list(cfg.widths)
    return data


def environment() -> dict:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "medclassify": __version__,
    }
