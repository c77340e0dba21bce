"""Machine-readable model cards (JSON next to each model: ``model_x.card.json``).

Training writes the card's first half (recipe, validation metrics, threshold,
temperature); ``evaluate --write-card`` adds the test metrics with bootstrap
CIs.  Nothing in a card is typed by hand.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from . import __version__
from .registry import REPO_ROOT, TaskSpec, get_task

#: 2: one validation section (schema 1 also kept the validation evaluation in ``val``); the metrics' nested
#: precision/recall/f1 copies of the flat keys are gone.
SCHEMA = "medclassify-model-card/2"

INTENDED_USE = (
    "Research and education: demonstrating classification of MedMNIST-style images. "
    "Not a medical device; not for diagnosis, triage or any clinical decision."
)

_BREAST_TRAINING_SET = "Trained on 546 28x28 thumbnails from one public dataset (BUSI, 600 women, one centre)."
_BREAST_THRESHOLD = ("Threshold chosen on a 78-image validation split: sensitivity and specificity estimates are "
                     "uncertain (see the confidence intervals).")
#: Limitations that count the official splits' images: untrue of a run on a subset (``--limit``).
OFFICIAL_SPLITS_ONLY = (_BREAST_TRAINING_SET, _BREAST_THRESHOLD)

LIMITATIONS = {
    "blood": [
        "Trained on 28x28 thumbnails: fine morphology (granules, nuclear chromatin) is mostly lost.",
        "Single-centre data (Hospital Clinic de Barcelona, CellaVision DM96, May-Grunwald Giemsa stain); "
        "other stains, scanners or magnifications may shift predictions.",
        "Only normal cells from healthy donors: leukaemic blasts and other abnormal cells are not among the classes.",
        "Expects one centred cell; full-size images are centre-cropped like MedMNIST (200/360 of the shorter side).",
    ],
    "breast": [
        _BREAST_TRAINING_SET,
        "'normal/benign' merges two clinically distinct classes (MedMNIST's binary task).",
        _BREAST_THRESHOLD,
        "Full-size images are resized to 28x28 like MedMNIST; annotations, calipers or text on the image may "
        "change the prediction.",
    ],
}


def training_limitations(spec: TaskSpec, config, n_validation: int | None) -> list[str]:
    """The task's limitations; a run on a subset (``limit``) says so first and drops ``OFFICIAL_SPLITS_ONLY``."""
    if not config.limit:
        return list(LIMITATIONS[spec.name])
    general = [text for text in LIMITATIONS[spec.name] if text not in OFFICIAL_SPLITS_ONLY]
    return ([f"Smoke or trial run on a subset (--limit {config.limit}: at most {config.limit} training and "
             f"{n_validation} validation images); its numbers say nothing about the full recipe."] + general)


#: The card section that holds each official split's metrics (``evaluate --split val`` adds to training's).
SPLIT_SECTIONS = {"val": "validation", "test": "test"}


def card_path(model_path: str | os.PathLike) -> Path:
    return Path(model_path).with_suffix(".card.json")


def read_card(model_path: str | os.PathLike) -> dict:
    """The card beside ``model_path``, or {} when it has none."""
    path = card_path(model_path)
    return load_card_file(path) if path.exists() else {}


def load_card_file(path: str | os.PathLike) -> dict:
    """A card file, in the current schema (``upgrade``); ``ValueError`` naming the file if it is not JSON."""
    try:
        with open(path) as fh:
            card = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model card {Path(path).name} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return upgrade(card)


def upgrade(card: dict) -> dict:
    """A schema-1 card in schema 2, in place; the same numbers.  Schema 1 kept the validation evaluation in a
    second section, ``val``, beside training's ``validation``; its metrics carried nested precision/recall/f1
    copies of the flat ``*_macro``/``*_weighted`` keys; and evaluations named the model by absolute path."""
    if isinstance(card.get("val"), dict):
        card["validation"] = {**(card.get("validation") or {}), **card.pop("val")}
    for section in ("validation", "test"):
        metrics = card.get(section)
        if not isinstance(metrics, dict):
            continue
        for key in ("precision", "recall", "f1"):
            copy = metrics.get(key)
            if isinstance(copy, dict) and all(metrics.get(f"{key}_{kind}") == value for kind, value in copy.items()):
                del metrics[key]
        if isinstance(metrics.get("model"), str) and Path(metrics["model"]).is_absolute():
            metrics["model"] = _repository_path(metrics["model"])
    if str(card.get("schema", "")).startswith("medclassify-model-card/"):
        card["schema"] = SCHEMA
    return card


def _repository_path(model) -> str:
    """The repository-relative path of a model file inside the checkout; else its name (an absolute path
    names the machine it ran on)."""
    resolved = Path(model).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else Path(model).name


def write_card(model_path: str | os.PathLike, card: dict) -> Path:
    path = card_path(model_path)
    temporary = path.with_name(f".{path.name}.writing")
    try:  # renamed over the old card only once complete: a reader never sees half a card
        with open(temporary, "w") as fh:
            json.dump(card, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def input_spec(spec: TaskSpec) -> dict:
    return {
        "shape": list(spec.input_shape),
        "dtype": "float32 pixel values 0..255 (the model rescales internally)",
        "channels": "RGB" if spec.channels == 3 else "grayscale",
        "preprocessing": (
            "decode (first frame, EXIF orientation) -> convert to "
            + ("RGB" if spec.channels == 3 else "grayscale")
            + (" -> centre-crop 200/360 of the shorter side (MedMNIST's 360x363 -> 200x200 crop)"
               if spec.source_center_crop else "")
            + f" -> bicubic resize to {spec.image_size}x{spec.image_size}; "
            "MedMNIST(+) thumbnails (square 28/64/128/224 px) are only resized"
        ),
        "expected_input": spec.expected_input,
    }


def write_training_card(model_path, result, command: str) -> Path:
    from .training import config_dict, environment

    spec = get_task(result.config.task)
    card = {
        "schema": SCHEMA,
        "name": Path(model_path).stem,
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": spec.name,
        "title": spec.title,
        "description": spec.description,
        "classes": list(spec.class_names),
        "input": input_spec(spec),
        "decision": {
            "rule": spec.decision,
            "positive_class": spec.class_names[spec.positive_class] if spec.positive_class is not None else None,
            "threshold": result.threshold,
            "threshold_rule": (
                f"highest threshold on P({spec.class_names[spec.positive_class]}) keeping validation sensitivity "
                f">= {result.config.target_sensitivity}" if spec.decision == "threshold" else None
            ),
        },
        "calibration": {"method": "temperature scaling fitted on the validation split (NLL)",
                        "temperature": result.temperature},
        "training": {
            "command": command,
            "config": config_dict(result.config),
            "seed": result.config.seed,
            "best_epoch": result.best_epoch,
            "wall_time_s": round(result.wall_time_s, 1),
            "environment": environment(),
            "history": result.history,
        },
        "data": {
            "dataset": spec.flag,
            "source": spec.source,
            "licence": spec.licence,
            "citation": spec.citation,
            "splits": "official MedMNIST train (fit), val (selection, temperature, threshold), test (reporting only)",
        },
        "validation": result.val_metrics,
        "test": None,
        "intended_use": INTENDED_USE,
        "limitations": training_limitations(spec, result.config, result.val_metrics.get("n")),
    }
    return write_card(model_path, card)


def add_evaluation(model_path, metrics: dict, command: str) -> Path:
    card = read_card(model_path)
    if not card:
        raise FileNotFoundError(f"{card_path(model_path)} not found: train the model with medclassify first")
    model = metrics.get("model")
    if model is not None:
        metrics = {**metrics, "model": _repository_path(model)}
    split = metrics.get("split", "test")
    # Validation metrics from the evaluation replace training's: the same numbers, with CIs and reliability.
    card[SPLIT_SECTIONS.get(split, split)] = metrics
    card.setdefault("evaluation_commands", {})[split] = command
    return write_card(model_path, card)


def set_section(model_path, key: str, value) -> Path:
    card = read_card(model_path)
    card[key] = value
    return write_card(model_path, card)
