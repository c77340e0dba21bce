"""The shipped models on the full official test split: the quality bar the project promises.

Needs the official MedMNIST files (``realdata``).  The thresholds are the
acceptance targets for ``model_blood.h5`` / ``model_breast.h5`` at the repo
root; they are checked through the same CLI users run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medclassify.cli import main
from medclassify.experiments import RELEASE_FLOORS, floor_shortfalls, target_misses
from medclassify.registry import get_task

pytestmark = pytest.mark.realdata

#: Test-split metrics the shipped models must reach (raise them as the models improve): the model issue's
#: blood bars (accuracy >= 0.975, AUC >= 0.998) and, for breast, the foundation issue's AUC bar (the
#: reference project's 0.913; the model issue's 0.93 is not reached yet, see the README).  The same floors
#: veto variants in the choice of the shipped one (``experiments.validation_choice``).
THRESHOLDS = RELEASE_FLOORS
#: Tasks whose shipped model the README says meets every bar of the model issue (#3), calibration (ECE) included:
#: a retrained model that loses one fails here, not only in the report's "missed".
MEETS_EVERY_TARGET = ("blood",)
#: Minimum agreement of ``predict`` on 28-px JPEG copies (quality 95) of the blood test images with the true labels.
BLOOD_JPEG_AGREEMENT = 0.93
CLI_FILES = 300
OFFICIAL_TEST_SIZE = {"blood": 3421, "breast": 156}


def _evaluate(capsys, task: str, data_dir: Path) -> dict:
    code = main(["evaluate", "--task", task, "--data-dir", str(data_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("task", sorted(THRESHOLDS))
def test_shipped_model_meets_its_thresholds(capsys, realdata_dir, task):
    spec = get_task(task)
    assert spec.model_path.exists(), f"shipped model {spec.model_path} is missing"
    metrics = _evaluate(capsys, task, realdata_dir)
    assert metrics["model"] == str(spec.model_path)
    assert metrics["split"] == "test" and metrics["n"] == OFFICIAL_TEST_SIZE[task]
    shortfalls = floor_shortfalls(task, metrics)
    assert not shortfalls, (
        f"{spec.model_path.name} on the official {task} test split (n={metrics['n']}): "
        + ", ".join(f"{name} {value} is below {minimum}" for name, (value, minimum) in shortfalls.items()))
    if task in MEETS_EVERY_TARGET:
        misses = target_misses(task, metrics)
        assert not misses, f"{spec.model_path.name} misses the model issue's bars: " + ", ".join(
            f"{name} {value} (target {rule} {bar})" for name, (value, rule, bar) in misses.items())


def test_blood_predict_on_jpeg_copies_of_the_test_split(capsys, realdata_dir, tmp_path):
    """End to end through files: JPEG (quality 95) 28-px copies of ALL blood test images."""
    from medclassify.data import load_split
    from medclassify.inference import Predictor

    spec = get_task("blood")
    test = load_split("blood", "test", data_dir=realdata_dir, download=False)
    cli_dir, rest_dir = tmp_path / "cli", tmp_path / "rest"
    cli_dir.mkdir()
    rest_dir.mkdir()
    paths, truth = [], {}
    for i, (image, label) in enumerate(zip(test.images, test.labels)):
        path = (cli_dir if i < CLI_FILES else rest_dir) / f"blood_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
        truth[str(path)] = int(label)
    assert len(paths) == OFFICIAL_TEST_SIZE["blood"]

    # All files through the batch API (what the CLI uses underneath)...
    predictor = Predictor("blood")
    results = list(predictor.predict_many([str(p) for p in paths], batch_size=512))
    assert [src for src, _ in results] == [str(p) for p in paths]
    errors = [(src, r) for src, r in results if isinstance(r, str)]
    assert not errors, errors[:5]
    agreement = np.mean([r.class_index == truth[src] for src, r in results])

    # ...and a few hundred through the real command line.
    code = main(["predict", "--task", "blood", "--json", "--no-progress", str(cli_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == CLI_FILES
    cli_agreement = np.mean([spec.class_names.index(line["label"]) == truth[line["file"]] for line in lines])
    by_file = {src: r for src, r in results}
    assert all(line["label"] == by_file[line["file"]].label for line in lines)  # CLI == batch API

    assert agreement >= BLOOD_JPEG_AGREEMENT, (
        f"predict on JPEG copies agrees with the true label on {agreement:.4f} of {len(paths)} blood test images "
        f"(CLI subset: {cli_agreement:.4f} of {CLI_FILES}); required {BLOOD_JPEG_AGREEMENT}")


@pytest.mark.parametrize("task", sorted(THRESHOLDS))
def test_shipped_model_is_served_by_its_int8_copy_which_meets_the_same_bars(realdata_dir, task):
    """What the app and CLI serve (the int8 copy) reproduces its card's numbers and meets the model's bars."""
    from medclassify.cards import read_card
    from medclassify.data import load_split
    from medclassify.evaluation import compute_metrics
    from medclassify.inference import Predictor
    from medclassify.quantization import allowed_changes

    spec = get_task(task)
    predictor = Predictor(task, warm=False)
    assert predictor.precision == "int8", f"{spec.model_path.name}'s int8 copy is missing or does not match its card"
    serving = read_card(spec.model_path)["serving"]
    assert serving["val"]["decisions_changed"] <= allowed_changes(serving["val"]["n"])
    assert serving["calibration"]["split"] == "train"
    if spec.decision == "threshold":  # the copy keeps the validation sensitivity the threshold was chosen for
        target = read_card(spec.model_path)["training"]["config"]["target_sensitivity"]
        assert serving["val"]["int8_metrics"]["sensitivity"] >= target
    test = load_split(task, "test", data_dir=realdata_dir, download=False)
    probs = np.concatenate([predictor.predict_arrays(test.images[i:i + 256])[0] for i in range(0, len(test.images), 256)])
    metrics = compute_metrics(spec, test.labels, probs, threshold=predictor.threshold)
    for name, value in serving["test"]["int8_metrics"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    shortfalls = floor_shortfalls(task, metrics)
    assert not shortfalls, f"the served int8 {task} model on the official test split: {shortfalls}"


def test_breast_scans_of_12_to_14_bits_stored_unscaled_in_16_bit_pngs_get_no_answer(realdata_dir):
    """README (bit depth): such a scan would be read 4-16x too dark.  12-bit ones the model used to flag, but
    14-bit ones it answered (an input review found 38 of 51 decisions changed), so every one is refused."""
    import io

    from medclassify.data import load_split
    from medclassify.inference import get_predictor
    from medclassify.preprocessing import ImageError

    predictor = get_predictor("breast")
    images = load_split("breast", "val", data_dir=str(realdata_dir)).images[..., 0]
    for bits in (12, 14):
        for image in images:
            full_size = np.asarray(Image.fromarray(image).resize((500, 500), Image.Resampling.BICUBIC))
            buffer = io.BytesIO()
            Image.fromarray(full_size.astype(np.uint16) << (bits - 8)).save(buffer, format="PNG")
            with pytest.raises(ImageError, match="stored unscaled"):
                predictor.predict(buffer.getvalue())