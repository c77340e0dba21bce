"""Answer stability under resize round trips (medclassify.robustness and `medclassify stability`)."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medclassify import robustness
from medclassify.data import load_split
from medclassify.preprocessing import to_model_input
from medclassify.registry import get_task

from conftest import task_images
from test_cli import copy_model, run_main


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]))
def test_a_28_px_round_trip_is_the_image_itself(seed, channels):
    """The reference answers come from the 28-px PNG, which must reach the model unchanged."""
    image = np.random.default_rng(seed).integers(0, 256, (28, 28, channels), dtype=np.uint8)
    task = "breast" if channels == 1 else "blood"
    assert np.array_equal(to_model_input(io.BytesIO(robustness.round_trip_bytes(image, 28)), task), image)


def test_round_trips_enlarge_encode_and_come_back_close_but_not_equal(fixture_images):
    for task in ("blood", "breast"):
        image = np.asarray(Image.open(task_images(fixture_images, task)[0]))
        image = image[..., None] if image.ndim == 2 else image
        png = robustness.round_trip_bytes(image, 224)
        jpeg = robustness.round_trip_bytes(image, 224, "JPEG")
        assert decoded(png).format == "PNG" and decoded(png).size == (224, 224)
        assert decoded(jpeg).format == "JPEG" and decoded(jpeg).size == (224, 224)
        for data in (png, jpeg):
            back = to_model_input(io.BytesIO(data), task).astype(int)
            difference = np.abs(back - image.astype(int))
            assert 0 < difference.mean() < 12  # softened, yet the same picture


def test_only_sides_the_app_merely_resizes_are_accepted():
    breast, blood = get_task("breast"), get_task("blood")
    assert robustness.check_sides(breast, [500, 64]) == (500, 64)  # a full-size ultrasound is resized whole
    assert robustness.check_sides(blood, (64, 128, 224)) == (64, 128, 224)  # MedMNIST+ sizes: only resized
    with pytest.raises(ValueError, match="crops a 500x500 blood image"):
        robustness.check_sides(blood, [64, 500])
    with pytest.raises(ValueError, match="enlarges the 28-px image, so the side must exceed 28"):
        robustness.check_sides(breast, [28])
    with pytest.raises(ValueError, match="at least one side"):
        robustness.check_sides(breast, [])


class BrightnessPredictor:
    """A stand-in for the served model: P(class 0) is the mean brightness of what the app prepared, the rest
    shared by the other classes, and the answer is the likeliest class."""

    def __init__(self, task: str, refuse_larger_than: int | None = None):
        self.spec = get_task(task)
        self.precision = "float"
        self.refuse_larger_than = refuse_larger_than
        self.seen = []

    def probabilities(self, data: bytes) -> np.ndarray:
        p = to_model_input(io.BytesIO(data), self.spec).mean() / 255.0
        rest = (1 - p) / (self.spec.num_classes - 1)
        return np.array([p] + [rest] * (self.spec.num_classes - 1))

    def predict_many(self, sources, prefetch=True):
        for data in sources:
            self.seen.append(decoded(data).size[0])
            if self.refuse_larger_than and decoded(data).size[0] > self.refuse_larger_than:
                yield data, "image is too large"
                continue
            probs = self.probabilities(data)
            index = int(probs.argmax())
            yield data, SimpleNamespace(class_index=index, probabilities=dict(zip(self.spec.class_names, probs)))


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_the_report_counts_changed_answers_and_movement_against_its_own_reference(task, fixture_data_dir):
    predictor = BrightnessPredictor(task)
    report = robustness.stability_report(task, split="val", sides=(64, 128), data_dir=fixture_data_dir,
                                         predictor=predictor)
    split = load_split(task, "val", data_dir=fixture_data_dir)
    originals = [robustness.round_trip_bytes(im, 28) for im in split.images]
    reference = np.stack([predictor.probabilities(d) for d in originals])
    labels = split.labels.ravel()
    assert report["n"] == len(split.images) and report["split"] == "val" and report["precision"] == "float"
    assert report["accuracy"] == pytest.approx(float((reference.argmax(1) == labels).mean()))
    assert list(report["round_trips"]) == ["png64", "png128", "jpeg128_q75"]
    for name, (fmt, side) in {"png64": ("PNG", 64), "png128": ("PNG", 128), "jpeg128_q75": ("JPEG", 128)}.items():
        moved = np.stack([predictor.probabilities(robustness.round_trip_bytes(im, side, fmt)) for im in split.images])
        shift = np.abs(moved - reference).max(axis=1)
        trip = report["round_trips"][name]
        assert trip["changed"] == int((moved.argmax(1) != reference.argmax(1)).sum())
        assert trip["accuracy"] == pytest.approx(float((moved.argmax(1) == labels).mean()))
        assert trip["mean_shift"] == pytest.approx(shift.mean())
        assert trip["p90_shift"] == pytest.approx(np.quantile(shift, 0.9))
        assert trip["max_shift"] == pytest.approx(shift.max()) and trip["max_shift"] > 0
        if task == "breast":  # which way the answers moved, malignant (0) being the flag
            was, now = reference.argmax(1) == 0, moved.argmax(1) == 0
            assert (trip["flag_lost"], trip["flag_gained"]) == ((was & ~now).sum(), (~was & now).sum())
            assert trip["flag_lost"] + trip["flag_gained"] == trip["changed"]
        else:
            assert "flag_lost" not in trip
    assert sorted(set(predictor.seen)) == [28, 64, 128]


def test_a_refused_round_trip_image_is_an_error_not_a_smaller_denominator(fixture_data_dir):
    with pytest.raises(ValueError, match=r"a round-trip image was refused \(image is too large\)"):
        robustness.stability_report("breast", sides=(64,), data_dir=fixture_data_dir,
                                    predictor=BrightnessPredictor("breast", refuse_larger_than=28))


def test_the_line_names_the_worst_round_trip_of_each_split_and_its_commands():
    def split(n, changed, accuracy):
        trips = {"png64": {"changed": changed - 1, "accuracy": 0.9, "mean_shift": 0.01, "p90_shift": 0.02,
                           "max_shift": 0.3},
                 "jpeg64_q75": {"changed": changed, "accuracy": accuracy, "mean_shift": 0.04, "p90_shift": 0.12,
                                "max_shift": 0.5}}
        return {"n": n, "accuracy": 0.95, "round_trips": trips, "command": f"python -m medclassify stability n{n}"}

    line = robustness.stability_line({"precision": "int8", "val": split(78, 2, 0.9359), "test": split(156, 6, 0.8462)})
    assert line.startswith("Answers of the int8 copy that serves when a split's image is enlarged")
    assert "(png64, jpeg64_q75)" in line
    assert "val: 2 of 78 answers changed (jpeg64_q75, the round trip that changed most)" in line
    assert "test: 6 of 156 answers changed" in line
    assert "moved by 0.040 on average (90th percentile 0.120)" in line
    assert "accuracy 0.9500 on the split's images and 0.8462 after that round trip" in line
    assert "`python -m medclassify stability n78`, `python -m medclassify stability n156`" in line
    assert robustness.stability_line({}) == ""
    assert "int8" not in robustness.stability_line({"precision": "float", "val": split(78, 2, 0.9)})


def test_the_cli_writes_each_split_into_the_card_beside_the_other(capsys, tiny_models, fixture_data_dir, tmp_path):
    model = copy_model(tiny_models["breast"].path, tmp_path / "model_breast.h5")
    for split in ("val", "test"):
        code, stdout, err = run_main(capsys, "stability", "--task", "breast", "--model", model, "--data-dir",
                                     fixture_data_dir, "--split", split, "--sides", "64", "--write-card")
        assert code == 0, err
        report = json.loads(stdout)
        assert report["split"] == split and list(report["round_trips"]) == ["png64", "jpeg64_q75"]
    card = json.loads(model.with_suffix(".card.json").read_text())
    section = card["stability"]
    assert section["precision"] == report["precision"]
    assert section["test"] == {**report, "command": section["test"]["command"]}
    assert section["val"]["split"] == "val" and section["val"]["n"] == len(load_split("breast", "val",
                                                                                      data_dir=fixture_data_dir).images)
    assert section["val"]["command"].startswith("python -m medclassify stability --task breast --model")
    assert "--split val" in section["val"]["command"] and "--split test" in section["test"]["command"]


def test_the_cli_refuses_a_side_the_app_would_crop_in_one_line(capsys, tiny_models, fixture_data_dir):
    code, stdout, err = run_main(capsys, "stability", "--task", "blood", "--model", tiny_models["blood"].path,
                                 "--data-dir", fixture_data_dir, "--sides", "500")
    assert (code, stdout) == (1, "")
    assert err.startswith("error: side 500: the app crops a 500x500 blood image") and len(err.splitlines()) == 1


def test_the_worst_round_trip_breaks_ties_by_the_larger_shift_and_the_line_gives_the_direction():
    report = {"task": "breast", "n": 156, "accuracy": 0.88, "command": "c", "round_trips": {
        "png64": {"changed": 23, "accuracy": 0.78, "mean_shift": 0.115, "p90_shift": 0.4, "flag_lost": 20,
                  "flag_gained": 3},
        "jpeg224_q75": {"changed": 23, "accuracy": 0.77, "mean_shift": 0.116, "p90_shift": 0.4, "flag_lost": 21,
                        "flag_gained": 2}}}
    assert robustness.worst_round_trip(report)[0] == "jpeg224_q75"
    line = robustness.stability_line({"test": report})
    assert "23 of 156 answers changed (jpeg224_q75, the round trip that changed most: 2 to 'malignant', 21 away " \
           "from it)" in line
    blood = {**report, "task": "blood", "n": 3421, "round_trips": {"png64": {
        "changed": 166, "accuracy": 0.94, "mean_shift": 0.05, "p90_shift": 0.1}}}
    assert "test: 166 of 3,421 answers changed (png64, the round trip that changed most)" in \
        robustness.stability_line({"test": blood})


def test_a_stored_split_replaces_the_section_when_the_other_was_measured_differently(tmp_path):
    from medclassify.cards import read_card, write_card

    model = tmp_path / "model_breast.h5"
    write_card(model, {"name": "model_breast"})

    def report(split, precision="int8", trips=("png64", "jpeg64_q75")):
        return {"split": split, "precision": precision, "n": 3, "round_trips": {t: {"changed": 1} for t in trips}}

    robustness.store_stability(model, report("val"), "c-val")
    section = robustness.store_stability(model, report("test"), "c-test")
    assert set(section) == {"precision", "val", "test"} and section["test"]["command"] == "c-test"
    assert read_card(model)["stability"] == section and read_card(model)["name"] == "model_breast"
    # measured on another precision: the val numbers no longer describe the model that answers
    section = robustness.store_stability(model, report("test", precision="float"), "c-float")
    assert set(section) == {"precision", "test"} and section["precision"] == "float"
    # other round trips: one description per section, so the other split goes too
    robustness.store_stability(model, report("val", precision="float"), "c-val")
    section = robustness.store_stability(model, report("test", precision="float", trips=("png224",)), "c-224")
    assert set(section) == {"precision", "test"} and list(section["test"]["round_trips"]) == ["png224"]
