"""Training variants, the comparison report and shipping (``medclassify.experiments``).

The end-to-end test runs ``python -m medclassify experiment`` / ``report`` / ``ship`` on the
fixture data with results, runs and the shipped-model path redirected to a temp folder, so the
committed files are never touched.  The last tests read the committed cards: the shipped
variant must be the one the validation split picks.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from medclassify import experiments
from medclassify.cli import main
from medclassify.data import load_split
from medclassify.registry import TASKS, get_task


def _card(variant: str, val: dict, test: dict, wall: float = 120.0) -> dict:
    return {"variant": variant, "validation": val, "test": test, "training": {"wall_time_s": wall}}


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(experiments, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "results"


def test_every_variant_is_a_valid_config():
    for task, variants in experiments.VARIANTS.items():
        assert task in TASKS
        assert experiments.SHIPPED[task] in variants
        for name, cfg in variants.items():
            assert cfg.task == task, name
            assert cfg.model in ("cnn", "vgg16"), name
            assert not (cfg.smote and cfg.class_weight), f"{name}: SMOTE and class weights both rebalance"


def test_variant_config_overrides_and_errors():
    cfg = experiments.variant_config("breast", "cnn", epochs=3, seed=None)
    assert cfg.epochs == 3 and cfg.seed == experiments.VARIANTS["breast"]["cnn"].seed  # None keeps the default
    assert experiments.VARIANTS["breast"]["cnn"].epochs != 3  # the registry itself is not changed
    with pytest.raises(ValueError, match="unknown variant 'nope' for blood"):
        experiments.variant_config("blood", "nope")


def test_the_recipes_cannot_be_changed_in_place():
    with pytest.raises(TypeError):
        experiments.VARIANTS["breast"]["cnn"] = experiments.TrainConfig(task="breast")
    with pytest.raises(TypeError):
        experiments.SHIPPED["breast"] = "cnn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        experiments.VARIANTS["breast"]["cnn"].epochs = 1


def test_card_file_names_seeds(results_dir):
    assert experiments.card_file("blood", "cnn").name == "cnn.card.json"
    assert experiments.card_file("blood", "cnn", seed=2).name == "cnn_seed2.card.json"
    assert experiments.card_file("blood", "cnn").parent == results_dir / "blood"


def test_comparison_table_rows_and_anchors(results_dir, monkeypatch):
    monkeypatch.setitem(experiments._SHIPPED, "breast", "b")
    folder = results_dir / "breast"
    folder.mkdir(parents=True)
    metrics = {"accuracy": 0.8, "balanced_accuracy": 0.75, "auc": 0.9, "f1_macro": 0.7, "accuracy_at_0_5": 0.81,
               "sensitivity": 0.9, "specificity": 0.6, "ci95": {"auc": [0.85, 0.95]}}
    (folder / "a.card.json").write_text(json.dumps(_card("a", {"accuracy": 0.7, "auc": 0.8}, metrics, 600)))
    (folder / "b.card.json").write_text(json.dumps(_card("b", {"accuracy": 0.9, "auc": 0.95}, metrics)))
    (folder / "b_seed1.card.json").write_text(json.dumps(_card("b", {"accuracy": 0.1, "auc": 0.1}, metrics)))
    table = experiments.comparison_table("breast")
    rows = [line for line in table.splitlines() if line.startswith("| a ") or line.startswith("| **b**")]
    assert len(rows) == 2  # seed cards feed the mean ± std line, not the table
    assert "| 10 min |" in rows[0] and "0.9000 [0.850, 0.950]" in rows[0] and "0.8100" in rows[0]
    assert rows[1].startswith("| **b** (shipped)")
    for name, acc, auc in experiments.ANCHORS["breast"]:
        assert name in table and f"{acc:.3f}" in table
    assert table.endswith(experiments.ANCHOR_SOURCES) and "arXiv:2404.15786" in table  # each anchor cited


def test_seed_summary(results_dir):
    folder = results_dir / "blood"
    folder.mkdir(parents=True)
    assert experiments.seed_summary("blood", "v") is None
    for seed, acc in ((0, 0.90), (1, 0.92), (2, 0.94)):
        (folder / experiments.card_file("blood", "v", seed).name).write_text(
            json.dumps(_card("v", {}, {"accuracy": acc, "auc": 0.99})))
    summary = experiments.seed_summary("blood", "v")
    assert summary["seeds"] == 3
    assert summary["accuracy"]["mean"] == pytest.approx(0.92)
    assert summary["accuracy"]["std"] == pytest.approx(np.std([0.90, 0.92, 0.94], ddof=1))
    assert summary["auc"]["std"] == pytest.approx(0.0)
    # every seed run counts (breast's five-seed configurations), and another variant's seed cards never do
    for seed in (3, 4):
        (folder / experiments.card_file("blood", "v", seed).name).write_text(
            json.dumps(_card("v", {}, {"accuracy": 0.92, "auc": 0.99})))
    (folder / experiments.card_file("blood", "v_ens5", 1).name).write_text(
        json.dumps(_card("v_ens5", {}, {"accuracy": 0.0, "auc": 0.0})))
    summary = experiments.seed_summary("blood", "v")
    assert summary["seeds"] == 5 and summary["accuracy"]["mean"] == pytest.approx(0.92)


def _fake_run(runs: "pathlib.Path", name: str, cfg) -> None:
    from medclassify.training import config_dict

    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{name}.h5").write_bytes(b"")
    (runs / f"{name}.card.json").write_text(json.dumps({"training": {"config": config_dict(cfg)}}))


def test_matching_runs_finds_the_seed_runs_of_an_ensemble(results_dir):
    base = experiments.TrainConfig(task="blood", epochs=3, widths=(8, 16), verbose=0)
    # how a run executes (log level, data folder, eager steps) does not make it another recipe
    ensemble = dataclasses.replace(base, ensemble=3, verbose=2, data_dir="/elsewhere", run_eagerly=True)
    runs = experiments.RUNS_DIR / "blood"
    _fake_run(runs, "v", base)  # seed 0 = member 0
    _fake_run(runs, "v_seed2", dataclasses.replace(base, seed=2))  # member 2
    _fake_run(runs, "other_seed1", dataclasses.replace(base, seed=1, epochs=4))  # another recipe
    _fake_run(runs, "v_ens", ensemble)  # the ensemble itself is not a member
    assert experiments.matching_runs(ensemble) == {0: runs / "v.h5", 2: runs / "v_seed2.h5"}
    assert experiments.matching_runs(base) == {}  # a single run has no members
    assert experiments.matching_runs(dataclasses.replace(ensemble, seed=1)) == {}  # members 1000, 1001, 1002


def test_matching_runs_reads_an_older_cards_settings(results_dir):
    from medclassify.training import config_dict

    base = experiments.TrainConfig(task="breast", epochs=3, widths=(8, 16), verbose=0)
    runs = experiments.RUNS_DIR / "breast"
    runs.mkdir(parents=True, exist_ok=True)
    older = config_dict(base)
    del older["mixup"]  # cards written before TrainConfig had the setting
    older["extra"] = {}  # nor does a setting removed since make it another recipe
    (runs / "v.h5").write_bytes(b"")
    (runs / "v.card.json").write_text(json.dumps({"training": {"config": older}}))
    assert experiments.matching_runs(dataclasses.replace(base, ensemble=2)) == {0: runs / "v.h5"}
    assert experiments.matching_runs(dataclasses.replace(base, ensemble=2, mixup=0.2)) == {}


def test_report_names_the_ensemble_that_seed_runs_were_assembled_into(results_dir, tmp_path, monkeypatch):
    tiny = experiments.TrainConfig(task="breast", epochs=1, verbose=0)
    monkeypatch.setitem(experiments._VARIANTS["breast"], "v", tiny)
    monkeypatch.setitem(experiments._VARIANTS["breast"], "v_ens2", dataclasses.replace(tiny, ensemble=2))
    monkeypatch.setattr(experiments, "REPO_ROOT", tmp_path)  # no README there: the committed one is untouched
    folder = results_dir / "breast"
    folder.mkdir(parents=True)
    for seed in (0, 1):
        experiments.card_file("breast", "v", seed).write_text(json.dumps(_card("v", {}, {"auc": 0.9})))
    ensemble = _card("v_ens2", {}, {"auc": 0.9})
    ensemble["training"]["members_reused"] = {"0": "runs/breast/v.h5", "1": "runs/breast/v_seed1.h5"}
    experiments.card_file("breast", "v_ens2").write_text(json.dumps(ensemble))
    report = experiments.write_report().read_text()
    line = "Members of `v_ens2`: configuration `v` over 2 seeds (test, mean ± std): auc 0.9000 ± 0.0000"
    assert line in report
    assert experiments.seed_lines("breast") == [line]  # what the notebooks print too
    from medclassify.cards import read_card
    from medclassify.robustness import stability_line

    for task in ("blood", "breast"):  # the shipped cards' measured resize stability, as `stability` wrote it
        assert stability_line(read_card(get_task(task).model_path)["stability"]) in report


def test_replace_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    experiments.replace_between_markers(readme, "results", "new table\n")
    assert readme.read_text() == "intro\n<!-- results:start -->\nnew table\n<!-- results:end -->\nrest\n"
    experiments.replace_between_markers(readme, "benchmarks", "ignored")  # no such markers: unchanged
    assert "ignored" not in readme.read_text()
    experiments.replace_between_markers(tmp_path / "missing.md", "results", "x")  # no file: no error


def test_ship_checks_every_file_before_replacing_any(results_dir, tiny_models, tmp_path, monkeypatch):
    """A run without its OOD statistics (an interrupted fit) must not half-replace the shipped model."""
    source = tmp_path / "runs" / "breast" / "tiny.h5"
    source.parent.mkdir(parents=True)
    for suffix in (".h5", ".card.json"):  # no .ood.npz
        shutil.copyfile(tiny_models["breast"].path.with_suffix(suffix), source.with_suffix(suffix))
    monkeypatch.setitem(experiments._VARIANTS["breast"], "tiny", experiments.TrainConfig(task="breast", epochs=1))
    monkeypatch.setattr(experiments, "run_file", lambda task, variant, seed=0: source)
    shipped = tmp_path / "shipped" / "model_breast.h5"
    shipped.parent.mkdir()
    monkeypatch.setitem(TASKS, "breast", dataclasses.replace(TASKS["breast"], default_model=str(shipped)))
    before = {}
    for suffix in (".h5", ".card.json", ".ood.npz", ".int8.tflite", ".head.tflite"):
        shipped.with_suffix(suffix).write_bytes(b"the shipped " + suffix.encode())
        before[suffix] = shipped.with_suffix(suffix).read_bytes()
    with pytest.raises(FileNotFoundError, match="tiny.ood.npz not found"):
        experiments.ship("breast", "tiny")
    assert {suffix: shipped.with_suffix(suffix).read_bytes() for suffix in before} == before
    assert sorted(p.name for p in shipped.parent.iterdir()) == sorted(shipped.with_suffix(s).name for s in before)


@pytest.mark.slow
def test_experiment_report_and_ship_commands(results_dir, fixture_data_dir, tmp_path, monkeypatch, capsys):
    """One tiny variant end to end through the CLI: train, evaluate val and test, card, report, ship."""
    monkeypatch.setitem(experiments._VARIANTS["breast"], "tiny", experiments.TrainConfig(
        task="breast", epochs=1, widths=(8, 16), batch_size=32, limit=30, verbose=0))
    monkeypatch.setitem(experiments._SHIPPED, "breast", "tiny")
    shipped = tmp_path / "shipped" / "model_breast.h5"
    shipped.parent.mkdir()
    monkeypatch.setitem(TASKS, "breast", dataclasses.replace(TASKS["breast"], default_model=str(shipped)))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.setattr(experiments, "REPO_ROOT", tmp_path)

    code = main(["experiment", "--task", "breast", "--variant", "tiny", "--data-dir", str(fixture_data_dir),
                 "--bootstrap", "20"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    card = json.loads((results_dir / "breast" / "tiny.card.json").read_text())
    assert out["card"] == str(results_dir / "breast" / "tiny.card.json")
    assert card["variant"] == "tiny" and "history" not in card["training"]
    for split, section in (("val", "validation"), ("test", "test")):
        assert card[section]["split"] == split and 0.0 <= card[section]["auc"] <= 1.0
        assert "auc" in card[section]["ci95"]
    assert "val" not in card  # one validation section: the evaluation's replaces training's
    assert out["val"]["auc"] == card["validation"]["auc"]
    assert set(out) == {"card", "val"}  # test metrics stay in the card: variants are compared on validation
    assert (results_dir.parent / "runs" / "breast" / "tiny.h5").exists()

    assert main(["report"]) == 0
    capsys.readouterr()
    assert "| **tiny** (shipped)" in (results_dir / "comparison.md").read_text()
    assert "| **tiny** (shipped)" in readme.read_text()

    from medclassify import quantization

    stale = shipped.with_suffix(".int8.tflite")
    stale.write_bytes(b"the previous model's int8 copy")
    # the tiny model is close to random, so quantisation may move many decisions: accept any copy here
    monkeypatch.setattr(quantization, "refusal", lambda *args: None)
    assert main(["ship", "--task", "breast", "--variant", "tiny", "--data-dir", str(fixture_data_dir)]) == 0
    shipped_card = json.loads(shipped.with_suffix(".card.json").read_text())
    assert shipped_card["variant"] == "tiny" and shipped_card["name"] == "model_breast"
    assert shipped.with_suffix(".ood.npz").exists()
    assert shipped_card["test"]["auc"] == card["test"]["auc"]
    serving = shipped_card["serving"]  # ship writes the int8 serving copy of the new model
    assert serving["command"] == "python -m medclassify ship --task breast --variant tiny"
    assert stale.read_bytes() != b"the previous model's int8 copy"
    assert serving["model_sha256"] == quantization.sha256_file(shipped)  # the copy names the model it serves
    assert not list(shipped.parent.glob(".*"))  # no staging file left behind
    assert {serving["file"], serving["head_file"]} == {stale.name, shipped.with_suffix(".head.tflite").name}
    # ...and measures that copy, so the card the app reads is complete, each section with its own command
    check = shipped_card["ood_check"]
    assert check["precision"] == "int8"  # measured on the copy just written, which now answers
    assert check["command"] == "python -m medclassify ood-check --task breast --write-card"
    assert check["n_test"] + check.get("n_test_refused", 0) == len(load_split("breast", "test",
                                                                              data_dir=fixture_data_dir).images)
    stability = shipped_card["stability"]
    assert stability["precision"] == "int8"
    for split in ("val", "test"):
        assert stability[split]["split"] == split
        assert stability[split]["command"] == f"python -m medclassify stability --task breast --split {split} " \
                                              "--write-card"
        assert stability[split]["n"] == len(load_split("breast", split, data_dir=fixture_data_dir).images)


def test_a_shortened_experiment_is_a_trial_that_report_leaves_out(results_dir, fixture_data_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """--epochs/--limit change the recipe: such a run must not overwrite the variant's card or reach the README."""
    monkeypatch.setitem(experiments._VARIANTS["breast"], "tiny", experiments.TrainConfig(
        task="breast", epochs=2, widths=(8, 16), batch_size=32, verbose=2))  # Keras prints per epoch
    real = results_dir / "breast" / "tiny.card.json"
    real.parent.mkdir(parents=True)
    real.write_text(json.dumps({"variant": "tiny", "validation": {"auc": 0.5}, "test": {"auc": 0.5}}))
    before = real.read_text()
    code = main(["experiment", "--task", "breast", "--variant", "tiny", "--data-dir", str(fixture_data_dir),
                 "--limit", "30", "--epochs", "1", "--bootstrap", "20"])
    stdout, err = capsys.readouterr()
    assert len(stdout.splitlines()) == 1, stdout  # only the JSON line: Keras's progress goes to stderr
    assert "- loss: " in err  # Keras's line for the epoch
    out = json.loads(stdout)
    assert code == 0 and real.read_text() == before
    trial = results_dir / "trial" / "breast" / "tiny.card.json"
    assert out["card"] == str(trial) and json.loads(trial.read_text())["training"]["config"]["limit"] == 30
    assert (results_dir.parent / "runs" / "trial" / "breast" / "tiny.h5").exists()
    assert not (results_dir.parent / "runs" / "breast" / "tiny.h5").exists()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.setattr(experiments, "REPO_ROOT", tmp_path)
    assert main(["report"]) == 0
    capsys.readouterr()
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and rows[0].split(" | ")[3] == "0.5000"  # the variant's own card, not the trial's


@pytest.mark.parametrize("argv", [["experiment", "--variant", "nope"], ["experiment", "--variant", "cnn", "--epochs", "0"],
                                  ["ship", "--variant", "nope"]])
def test_experiment_usage_errors_exit_2_in_one_line(capsys, argv):
    code = main([argv[0], "--task", "breast", *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_ensemble_variant_reuses_the_seed_runs(results_dir, fixture_data_dir, tmp_path, monkeypatch, capsys):
    """``experiment`` on an ensemble loads the matching seed runs instead of training them again."""
    from medclassify import training

    tiny = experiments.TrainConfig(task="blood", epochs=1, widths=(8, 16), batch_size=32, limit=40, verbose=0)
    monkeypatch.setitem(experiments._VARIANTS["blood"], "tiny", tiny)
    monkeypatch.setitem(experiments._VARIANTS["blood"], "tiny_ens2", dataclasses.replace(tiny, ensemble=2))
    common = ["--task", "blood", "--data-dir", str(fixture_data_dir), "--bootstrap", "10"]
    for seed in ("0", "1"):
        assert main(["experiment", "--variant", "tiny", "--seed", seed, *common]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a member with a matching seed run was trained again")

    monkeypatch.setattr(training, "_train_single", no_training)
    assert main(["experiment", "--variant", "tiny_ens2", *common]) == 0
    capsys.readouterr()
    card = json.loads((results_dir / "blood" / "tiny_ens2.card.json").read_text())
    assert card["training"]["members_reused"] == {"0": "runs/blood/tiny.h5", "1": "runs/blood/tiny_seed1.h5"}
    members = [json.loads((results_dir / "blood" / name).read_text()) for name in
               ("tiny.card.json", "tiny_seed1.card.json")]
    assert card["training"]["wall_time_s"] >= sum(m["training"]["wall_time_s"] for m in members)
    assert card["training"]["best_epoch"] == [m["training"]["best_epoch"] for m in members]
    assert 0.0 <= card["test"]["accuracy"] <= 1.0

    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.setattr(experiments, "REPO_ROOT", tmp_path)
    assert main(["report"]) == 0
    assert "Members of `tiny_ens2`: configuration `tiny` over 2 seeds (test, mean ± std): accuracy" in readme.read_text()
    assert experiments.ensemble_member_variants("blood", "tiny_ens2") == {"tiny"}
    assert experiments.ensemble_member_variants("blood", "tiny") == set()
    assert experiments.ensemble_member_variants("blood", "missing") == set()


# --------------------------------------------------------------------------- the committed results


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_variant_is_the_validation_choice(task):
    """Selection uses validation only: the shipped variant has the best validation score of the variants whose
    test metrics reach the release floor (which can only veto), and the shipped card is that variant's."""
    key = get_task(task).selection_metric
    scores = {}
    for path in sorted((experiments.RESULTS_DIR / task).glob("*.card.json")):
        if "_seed" not in path.name:
            card = json.loads(path.read_text())
            if not experiments.floor_shortfalls(task, card["test"]):
                scores[card.get("variant", path.stem)] = card["validation"][key]
    shipped = experiments.SHIPPED[task]
    assert shipped in scores, f"no results card reaching the release floor for the shipped variant {shipped}"
    best = max(scores, key=scores.get)
    assert scores[shipped] == scores[best], f"{task}: validation {key} prefers {best} ({scores[best]:.4f}) " \
                                            f"over the shipped {shipped} ({scores[shipped]:.4f})"
    assert experiments.validation_choice(task) == shipped
    shipped_card = json.loads(get_task(task).card_path.read_text())
    assert shipped_card["variant"] == shipped


def test_the_release_floor_vetoes_but_never_ranks(results_dir, monkeypatch):
    folder = results_dir / "breast"
    folder.mkdir(parents=True)
    for name, val_auc, test_auc in [("a", 0.99, 0.90), ("b", 0.98, 0.92), ("c", 0.97, 0.99), ("d", 0.995, None)]:
        card = _card(name, {"auc": val_auc}, {})
        card["test"] = {} if test_auc is None else {"auc": test_auc}
        experiments.card_file("breast", name).write_text(json.dumps(card))
    ranking = experiments.validation_ranking("breast")
    assert [name for _, name, _ in ranking] == ["d", "a", "b", "c"]
    assert ranking[1][2] == {"auc": (0.90, 0.913)} and ranking[0][2] == {"auc": (None, 0.913)}
    assert experiments.validation_choice("breast") == "b"  # c's far better test AUC does not move it ahead
    assert experiments.shortfall_text(ranking[1][2]) == "test auc 0.9000 < 0.913"
    assert experiments.floor_shortfalls("breast", {"auc": 0.913}) == {}  # the floor itself is reached
    assert experiments.floor_shortfalls("a_third_task", {}) == {}  # a task without floors: validation alone
    monkeypatch.setitem(experiments._SHIPPED, "breast", "b")
    rows = {line.split(" | ")[0] for line in experiments.comparison_table("breast").splitlines() if line.startswith("| ")}
    assert {"| **b** (shipped)", "| c", "| a (better on validation; not shipped: test auc 0.9000 < 0.913)",
            "| d (better on validation; not shipped: test auc missing < 0.913)"} <= rows


def test_serving_line_reports_the_int8_copy_on_val_and_test():
    metrics = {"accuracy": 0.9, "auc": 0.93, "ece": 0.02, "sensitivity": 0.95, "specificity": 0.8,
               "accuracy_at_0_5": 0.88}
    card = {"serving": {"command": "python -m medclassify quantize --task breast", "calibration": {"images": 500},
                        "val": {"n": 78, "decisions_changed": 1, "int8_metrics": metrics},
                        "test": {"n": 156, "decisions_changed": 0, "int8_metrics": metrics}}}
    line = experiments.serving_line(card)
    assert line.startswith("Served int8 copy of the shipped model (`python -m medclassify quantize --task breast`")
    assert "val: 1 of 78 decisions differ" in line and "test: 0 of 156 decisions differ" in line
    assert "sensitivity 0.9500" in line and "ece" not in line
    assert experiments.serving_line({}) == "" and experiments.serving_line({"serving": {"val": {}}}) == ""


def test_ood_check_line_counts_only_the_answered_images_and_names_the_refused():
    check = {"command": "python -m medclassify ood-check --task breast --write-card", "precision": "int8",
             "test_flagged": 0.0192, "n_test": 156, "n_test_refused": 0,
             "cross_task_flagged": 1.0, "n_cross_task": 3421, "n_cross_task_refused": 0,
             "photos_flagged": 91 / 92, "n_photos": 92, "n_photos_refused": 4,
             "photos_refusals": {"image is too small": 4}}
    line = experiments.ood_check_line(check)
    assert "on the features of the int8 copy that serves" in line
    assert "1.9% of the 156 official test images," in line
    assert "98.9% of the 92 photograph crops it answered (4 more were refused: image is too small)." in line
    two = {**check, "photos_refusals": {"image is too small": 3, "not a recognised image file": 1}}
    assert "(4 more were refused: image is too small: 3, not a recognised image file: 1)" in \
        experiments.ood_check_line(two)
    older = {k: v for k, v in check.items() if "refused" not in k and k != "precision"}  # cards before the counts
    assert "refused" not in experiments.ood_check_line(older) and "int8" not in experiments.ood_check_line(older)


def test_targets_line_says_which_bars_the_shipped_model_meets():
    card = {"test": {"auc": 0.9267, "accuracy_at_0_5": 0.91, "sensitivity": 0.857, "threshold": 0.1826, "ece": 0.03}}
    line = experiments.targets_line("breast", card)
    assert "auc 0.9267 (target ≥ 0.93: **missed**)" in line
    assert "accuracy_at_0_5 0.9100 (target ≥ 0.90: met)" in line
    assert "sensitivity 0.8570 at threshold 0.1826 (target ≥ 0.90: **missed**)" in line
    assert "ece 0.0300 (target ≤ 0.03: met)" in line  # at most: the bar itself passes
    assert experiments.targets_line("blood", {"test": {"accuracy": 0.976}}) == (
        "Shipped model against the model issue's (#3) targets, official test split: "
        "accuracy 0.9760 (target ≥ 0.975: met).")
    assert experiments.targets_line("blood", {"test": None}) == ""


def test_target_misses_agrees_with_the_targets_line():
    metrics = {"auc": 0.9267, "accuracy_at_0_5": 0.91, "sensitivity": 0.857, "threshold": 0.1826, "ece": 0.03}
    assert experiments.target_misses("breast", metrics) == {"auc": (0.9267, ">=", 0.93),
                                                           "sensitivity": (0.857, ">=", 0.90)}
    # a bar the metrics cannot show is not met (the line leaves it out rather than call it met)
    assert experiments.target_misses("blood", {"accuracy": 0.976, "auc": 0.9988}) == {"ece": (None, "<=", 0.03)}
    assert experiments.target_misses("blood", {"accuracy": 0.975, "auc": 0.998, "ece": 0.0301}) == {
        "ece": (0.0301, "<=", 0.03)}
    assert experiments.target_misses("blood", {"accuracy": 0.975, "auc": 0.998, "ece": 0.03}) == {}
