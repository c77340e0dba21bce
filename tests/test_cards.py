"""Model cards: written by training and evaluation, never by hand."""
from __future__ import annotations

import json

import pytest

from medclassify import cards
from medclassify.cards import (
    INTENDED_USE,
    LIMITATIONS,
    OFFICIAL_SPLITS_ONLY,
    SCHEMA,
    add_evaluation,
    card_path,
    input_spec,
    read_card,
    set_section,
    write_card,
)
from medclassify.registry import REPO_ROOT, TASKS, get_task

TASK_NAMES = ("blood", "breast")


def test_card_path(tmp_path):
    assert card_path(tmp_path / "model_blood.h5") == tmp_path / "model_blood.card.json"
    assert card_path("x/model.keras").name == "model.card.json"


def test_missing_card_reads_as_empty(tmp_path):
    assert read_card(tmp_path / "nothing.h5") == {}


def test_write_read_set_section(tmp_path):
    model = tmp_path / "m.h5"
    write_card(model, {"a": 1})
    assert read_card(model) == {"a": 1}
    set_section(model, "ood", {"threshold": 3.0})
    assert read_card(model) == {"a": 1, "ood": {"threshold": 3.0}}
    assert card_path(model).read_text().endswith("\n")


def test_add_evaluation_needs_a_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the model"):
        add_evaluation(tmp_path / "m.h5", {"split": "test", "accuracy": 0.5}, "cmd")


def test_add_evaluation_stores_the_model_path_relative_to_the_repository(tmp_path, monkeypatch):
    from medclassify import cards

    monkeypatch.setattr(cards, "REPO_ROOT", tmp_path / "repo")
    inside, outside = tmp_path / "repo" / "runs" / "breast" / "m.h5", tmp_path / "elsewhere" / "m.h5"
    for model in (inside, outside):
        model.parent.mkdir(parents=True)
        write_card(model, {"name": "m"})
        add_evaluation(model, {"split": "test", "accuracy": 0.5, "model": str(model)}, "cmd")
    assert read_card(inside)["test"]["model"] == "runs/breast/m.h5"
    assert read_card(outside)["test"]["model"] == "m.h5"  # never an absolute path from the machine it ran on
    assert read_card(inside)["test"]["accuracy"] == 0.5


@pytest.mark.parametrize("task", TASK_NAMES)
def test_input_spec(task):
    spec = get_task(task)
    data = input_spec(spec)
    assert data["shape"] == [28, 28, spec.channels]
    assert ("centre-crop 200/360" in data["preprocessing"]) == (task == "blood")
    assert "bicubic resize to 28x28" in data["preprocessing"]
    assert data["expected_input"] == spec.expected_input


def test_limitations_cover_every_task():
    assert set(LIMITATIONS) == set(TASKS)
    assert "Not a medical device" in INTENDED_USE


@pytest.mark.parametrize("task", TASK_NAMES)
def test_training_card(tiny_models, task):
    spec = get_task(task)
    tiny = tiny_models[task]
    card = read_card(tiny.path)
    assert card["schema"] == SCHEMA
    assert card["name"] == tiny.path.stem
    assert card["task"] == task
    assert card["classes"] == list(spec.class_names)
    assert card["input"] == input_spec(spec)
    assert card["decision"]["rule"] == spec.decision
    assert card["decision"]["threshold"] == tiny.result.threshold
    if task == "breast":
        assert card["decision"]["positive_class"] == "malignant"
        assert "sensitivity >= 0.95" in card["decision"]["threshold_rule"]
    else:
        assert card["decision"]["positive_class"] is None
    assert card["calibration"]["temperature"] == pytest.approx(tiny.result.temperature)
    training = card["training"]
    assert training["command"] == f"tests: tiny {task}"
    assert training["config"]["task"] == task and training["config"]["epochs"] == 1
    assert training["best_epoch"] == 1
    assert set(training["environment"]) >= {"python", "tensorflow", "keras"}
    assert card["validation"]["n"] == tiny.result.val_metrics["n"]
    assert card["test"] is None
    assert card["intended_use"] == INTENDED_USE
    # a run on a subset says so, and keeps no sentence that counts the official splits' images
    assert card["limitations"][0].startswith(f"Smoke or trial run on a subset (--limit {tiny.result.config.limit}:")
    assert f"{card['validation']['n']} validation images" in card["limitations"][0]
    assert card["limitations"][1:] == [text for text in LIMITATIONS[task] if text not in OFFICIAL_SPLITS_ONLY]
    assert card["data"]["dataset"] == spec.flag
    # fit_ood added its section
    assert card["ood"]["distance_threshold"] == pytest.approx(tiny.ood["distance_threshold"])
    json.dumps(card, allow_nan=False)  # strict JSON: no NaN/Infinity sneaks in


def test_add_evaluation(tiny_models, tmp_path):
    import shutil

    model = tmp_path / "copy.h5"
    shutil.copyfile(tiny_models["breast"].path, model)
    shutil.copyfile(card_path(tiny_models["breast"].path), card_path(model))
    add_evaluation(model, {"split": "test", "accuracy": 0.75}, "python -m medclassify evaluate --write-card")
    add_evaluation(model, {"split": "val", "accuracy": 0.5}, "cmd val")
    card = json.loads(card_path(model).read_text())
    assert card["test"] == {"split": "test", "accuracy": 0.75}
    assert card["validation"] == {"split": "val", "accuracy": 0.5} and "val" not in card  # one validation section
    assert card["evaluation_commands"] == {"test": "python -m medclassify evaluate --write-card", "val": "cmd val"}
    assert card["training"]  # the rest is kept


def test_cards_with_a_second_validation_section_are_read_as_one(tmp_path):
    """Schema-1 cards held the validation evaluation in ``val`` beside training's ``validation``."""
    from medclassify.cards import load_card_file

    legacy = tmp_path / "old.card.json"
    legacy.write_text(json.dumps({"validation": {"accuracy": 0.5, "n": 78}, "val": {"accuracy": 0.5, "ci95": {}}}))
    assert load_card_file(legacy) == {"validation": {"accuracy": 0.5, "n": 78, "ci95": {}}}
    assert read_card(tmp_path / "old.h5") == load_card_file(legacy)
    flat = {"precision_macro": 0.8, "precision_weighted": 0.9}
    schema_1 = {"schema": "medclassify-model-card/1",
                "test": {**flat, "precision": {"macro": 0.8, "weighted": 0.9},
                         "model": str(REPO_ROOT / "runs" / "breast" / "m.h5")},
                "val": {**flat, "precision": {"macro": 0.8, "weighted": 0.9}, "model": "/elsewhere/m.h5"}}
    legacy.write_text(json.dumps(schema_1))
    assert load_card_file(legacy) == {"schema": SCHEMA, "test": {**flat, "model": "runs/breast/m.h5"},
                                      "validation": {**flat, "model": "m.h5"}}
    schema_1["test"]["precision"]["macro"] = 0.7  # not a copy of the flat key: kept, not lost
    legacy.write_text(json.dumps(schema_1))
    assert load_card_file(legacy)["test"]["precision"] == {"macro": 0.7, "weighted": 0.9}


def test_a_damaged_card_is_named(tmp_path):
    from medclassify.cards import load_card_file

    broken = tmp_path / "m.card.json"
    broken.write_text('{"task": "breast", "decision": {')
    with pytest.raises(ValueError, match=r"model card m.card.json is not valid JSON \(.*line 1\)"):
        load_card_file(broken)


def test_committed_cards_have_one_validation_section_and_no_machine_paths():
    """No card in the repository names the machine it was made on, or keeps the old second ``val`` section."""
    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    paths = sorted(REPO_ROOT.glob("model_*.card.json")) + sorted((REPO_ROOT / "results").rglob("*.card.json"))
    assert len(paths) >= 4
    for path in paths:
        card = json.loads(path.read_text())
        assert "val" not in card and "validation" in card, path.name
        absolute = [text for text in strings(card) if text.startswith("/") or text.startswith(str(REPO_ROOT))]
        assert not absolute, f"{path.name}: {absolute[:3]}"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_shipped_cards(task):
    """The cards next to the shipped models are complete, machine-written and match their models."""
    spec = get_task(task)
    assert spec.model_path.exists(), f"{spec.model_path} is missing"
    card = read_card(spec.model_path)
    assert card, f"{spec.card_path} is missing"
    assert card["schema"] == SCHEMA
    assert card["task"] == task
    assert card["classes"] == list(spec.class_names)
    assert card["input"]["shape"] == list(spec.input_shape)
    assert card["intended_use"] == INTENDED_USE
    assert card["limitations"]
    assert card["training"]["command"].startswith(("python -m medclassify train",
                                                   "python -m medclassify experiment"))
    assert card["test"] and card["test"]["split"] == "test" and "ci95" in card["test"]
    assert card["calibration"]["temperature"] > 0
    if task == "breast":
        assert 0.0 < card["decision"]["threshold"] < 1.0
    assert "ood" in card and spec.model_path.with_suffix(".ood.npz").exists()
    json.loads(spec.card_path.read_text(), parse_constant=lambda c: pytest.fail(f"{spec.card_path} contains {c}"))


def test_cards_module_has_no_hand_typed_metrics():
    text = open(cards.__file__).read()
    assert "accuracy\":" not in text and "auc\":" not in text


def test_a_full_run_keeps_every_limitation():
    from medclassify.cards import training_limitations
    from medclassify.training import TrainConfig

    for task in TASKS:
        assert training_limitations(get_task(task), TrainConfig(task=task), 78) == LIMITATIONS[task]
    assert len([t for t in LIMITATIONS["breast"] if t in OFFICIAL_SPLITS_ONLY]) == 2


@pytest.mark.parametrize("target", [0.9, 0.975])
def test_threshold_rule_names_the_runs_target_sensitivity(tmp_path, target):
    """The card states the sensitivity the threshold was chosen for: the run's, not the default 0.95."""
    from medclassify.training import TrainConfig, TrainResult

    cfg = TrainConfig(task="breast", epochs=1, target_sensitivity=target)
    result = TrainResult(model=None, config=cfg, history={}, best_epoch=1, temperature=1.0, threshold=0.3,
                         val_metrics={"n": 78}, wall_time_s=1.0)
    cards.write_training_card(tmp_path / "model_breast.h5", result, command="tests")
    card = read_card(tmp_path / "model_breast.h5")
    assert card["decision"]["threshold_rule"].endswith(f"sensitivity >= {target}")
    assert "0.95" not in card["decision"]["threshold_rule"]
    assert card["training"]["config"]["target_sensitivity"] == target
