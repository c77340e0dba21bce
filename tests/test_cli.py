"""The command line: ``python -m medclassify {train,evaluate,predict,fit-ood}`` and its exit codes.

Most tests call ``medclassify.cli.main(argv)`` in-process (TensorFlow is imported
once per session); a few run the real ``python -m medclassify`` entry point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import AWKWARD_KINDS, REPO_ROOT, TINY_WIDTHS
from medclassify.cli import main
from medclassify.registry import get_task

TASK_NAMES = ("blood", "breast")
METRIC_KEYS = {"accuracy", "balanced_accuracy", "auc", "precision_macro", "recall_macro", "f1_macro",
               "precision_weighted", "recall_weighted", "f1_weighted", "per_class", "confusion_matrix", "n"}
BREAST_KEYS = {"threshold", "sensitivity", "specificity", "accuracy_at_0_5"}


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def copy_model(src: Path, dst: Path) -> Path:
    for suffix in (".h5", ".card.json", ".ood.npz"):
        source = src.with_suffix(suffix)
        if source.exists():
            shutil.copyfile(source, dst.with_suffix(suffix))
    return dst.with_suffix(".h5")


# --------------------------------------------------------------------------- usage errors (exit 2)

@pytest.mark.parametrize("argv", [
    [],
    ["predict"],
    ["predict", "--task", "lung", "x.png"],
    ["predict", "--task", "blood"],  # no paths
    ["predict", "x.png"],  # no --task
    ["evaluate", "--task", "blood", "--split", "train"],  # train is not an evaluation split
    ["train", "--task", "blood", "--epochs", "many"],
    ["frobnicate", "--task", "blood"],
])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "usage:" in err


def test_bad_widths_exit_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--task", "blood", "--widths", "8,x", "--out", tmp_path / "m.h5")
    assert code == 2 and "--widths" in err


def test_train_needs_out_so_it_cannot_overwrite_the_shipped_model(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "breast", "--epochs", "1"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code", [
    (["predict", "--task", "lung", "x.png"], 2),
    (["--version-does-not-exist"], 2),
    ([], 2),
])
def test_entry_point_usage_errors(argv, code):
    """The real ``python -m medclassify``: argparse errors exit 2 before TensorFlow is imported."""
    proc = subprocess.run([sys.executable, "-m", "medclassify", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "usage:" in proc.stderr


def test_package_metadata_installs_the_cli_with_the_pinned_requirements():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"medclassify": "medclassify.cli:main"}
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert project["tool"]["setuptools"]["packages"] == ["medclassify"]


@pytest.mark.slow
def test_installed_command_runs_from_any_directory(tmp_path):
    """``make setup`` installs the package editable; its ``medclassify`` command finds the shipped models
    from any working directory."""
    command = shutil.which("medclassify", path=str(Path(sys.executable).parent))
    if command is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the medclassify command is not installed: `make setup` runs `pip install -e .`")
        pytest.skip("the medclassify command is not installed (`pip install --no-deps -e .`)")
    usage = subprocess.run([command, "predict"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: medclassify predict"), usage.stderr
    sample = REPO_ROOT / "sample_images" / "blood" / "neutrophil_01.png"
    proc = subprocess.run([command, "predict", "--task", "blood", "--json", "--no-progress", str(sample)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["file"] == str(sample) and line["label"] in get_task("blood").class_names


# --------------------------------------------------------------------------- train

def _train_smoke(capsys, tmp_path, data_dir, task, limit, *extra):
    out = tmp_path / f"smoke_{task}.h5"
    code, stdout, _ = run_main(capsys, "train", "--task", task, "--data-dir", data_dir, "--limit", limit,
                               "--epochs", 1, "--widths", ",".join(map(str, TINY_WIDTHS)), "--batch-size", 64,
                               "--out", out, "--quiet", *extra)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])["validation"]
    assert {"accuracy", "balanced_accuracy", "auc", "model", "best_epoch", "temperature", "threshold",
            "wall_time_s"} <= set(summary)
    assert summary["model"] == str(out) and summary["best_epoch"] == 1
    assert (summary["threshold"] is None) == (task == "blood")
    assert out.exists() and out.with_suffix(".card.json").exists() and out.with_suffix(".ood.npz").exists()
    card = json.loads(out.with_suffix(".card.json").read_text())
    assert card["training"]["command"].startswith("python -m medclassify ")
    assert card["training"]["config"]["widths"] == list(TINY_WIDTHS)
    assert "ood" in card
    return out


def test_train_smoke_breast(capsys, tmp_path, fixture_data_dir):
    out = _train_smoke(capsys, tmp_path, fixture_data_dir, "breast", 30, "--mixup", 0.3, "--ema", 0.9)
    config = json.loads(out.with_suffix(".card.json").read_text())["training"]["config"]
    assert config["mixup"] == 0.3 and config["ema"] == 0.9
    code, stdout, _ = run_main(capsys, "evaluate", "--task", "breast", "--model", out, "--data-dir",
                               fixture_data_dir, "--json")
    assert code == 0 and json.loads(stdout)["n"] == 10


@pytest.mark.slow
def test_train_smoke_blood(capsys, tmp_path, fixture_data_dir):
    _train_smoke(capsys, tmp_path, fixture_data_dir, "blood", 96)


@pytest.mark.parametrize("bad", ["widths=32,x", "widths=32,0", "ema=1.0", "ema=-0.1", "mixup=-0.4", "epochs=0",
                                 "lr=0", "ensemble=0", "target-sensitivity=1.5", "finetune-lr=-1"])
def test_train_rejects_bad_settings_exit_2(capsys, tmp_path, bad):
    name, value = bad.split("=")
    code, _, err = run_main(capsys, "train", "--task", "breast", f"--{name}", value, "--out", tmp_path / "m.h5")
    assert code == 2 and f"--{name} must" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize("out, problem", [("model_breast", "must end in .h5"),
                                          ("a_file/model.h5", "cannot be created")])
def test_train_checks_out_before_training(capsys, tmp_path, monkeypatch, out, problem):
    from medclassify import training

    (tmp_path / "a_file").write_text("a file where the folder should be")
    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("trained before checking --out"))
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", tmp_path / out)
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_train_never_writes_over_a_shipped_model(capsys, monkeypatch, task):
    """Not even the other task's: a breast model saved as model_blood.h5 broke every blood prediction. Nor
    model_blood.keras, whose card, OOD statistics and int8 copy are the shipped model's files."""
    from medclassify import training

    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("trained before checking --out"))
    for shipped in ("blood", "breast"):
        path = get_task(shipped).model_path
        for out in (path, Path(os.path.relpath(path)), path.parent / "." / path.name, path.with_suffix(".keras")):
            code, _, err = run_main(capsys, "train", "--task", task, "--out", out, "--overwrite")
            assert code == 2 and f"would replace the shipped {shipped} model's files" in err, (out, err)
            assert f"MEDCLASSIFY_{shipped.upper()}_MODEL" in err and len(err.strip().splitlines()) == 1


def test_train_out_counts_the_files_named_after_the_model(capsys, tmp_path, monkeypatch):
    """x.keras beside x.h5 shares its card and OOD statistics; a committed variant card is a result too."""
    from medclassify import training

    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("trained before checking --out"))
    (tmp_path / "x.card.json").write_text("{}")
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", tmp_path / "x.keras")
    assert code == 2 and "x.card.json exists; add --overwrite" in err and len(err.strip().splitlines()) == 1
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", loop)
    assert code == 2 and err.startswith("error: --out") and len(err.strip().splitlines()) == 1


def test_train_replaces_an_existing_file_only_with_overwrite(capsys, tmp_path, monkeypatch, tiny_models):
    """With --overwrite, the old model's int8 copy and OOD statistics go: they would answer for the new one."""
    from medclassify import ood, training
    from medclassify.quantization import head_path, quantized_path

    out = tmp_path / "m.h5"
    out.write_bytes(b"an earlier model")
    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("trained before checking --out"))
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", out)
    assert code == 2 and "exists; add --overwrite" in err and out.read_bytes() == b"an earlier model"

    for stale in (quantized_path(out), head_path(out), ood.ood_path(out)):
        stale.write_bytes(b"derived from the earlier model")
    monkeypatch.setattr(training, "train", lambda cfg: tiny_models["breast"].result)
    monkeypatch.setattr(ood, "fit_ood", lambda task, model, data_dir=None: {})
    code, stdout, err = run_main(capsys, "train", "--task", "breast", "--out", out, "--overwrite")
    assert code == 0, err
    assert out.read_bytes() != b"an earlier model" and json.loads(stdout)["validation"]["model"] == str(out)
    assert not quantized_path(out).exists() and not head_path(out).exists() and not ood.ood_path(out).exists()


def test_train_out_in_a_folder_that_cannot_be_looked_into_is_one_line(capsys, tmp_path, monkeypatch):
    from medclassify import training

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)  # as stat() on a path under a folder without the x bit
    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("trained before checking --out"))
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", tmp_path / "locked" / "m.h5")
    assert code == 2 and "cannot be created (Permission denied)" in err and len(err.strip().splitlines()) == 1


def test_train_makes_a_missing_out_folder_only_when_it_saves(capsys, tmp_path, monkeypatch):
    from medclassify import training
    from medclassify.data import DataError

    def fails(cfg):
        raise DataError("offline")

    monkeypatch.setattr(training, "train", fails)
    code, _, err = run_main(capsys, "train", "--task", "breast", "--out", tmp_path / "runs" / "breast" / "m.h5")
    assert code == 1 and "offline" in err
    assert not (tmp_path / "runs").exists(), "a failed run left an empty folder"


def test_save_trained_makes_the_missing_folder(tmp_path, tiny_models):
    from medclassify.cards import card_path
    from medclassify.training import save_trained

    out = save_trained(tiny_models["breast"].result, tmp_path / "runs" / "breast" / "m.h5", command="test")
    assert out.is_file() and card_path(out).is_file()


def test_train_missing_data_exit_1(capsys, tmp_path, monkeypatch):
    from medclassify import data

    def offline(*args, **kwargs):
        raise data.DataError("offline")

    monkeypatch.setattr(data, "_download", offline)
    code, _, err = run_main(capsys, "train", "--task", "breast", "--data-dir", tmp_path, "--epochs", 1,
                            "--out", tmp_path / "m.h5", "--quiet")
    assert code == 1 and err.startswith("error:")
    assert not (tmp_path / "m.h5").exists()


# --------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("task", TASK_NAMES)
def test_evaluate_json(capsys, tiny_models, fixture_data_dir, task):
    code, stdout, _ = run_main(capsys, "evaluate", "--task", task, "--model", tiny_models[task].path,
                               "--data-dir", fixture_data_dir, "--json")
    assert code == 0
    assert len(stdout.strip().splitlines()) == 1  # one JSON object
    metrics = json.loads(stdout)
    assert METRIC_KEYS <= set(metrics)
    assert (BREAST_KEYS <= set(metrics)) == (task == "breast")
    assert not (BREAST_KEYS & set(metrics)) or task == "breast"
    spec = get_task(task)
    assert list(metrics["per_class"]) == list(spec.class_names)
    assert np.array(metrics["confusion_matrix"]).shape == (spec.num_classes, spec.num_classes)
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"] == (96 if task == "blood" else 10)
    assert metrics["split"] == "test" and metrics["task"] == task
    if task == "breast":
        assert metrics["threshold"] == pytest.approx(tiny_models[task].result.threshold)


def test_evaluate_text_bootstrap_and_write_card(capsys, tiny_models, fixture_data_dir, tmp_path):
    model = copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")
    code, stdout, _ = run_main(capsys, "evaluate", "--task", "breast", "--model", model, "--data-dir",
                               fixture_data_dir, "--bootstrap", 20, "--write-card", "--split", "val")
    assert code == 0
    for text in ("on the val split (n=10)", "accuracy", "sensitivity", "specificity", "95% CI", "confusion matrix",
                 "malignant"):
        assert text in stdout
    card = json.loads(model.with_suffix(".card.json").read_text())
    assert card["validation"]["n"] == 10 and "ci95" in card["validation"] and "val" not in card
    assert card["evaluation_commands"]["val"].startswith("python -m medclassify ")
    assert card["test"] is None  # only the split that was evaluated


def test_evaluate_write_card_without_a_card_still_prints_the_metrics(capsys, tiny_models, fixture_data_dir,
                                                                    tmp_path):
    model = copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")
    model.with_suffix(".card.json").unlink()
    code, stdout, err = run_main(capsys, "evaluate", "--task", "breast", "--model", model, "--data-dir",
                                 fixture_data_dir, "--json", "--write-card")
    assert code == 1 and json.loads(stdout)["n"] == 10
    warning, error = err.strip().splitlines()  # no card, so no validated threshold either: both are said
    assert "has no threshold in its card" in warning and error.startswith("error: card not updated:")


@pytest.mark.parametrize("command", [["quantize"], ["experiment", "--variant", "cnn"]])
def test_corrupt_data_is_one_line_for_every_command(capsys, tmp_path, tiny_models, command):
    (tmp_path / get_task("breast").file_name()).write_bytes(b"not the official file")
    if command == ["quantize"]:
        command = ["quantize", "--model", copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")]
    code, _, err = run_main(capsys, *command[:1], "--task", "breast", *command[1:], "--data-dir", tmp_path)
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_card_records_the_command_of_an_in_process_call(capsys, tiny_models, fixture_data_dir, tmp_path):
    model = copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")
    code, _, _ = run_main(capsys, "evaluate", "--task", "breast", "--model", model, "--data-dir", fixture_data_dir,
                          "--write-card", "--json")
    assert code == 0
    command = json.loads(model.with_suffix(".card.json").read_text())["evaluation_commands"]["test"]
    assert command.startswith("python -m medclassify evaluate --task breast")


def test_evaluate_missing_data_and_model_exit_1(capsys, tiny_models, tmp_path, monkeypatch):
    from medclassify import data

    monkeypatch.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(data.DataError("offline")))
    code, _, err = run_main(capsys, "evaluate", "--task", "blood", "--model", tiny_models["blood"].path,
                            "--data-dir", tmp_path)
    assert code == 1 and "error:" in err
    code, _, err = run_main(capsys, "evaluate", "--task", "blood", "--model", tmp_path / "missing.h5",
                            "--data-dir", tmp_path)
    assert code == 1 and "error:" in err


def test_fit_ood_cli(capsys, tiny_models, fixture_data_dir, tmp_path):
    model = copy_model(tiny_models["blood"].path, tmp_path / "b.h5")
    model.with_suffix(".ood.npz").unlink()
    code, stdout, _ = run_main(capsys, "fit-ood", "--task", "blood", "--model", model, "--data-dir", fixture_data_dir)
    assert code == 0
    settings = json.loads(stdout)
    assert settings["distance_threshold"] == pytest.approx(tiny_models["blood"].ood["distance_threshold"], rel=1e-4)
    assert model.with_suffix(".ood.npz").exists()


def test_ood_check_cli_writes_the_flag_rates_into_the_card(capsys, tiny_models, fixture_data_dir, tmp_path):
    from medclassify.oodcheck import photo_crops

    model = copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")
    code, stdout, err = run_main(capsys, "ood-check", "--task", "breast", "--model", model, "--data-dir",
                                 fixture_data_dir, "--write-card")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n_test"] == 10 and report["n_cross_task"] == 96
    assert report["n_photos"] + report["n_photos_refused"] == len(photo_crops())
    assert report["precision"] in ("int8", "float")
    assert report["cross_task_flagged"] == 1.0  # colour blood cells are never taken for ultrasound
    for key in ("test_flagged", "photos_flagged"):
        assert 0.0 <= report[key] <= 1.0
    card = json.loads(model.with_suffix(".card.json").read_text())
    assert card["ood_check"] == {**report, "command": card["ood_check"]["command"]}
    assert card["ood_check"]["command"].startswith("python -m medclassify ood-check --task breast")


# --------------------------------------------------------------------------- predict

def _check_prediction(line: dict, task: str, threshold=None):
    spec = get_task(task)
    assert line["task"] == task
    assert line["label"] in spec.class_names
    assert spec.class_names[line["class_index"]] == line["label"]
    assert list(line["probabilities"]) == list(spec.class_names)
    assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert isinstance(line["ood"], bool) and isinstance(line["warnings"], list)
    if task == "breast":
        assert line["p_malignant"] == pytest.approx(line["probabilities"]["malignant"], abs=1e-6)
        assert line["threshold"] == pytest.approx(threshold)
        assert (line["label"] == "malignant") == (line["p_malignant"] >= threshold)
    else:
        assert "p_malignant" not in line
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_predict_json_good_and_awkward_files(capsys, tiny_models, fixture_images, awkward_files, task):
    good = [info.path for info in fixture_images.values() if info.task == task]
    awkward = [awkward_files[kind] for kind in sorted(AWKWARD_KINDS)]
    missing = awkward_files["dicom"].parent / "does-not-exist.png"
    files = good + awkward + [missing]
    code, stdout, err = run_main(capsys, "predict", "--task", task, "--model", tiny_models[task].path, "--json",
                                 "--no-progress", "--batch-size", 4, *files)
    lines = json_lines(stdout)
    assert [line["file"] for line in lines] == [str(f) for f in files]  # one line per file, in order
    assert code == 1  # some failed
    threshold = tiny_models[task].result.threshold
    by_file = {line["file"]: line for line in lines}
    for path in good:
        _check_prediction(by_file[str(path)], task, threshold)
    for kind in AWKWARD_KINDS:
        line = by_file[str(awkward_files[kind])]
        if AWKWARD_KINDS[kind] == "ok":
            _check_prediction(line, task, threshold)
        elif AWKWARD_KINDS[kind] == "error":
            assert set(line) == {"file", "error"}, kind
            assert line["error"] and "\n" not in line["error"], kind
    assert "no such file" in by_file[str(missing)]["error"]
    assert err == ""  # --no-progress: nothing on stderr


def test_predict_all_good_exit_0_and_text_output(capsys, tiny_models, fixture_images):
    good = sorted(str(info.path) for info in fixture_images.values() if info.task == "blood")
    code, stdout, _ = run_main(capsys, "predict", "--task", "blood", "--model", tiny_models["blood"].path,
                               "--no-progress", *good)
    assert code == 0
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert [row[0] for row in rows] == good
    names = get_task("blood").class_names
    for row in rows:
        assert row[1] in names and 0.0 <= float(row[2]) <= 1.0


def test_predict_folders_and_globs(capsys, tiny_models, fixture_images, tmp_path):
    folder = tmp_path / "uploads"
    (folder / "nested").mkdir(parents=True)
    picks = sorted(info.path for info in fixture_images.values() if info.task == "breast")
    for i, path in enumerate(picks):
        shutil.copyfile(path, (folder / "nested" if i % 2 else folder) / path.name)
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    code, stdout, _ = run_main(capsys, "predict", "--task", "breast", "--model", tiny_models["breast"].path,
                               "--json", "--no-progress", folder)
    assert code == 0
    assert sorted(Path(line["file"]).name for line in json_lines(stdout)) == sorted(p.name for p in picks)
    code, stdout, _ = run_main(capsys, "predict", "--task", "breast", "--model", tiny_models["breast"].path,
                               "--json", "--no-progress", str(folder / "**" / "*.png"))
    assert code == 0
    assert sorted(Path(line["file"]).name for line in json_lines(stdout)) == sorted(p.name for p in picks
                                                                                    if p.suffix == ".png")
    code, stdout, _ = run_main(capsys, "predict", "--task", "breast", "--model", tiny_models["breast"].path,
                               "--json", "--no-progress", str(folder / "*.nothing"))
    assert code == 1 and json_lines(stdout) == [{"file": str(folder / "*.nothing"), "error": json_lines(stdout)[0]["error"]}]


def test_predict_progress_bar_goes_to_stderr(capsys, tiny_models, fixture_images):
    good = [str(info.path) for info in fixture_images.values() if info.task == "breast"]
    code, stdout, err = run_main(capsys, "predict", "--task", "breast", "--model", tiny_models["breast"].path,
                                 "--json", *good)
    assert code == 0 and len(json_lines(stdout)) == len(good)  # stdout stays pure JSON lines
    assert "predict breast" in err


def test_predict_model_problems(capsys, tmp_path, fixture_images):
    image = str(next(iter(fixture_images.values())).path)
    code, stdout, err = run_main(capsys, "predict", "--task", "blood", "--model", tmp_path / "missing.h5",
                                 "--no-progress", image)
    assert code == 1 and "missing.h5" in err and "not found" in err and stdout == ""
    broken = tmp_path / "broken.h5"
    broken.write_text("not a model")
    code, _, err = run_main(capsys, "predict", "--task", "blood", "--model", broken, "--no-progress", image)
    assert code == 1 and "cannot load" in err


def test_predict_wrong_task_for_model_is_reported(capsys, tiny_models, fixture_images):
    """A breast model asked to do blood: the input shape differs, which must not crash with a traceback."""
    image = str(next(info.path for info in fixture_images.values() if info.task == "blood"))
    try:
        code, _, err = run_main(capsys, "predict", "--task", "blood", "--model", tiny_models["breast"].path,
                                "--no-progress", image)
    except Exception as exc:  # pragma: no cover - reported as a bug
        pytest.fail(f"predict crashed instead of reporting the mismatch: {type(exc).__name__}: {exc}")
    assert code == 1 and "is not a blood model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_and_export_name_a_model_of_the_other_task(capsys, tiny_models, fixture_data_dir, tmp_path, command):
    extra = ["--data-dir", fixture_data_dir] if command == "evaluate" else ["--out", tmp_path / "export"]
    code, _, err = run_main(capsys, command, "--task", "breast", "--model", tiny_models["blood"].path, *extra)
    assert code == 1 and "is not a breast model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_entry_point_predict(tiny_models, fixture_images, awkward_files):
    """The real ``python -m medclassify predict`` process: JSON lines on stdout and exit status 1 / 0."""
    good = [str(info.path) for info in fixture_images.values() if info.task == "blood"][:2]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    base = [sys.executable, "-m", "medclassify", "predict", "--task", "blood", "--model",
            str(tiny_models["blood"].path), "--json", "--no-progress"]
    proc = subprocess.run(base + good + [str(awkward_files["text_renamed_png"])], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = json_lines(proc.stdout)
    assert [line["file"] for line in lines] == good + [str(awkward_files["text_renamed_png"])]
    assert "error" in lines[-1] and "label" in lines[0]


def test_predict_text_gives_no_label_for_an_image_unlike_the_training_data(capsys, fixture_images):
    """As in the app: the shipped breast model sees a stained blood cell, and the line says so instead of a label."""
    from medclassify.inference import get_predictor

    predictor = get_predictor("breast")
    cell = next(str(info.path) for info in fixture_images.values() if info.task == "blood")
    scan = next(str(info.path) for info in fixture_images.values()
                if info.task == "breast" and not predictor.predict(info.path).ood)
    assert predictor.predict(cell).ood
    code, stdout, _ = run_main(capsys, "predict", "--task", "breast", "--no-progress", cell, scan)
    assert code == 0
    rows = {row[0]: row for row in (line.split("\t") for line in stdout.splitlines())}
    assert rows[cell][1:3] == ["no reliable answer", "-"] and rows[cell][3].startswith("WARNING: ")
    assert rows[scan][1] in get_task("breast").class_names and rows[scan][2].startswith("P(malignant)=")


@pytest.mark.slow
def test_entry_point_predict_survives_a_file_name_that_is_not_utf8(tmp_path, fixture_images):
    """Linux file names are bytes; a strict UTF-8 stdout must not turn one into a traceback."""
    scan = next(info.path for info in fixture_images.values() if info.task == "breast")
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/scan\xff.png"))
    shutil.copyfile(scan, odd)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([sys.executable, "-m", "medclassify", "predict", "--task", "breast", "--no-progress",
                           str(odd)], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    line = proc.stdout.decode("utf-8").strip()
    assert line.startswith(str(tmp_path)) and "scan\\udcff.png\t" in line and "Traceback" not in line


def test_readme_train_example_is_the_shipped_breast_recipe():
    """The README's `train` example claims to be the shipped recipe: parse it as the CLI would and compare."""
    import dataclasses
    import re
    import shlex

    from medclassify.cli import build_parser, train_config
    from medclassify.experiments import SHIPPED, VARIANTS

    readme = (REPO_ROOT / "README.md").read_text()
    command = re.search(r"medclassify (train --task breast [^\n]*\\\n[^\n#]*)", readme).group(1)
    args = build_parser().parse_args(shlex.split(command.replace("\\\n", " ")))
    shipped = VARIANTS["breast"][SHIPPED["breast"]]
    assert dataclasses.replace(train_config(args), verbose=shipped.verbose) == shipped


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_train_defaults_are_the_libraries(task):
    """`train` repeats TrainConfig's defaults in its options (for --help): they must not drift apart."""
    import dataclasses

    from medclassify.cli import build_parser, train_config
    from medclassify.training import TrainConfig

    args = build_parser().parse_args(["train", "--task", task, "--out", "m.h5"])
    library = TrainConfig(task=task)
    assert dataclasses.replace(train_config(args), verbose=library.verbose) == library


def test_help_shows_every_default_worth_showing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed SEED random seed (weights, shuffling, augmentation) (default: 0)", "(default: 0.0)",
                  "(default: 32,64,128)", "(default: 0.95)"):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("command", ["fit-ood", "ood-check", "stability"])
def test_ood_commands_name_a_model_of_the_other_task(capsys, tiny_models, fixture_data_dir, command):
    code, _, err = run_main(capsys, command, "--task", "breast", "--model", tiny_models["blood"].path,
                            "--data-dir", fixture_data_dir)
    assert code == 1 and "is not a breast model" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- review fixes (session 10)

@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "fit-ood", "ood-check", "quantize",
                                     "stability"])
def test_a_missing_model_file_is_the_same_one_line_and_exit_1_for_every_command(capsys, tmp_path, fixture_images,
                                                                              command):
    missing = tmp_path / "nope.h5"
    extra = {"predict": ["--no-progress", next(iter(fixture_images.values())).path],
             "export": ["--out", tmp_path / "export"]}.get(command, ["--data-dir", tmp_path])
    code, stdout, err = run_main(capsys, command, "--task", "blood", "--model", missing, *extra)
    assert (code, stdout, err) == (1, "", f"error: model file {missing} not found\n")


def test_evaluate_names_a_missing_model_file_when_called_as_a_library(tmp_path):
    from medclassify.evaluation import evaluate

    with pytest.raises(FileNotFoundError, match=r"^model file .*nope\.h5 not found$"):
        evaluate("blood", tmp_path / "nope.h5", data_dir=tmp_path)


def _option_help(parser, action) -> str:
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


def test_help_shows_the_default_of_every_option_that_has_one():
    import argparse

    from medclassify.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked, missing = 0, []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
                continue
            checked += 1
            if f"(default: {action.default})" not in _option_help(sub, action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert checked > 20 and missing == []


def test_train_limit_help_says_that_validation_is_subsampled_too():
    import argparse

    from medclassify.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = subparsers.choices["train"]
    limit = _option_help(train, next(a for a in train._actions if "--limit" in a.option_strings))
    assert "validation" in limit and "N/4" in limit and "not comparable" in limit


@pytest.mark.parametrize("balanced_accuracy", [0.5, 0.9])
def test_train_stdout_is_only_the_summary(capsys, tmp_path, monkeypatch, balanced_accuracy):
    """Keras writes its per-epoch lines to stdout: they go to stderr, beside the run's own per-epoch line, and
    stdout is only the JSON summary."""
    from types import SimpleNamespace

    from medclassify import ood, training

    seen = {}

    def fake_train(cfg):
        seen["verbose"] = cfg.verbose
        print("Epoch 1/1")  # as Keras's fit(verbose=2) does
        print("1/1 - 13s - 13s/step - accuracy: 0.5000 - loss: 0.6931")
        print("  epoch 1: val_auc=0.5000 (best 0.5000 at 1)", file=sys.stderr)  # as the selector does
        return SimpleNamespace(val_metrics={"accuracy": 0.5, "balanced_accuracy": balanced_accuracy, "auc": 0.5,
                                            "n": 8},
                               best_epoch=1, temperature=1.0, threshold=0.4, wall_time_s=13.0)

    def fake_save(result, out, command=None):
        print("saved")  # anything said while saving goes to stderr too
        Path(out).write_bytes(b"model")
        Path(out).with_suffix(".card.json").write_text("{}")
        return Path(out)

    def fake_fit_ood(task, model, data_dir=None):
        Path(model).with_suffix(".ood.npz").write_bytes(b"ood")
        return {}

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(training, "save_trained", fake_save)
    monkeypatch.setattr(ood, "fit_ood", fake_fit_ood)
    out = tmp_path / "m.h5"
    code, stdout, err = run_main(capsys, "train", "--task", "breast", "--epochs", 1, "--out", out)
    assert code == 0 and seen["verbose"] == 2
    assert len(stdout.splitlines()) == 1, stdout
    summary = json.loads(stdout)["validation"]
    assert summary["model"] == str(out)
    assert summary["card"] == str(out.with_suffix(".card.json")) and Path(summary["card"]).exists()
    assert summary["ood"] == str(out.with_suffix(".ood.npz")) and Path(summary["ood"]).exists()
    assert "epoch 1: val_auc=" in err and "Epoch 1/1" in err and "saved" in err  # the loss still shows
    # balanced accuracy 0.5 on two classes: a smoke run's look, said on stderr so nobody takes it for a model
    warned = "warning: validation balanced accuracy 0.500 is at chance level (0.500)" in err
    assert warned == (balanced_accuracy == 0.5) and ("chance" in err) == warned


def test_predict_text_keeps_one_line_per_file_whatever_the_name(capsys, tiny_models, fixture_images, tmp_path):
    scan = next(info.path for info in fixture_images.values() if info.task == "blood")
    odd = tmp_path / "two\nlines\tand a tab\x1b.png"
    shutil.copyfile(scan, odd)
    missing = tmp_path / "gone\n.png"
    model = tiny_models["blood"].path
    code, stdout, _ = run_main(capsys, "predict", "--task", "blood", "--model", model, "--no-progress", odd, missing)
    assert code == 1
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert len(rows) == 2, stdout
    assert rows[0][0] == f"{tmp_path}/two\\nlines\\tand a tab\\x1b.png" and rows[0][3:] in ([], ["close call"])
    assert rows[1][0] == f"{tmp_path}/gone\\n.png" and rows[1][1].startswith("error: ") and len(rows[1]) == 2
    code, stdout, _ = run_main(capsys, "predict", "--task", "blood", "--model", model, "--no-progress", "--json",
                               odd)
    assert code == 0 and [line["file"] for line in json_lines(stdout)] == [str(odd)]  # JSON keeps the name as is


def test_predict_a_glob_that_matches_nothing_says_so(capsys, tiny_models, tmp_path):
    pattern = str(tmp_path / "nomatch" / "**" / "*.png")
    plain = str(tmp_path / "nomatch.png")
    model = tiny_models["blood"].path
    code, stdout, _ = run_main(capsys, "predict", "--task", "blood", "--model", model, "--no-progress", "--json",
                               pattern, plain)
    assert code == 1
    assert json_lines(stdout) == [{"file": pattern, "error": f"no file matches {pattern}"},
                                  {"file": plain, "error": f"no such file: {plain}"}]
    code, stdout, _ = run_main(capsys, "predict", "--task", "blood", "--model", model, "--no-progress", pattern)
    assert code == 1 and stdout == f"{pattern}\terror: no file matches {pattern}\n"


@pytest.mark.parametrize("markers", [True, False])
def test_report_says_when_it_rewrote_the_readme(capsys, tmp_path, monkeypatch, markers):
    from medclassify import experiments

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\n" if markers else "# x\n")

    def fake_write_report():
        out = tmp_path / "results" / "comparison.md"
        out.parent.mkdir()
        out.write_text("# Comparison\n\nnew\n")
        experiments.replace_between_markers(readme, "results", "new")
        return out

    monkeypatch.setattr(experiments, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(experiments, "write_report", fake_write_report)
    code, stdout, _ = run_main(capsys, "report")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == str(tmp_path / "results" / "comparison.md")
    assert lines[1:] == ([f"{readme}: Results section rewritten"] if markers else [])


@pytest.mark.parametrize("command", ["evaluate", "experiment"])
@pytest.mark.parametrize("value, problem", [("-5", "must be 0 or more, got -5"), ("ten", "must be a whole number")])
def test_bootstrap_must_be_a_count(capsys, command, value, problem):
    """-5 used to run, and `--write-card` stored 'bootstrap_resamples: -5' with no intervals."""
    extra = ["--variant", "cnn"] if command == "experiment" else []
    with pytest.raises(SystemExit) as info:
        main([command, "--task", "breast", *extra, "--bootstrap", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument --bootstrap: {problem}" in err
