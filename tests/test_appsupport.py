"""The app's non-UI helpers (medclassify.appsupport): per-file processing, batch, table/CSV, wording,
sample gallery, model-card tables.  Models: the shipped ones (placeholders are fine: no accuracy is asserted)."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclassify import appsupport as aps
from medclassify.inference import Prediction, get_predictor
from medclassify.registry import TASKS, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "sample_images"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_bytes(task: str, index: int = 0) -> tuple[str, bytes]:
    sample = aps.list_samples(task)[index]
    return sample.name, sample.path.read_bytes()


@pytest.fixture(scope="module")
def predictors():
    return {task: get_predictor(task) for task in TASKS}


def fake_prediction(task: str, index: int = 0, ood: bool = False, p: float = 0.9) -> Prediction:
    spec = get_task(task)
    probs = np.full(spec.num_classes, (1 - p) / max(spec.num_classes - 1, 1))
    probs[index] = p
    return Prediction(task=task, label=spec.class_names[index], class_index=index,
                      probabilities=dict(zip(spec.class_names, map(float, probs))),
                      model_input=np.zeros(spec.input_shape, np.uint8), ood=ood,
                      warnings=["unlike the training images", "second reason"] if ood else [],
                      p_positive=float(probs[spec.positive_class]) if spec.positive_class is not None else None,
                      threshold=0.3 if spec.decision == "threshold" else None)


# --------------------------------------------------------------------------- processing


@pytest.mark.parametrize("task", sorted(TASKS))
def test_process_image_from_bytes(predictors, task):
    name, data = sample_bytes(task)
    result = aps.process_image(predictors[task], name, data)
    assert result.ok and result.error is None
    prediction = result.prediction
    spec = get_task(task)
    assert prediction.label in spec.class_names
    assert set(prediction.probabilities) == set(spec.class_names)
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-4
    assert prediction.model_input.shape == spec.input_shape


@pytest.mark.parametrize("data, expected", [
    (b"", "empty"),
    (b"this is text, not an image", "not a recognised image"),
    (png(np.zeros((40, 40, 3), np.uint8))[:60], "damaged or truncated"),
])
def test_bad_file_gives_one_line_error(predictors, data, expected):
    result = aps.process_image(predictors["blood"], "bad.png", data)
    assert not result.ok
    assert expected in result.error
    assert "\n" not in result.error and "Traceback" not in result.error
    assert result.error.count("truncated") <= 1  # not "damaged or truncated (image file is truncated (...))"


def test_a_truncated_jpeg_says_so_once(predictors):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(jpeg, "JPEG")
    result = aps.process_image(predictors["blood"], "cut.jpg", jpeg.getvalue()[:jpeg.tell() // 2])
    assert result.error.startswith("image file is damaged or truncated") and result.error.count("truncated") == 1


def test_awkward_files_never_raise(predictors, awkward_files, awkward_kinds):
    """Every odd file (DICOM included) gives a prediction or a one-line error, as preprocessing decides."""
    for kind, path in awkward_files.items():
        result = aps.process_image(predictors["breast"], path.name, path.read_bytes())
        assert result.ok == (awkward_kinds[kind] == "ok"), (kind, result.error)
        if not result.ok:
            assert result.error and "\n" not in result.error


def test_unexpected_exception_becomes_generic_error_and_a_logged_traceback(caplog):
    import logging

    class Broken:
        def predict(self, source):
            raise RuntimeError("secret internal detail\nTraceback (most recent call last)")

    with caplog.at_level(logging.ERROR, logger="medclassify.appsupport"):
        result = aps.process_image(Broken(), "x.png", b"123")
    assert result.error == "could not process this image (RuntimeError)"  # the detail is the log's
    [record] = [r for r in caplog.records if r.name == "medclassify.appsupport"]
    assert "'x.png'" in record.getMessage()
    assert record.exc_info and record.exc_info[0] is RuntimeError


def test_a_bad_upload_is_not_logged_as_a_failure(predictors, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        result = aps.process_image(predictors["blood"], "broken.png", b"garbage")
    assert "not a recognised image" in result.error  # the user's news, not a bug:
    assert not [r for r in caplog.records if r.name.startswith("medclassify")]


def test_process_batch_keeps_order_and_isolates_bad_files(predictors):
    items = [sample_bytes("breast", 0), ("broken.png", b"garbage"), sample_bytes("breast", 3), ("empty.png", b"")]
    calls = []
    results = aps.process_batch(predictors["breast"], items, batch_size=2,
                                on_progress=lambda done, total: calls.append((done, total)))
    assert [r.name for r in results] == [name for name, _ in items]
    assert [r.ok for r in results] == [True, False, True, False]
    assert "not a recognised image" in results[1].error
    assert "empty" in results[3].error
    assert calls[-1] == (4, 4) and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_process_batch_matches_single_image_results(predictors):
    items = [sample_bytes("blood", i) for i in range(5)]
    batch = aps.process_batch(predictors["blood"], items)
    for (name, data), result in zip(items, batch):
        single = aps.process_image(predictors["blood"], name, data)
        assert single.prediction.label == result.prediction.label
        for key, value in single.prediction.probabilities.items():
            assert result.prediction.probabilities[key] == pytest.approx(value, abs=1e-5)


def test_process_batch_survives_a_failing_model_call_and_logs_it(predictors, caplog):
    """If predict_many itself breaks, the remaining files are still answered one by one; the retry hides the
    failure from the page, not from the log (a bad upload is the user's news and is not logged)."""
    import logging

    real = predictors["blood"]

    class Flaky:
        def predict_many(self, sources, batch_size=64):
            iterator = iter(sources)
            yield "x", real.predict(next(iterator))
            raise RuntimeError("model call failed")

        def predict(self, source):
            if source == b"worse":
                raise ValueError("conv2d got a NaN")
            return real.predict(source)

    items = [sample_bytes("blood", i) for i in range(3)] + [("bad.png", b"x"), ("worse.png", b"worse")]
    with caplog.at_level(logging.ERROR, logger="medclassify.appsupport"):
        results = aps.process_batch(Flaky(), items)
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert "not a recognised image" in results[3].error
    assert results[4].error == "could not process this image (ValueError)"
    batch, single = [r for r in caplog.records if r.name == "medclassify.appsupport"]
    assert "batch prediction failed after 1 of 5 files" in batch.getMessage()
    assert batch.exc_info and str(batch.exc_info[1]) == "model call failed"
    assert "'worse.png'" in single.getMessage() and single.exc_info[0] is ValueError


def test_process_batch_passes_on_a_reading_error_with_its_text(predictors, monkeypatch, caplog):
    import logging

    from medclassify import inference

    real_prepare = inference.prepare

    def flaky_prepare(source, spec):
        if source == b"odd":
            raise KeyError("no tag (0028,0010)")
        return real_prepare(source, spec)

    monkeypatch.setattr(inference, "prepare", flaky_prepare)
    items = [sample_bytes("blood", 0), ("odd.dcm", b"odd")]
    with caplog.at_level(logging.WARNING, logger="medclassify.inference"):
        results = aps.process_batch(predictors["blood"], items)
    assert results[0].ok and results[1].error == "could not read image (KeyError: 'no tag (0028,0010)')"
    assert aps.process_image(predictors["blood"], "odd.dcm", b"odd").error == results[1].error  # alone, the same
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_first_prediction_is_fast(predictors):
    """A warm predictor answers one upload, Grad-CAM included, well under a second."""
    from medclassify.explain import explainer_for

    predictor = predictors["blood"]
    explainer = explainer_for(predictor.model).warm_up()
    name, data = sample_bytes("blood", 5)
    start = time.perf_counter()
    result = aps.process_image(predictor, name, data)
    heatmap = explainer(result.prediction.model_input, result.prediction.class_index)
    elapsed = time.perf_counter() - start
    assert heatmap.shape == (28, 28)
    assert elapsed < 1.0, f"{elapsed:.3f} s"


def test_inputs_key_depends_on_task_names_and_bytes():
    items = [("a.png", b"123"), ("b.png", b"456")]
    key = aps.inputs_key("blood", items)
    assert key == aps.inputs_key("blood", list(items))
    assert key != aps.inputs_key("breast", items)
    assert key != aps.inputs_key("blood", [("a.png", b"123"), ("b.png", b"457")])
    assert key != aps.inputs_key("blood", items[::-1])


# --------------------------------------------------------------------------- table, CSV, wording


def test_results_table_blood():
    results = [aps.ImageResult("a.png", fake_prediction("blood", 6, p=0.8)),
               aps.ImageResult("b.png", fake_prediction("blood", 1, ood=True)),
               aps.ImageResult("c.png", error="not a recognised image file")]
    table = aps.results_table(results, "blood")
    assert list(table.columns) == ["file", "label", "confidence", "close_call", "ood", "warnings",
                                   "error"]  # no truth given
    assert table.loc[0, "label"] == "neutrophil" and table.loc[0, "confidence"] == pytest.approx(0.8)
    assert not table.loc[0, "ood"] and not table.loc[0, "close_call"]
    assert table["close_call"].isna().tolist()[1:] == [True, True]  # no answer, nothing to be close about
    # unlike the training data: no label is given, only the reasons
    assert table.loc[1, "label"] == aps.NO_ANSWER and table.loc[1, "ood"]
    assert "unlike the training images" in table.loc[1, "warnings"]
    assert table.loc[2, "error"] == "not a recognised image file" and table.loc[2, "label"] == ""


def test_results_table_breast_has_p_malignant_and_threshold_not_a_confidence():
    # "malignant" at P(malignant) 0.25 > threshold 0.2: a confidence of 0.25 for that label would read as a bug
    malignant = fake_prediction("breast", 0, p=0.25)
    malignant.threshold = 0.2
    table = aps.results_table([aps.ImageResult("m.png", malignant),
                               aps.ImageResult("x.png", error="file is empty")], get_task("breast"))
    assert list(table.columns) == ["file", "label", "p_malignant", "threshold", "close_call", "ood", "warnings",
                                   "error"]
    assert table.loc[0, "label"] == "malignant"
    assert table.loc[0, "close_call"]  # 0.25 is within BORDERLINE of 0.2: the row says so, not only the detail view
    assert table.loc[0, "p_malignant"] == pytest.approx(0.25)
    assert table.loc[0, "threshold"] == pytest.approx(0.2)


def test_results_table_with_the_true_classes_of_the_gallery():
    results = [aps.ImageResult("n.png", fake_prediction("blood", 6)),
               aps.ImageResult("e.png", fake_prediction("blood", 6)),
               aps.ImageResult("o.png", fake_prediction("blood", 1, ood=True)),
               aps.ImageResult("x.png", error="bad")]
    truth = {"n.png": "neutrophil", "e.png": "eosinophil", "o.png": "eosinophil", "x.png": "basophil"}
    table = aps.results_table(results, "blood", truth)
    assert list(table.columns) == ["file", "label", "confidence", "close_call", "true_class", "agrees", "ood",
                                   "warnings", "error"]
    assert list(table["true_class"]) == ["neutrophil", "eosinophil", "eosinophil", "basophil"]
    assert table["agrees"].tolist()[:2] == [True, False]
    assert table["agrees"].isna().tolist()[2:] == [True, True]  # no label, nothing to agree with


def test_results_csv_round_trip():
    results = [aps.ImageResult("a, with comma.png", fake_prediction("breast", 1, p=0.9)),
               aps.ImageResult("b.png", fake_prediction("breast", 0, ood=True)),
               aps.ImageResult("c.png", error="image file is damaged or truncated (x)")]
    data = aps.results_csv(aps.results_table(results, "breast"))
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert [r["file"] for r in rows] == ["a, with comma.png", "b.png", "c.png"]
    assert rows[0]["label"] == "normal/benign" and float(rows[0]["p_malignant"]) == pytest.approx(0.1)
    assert rows[1]["ood"] == "True" and rows[1]["label"] == aps.NO_ANSWER
    assert rows[2]["error"].startswith("image file is damaged")
    assert aps.csv_name("breast").endswith(".csv")
    card = {"name": "model_breast", "variant": "cnn_ens5", "created": "2026-11-27", **CARD}
    rule = aps.decision_text(card, get_task("breast"), 0.2)
    rows = list(csv.DictReader(io.StringIO(aps.results_csv(aps.results_table(results, "breast"), card, rule)
                                           .decode("utf-8"))))
    assert {r["model"] for r in rows} == {"model_breast (cnn_ens5, card 2026-11-27)"}
    assert {r["decision_rule"] for r in rows} == {rule} and "P(malignant) ≥ 0.200" in rule
    assert {r["note"] for r in rows} == {aps.DISCLAIMER}
    fresh = {"name": "my_breast", "created": "2026-11-27"}  # a card from `train`: no variant
    rows = list(csv.DictReader(io.StringIO(aps.results_csv(aps.results_table(results, "breast"), fresh, rule)
                                           .decode("utf-8"))))
    assert {r["model"] for r in rows} == {"my_breast (card 2026-11-27)"}


def test_breast_wording_is_careful():
    positive, flagged = aps.breast_verdict(fake_prediction("breast", 0, p=0.9))
    assert positive and flagged.startswith(aps.BREAST_POSITIVE)
    assert "P(malignant) = 90.0%" in flagged and "threshold of 30.0%" in flagged
    positive, not_flagged = aps.breast_verdict(fake_prediction("breast", 1, p=0.9))
    assert not positive and not_flagged.startswith(aps.BREAST_NEGATIVE)
    assert "P(malignant) = 10.0%" in not_flagged and not_flagged.endswith(aps.BREAST_NOT_RULED_OUT)
    for sentence in (flagged, not_flagged, aps.BREAST_NOTE):
        lowered = sentence.lower()
        assert "you have" not in lowered and "definitely" not in lowered and "cancer-free" not in lowered
        # research software: no clinical advice (the disclaimer rules out triage), no reassurance
        assert "refer" not in lowered and "specialist" not in lowered and "no malignant" not in lowered


def test_percent_never_shows_certainty_the_model_cannot_mean():
    assert aps.percent(0.9996) == ">99.9%" and aps.percent(0.0004) == "<0.1%"
    assert aps.percent(0.302) == "30.2%" and aps.percent(0.999) == "99.9%"
    _, sentence = aps.breast_verdict(fake_prediction("breast", 0, p=0.99999))
    assert "P(malignant) = >99.9%" in sentence


def test_close_call_names_the_two_classes():
    spec = get_task("blood")
    prediction = fake_prediction("blood", 5, p=0.509)
    probs = dict.fromkeys(spec.class_names, 0.0)
    probs.update(monocyte=0.509, neutrophil=0.485, lymphocyte=0.006)
    prediction.probabilities = probs
    assert aps.close_call(prediction) == "Close call between monocyte (50.9%) and neutrophil (48.5%)."
    assert aps.close_call(fake_prediction("blood", 5, p=0.9)) is None
    assert aps.close_call(fake_prediction("breast", 0, p=0.52)) is None  # 22 points from the threshold of 0.3


@pytest.mark.parametrize("p, borderline", [(0.30, True), (0.26, True), (0.34, True), (0.24, False), (0.36, False),
                                           (0.9, False), (0.01, False)])
def test_breast_answer_near_the_threshold_is_borderline(p, borderline):
    prediction = fake_prediction("breast", 0 if p >= 0.3 else 1, p=p if p >= 0.3 else 1 - p)  # threshold 0.3
    assert prediction.p_positive == pytest.approx(p)
    message = aps.close_call(prediction)
    assert (message is not None) == borderline
    if borderline:
        assert message == (f"Borderline: P(malignant) = {aps.percent(p)} is within 5 percentage points of the "
                           "threshold (30.0%).")


def test_breast_test_record_counts_what_the_answering_model_caught():
    assert aps.breast_test_record(CARD, "float") == (
        "On the official test split this model flagged 34 of 42 malignant images and 11 of 114 benign ones: "
        "it misses some malignant images.")
    served = {**CARD, "serving": {"test": {"int8_metrics": {"sensitivity": 36 / 42, "specificity": 101 / 114}}}}
    assert ("the model as served here flagged 36 of 42 malignant images and 13 of 114 benign"
            in aps.breast_test_record(served, "int8"))  # not the float model's counts, which About shows
    assert "flagged 34 of 42" in aps.breast_test_record(served, "float")  # the float model answers
    assert aps.breast_test_record({"test": {"accuracy": 0.9}}, "int8") == ""
    perfect = {**CARD, "test": {**CARD["test"], "sensitivity": 1.0}}
    assert aps.breast_test_record(perfect, "float").endswith("flagged 42 of 42 malignant images and 11 of 114 "
                                                             "benign ones.")


def test_duration():
    assert aps.duration(10165.0) == "2 h 49 min"
    assert aps.duration(951) == "16 min" and aps.duration(45) == "45 s"


def test_prediction_markdown_has_stable_prefix():
    assert aps.prediction_markdown(fake_prediction("blood", 2)) == "**Prediction:** erythroblast"
    # breast: the rule that made the label, so "malignant" at P = 18% does not read as a contradiction
    flagged = fake_prediction("breast", 1, p=0.8)  # P(malignant) 0.2 < threshold 0.3 ...
    flagged.class_index, flagged.label = 0, "malignant"  # ... as if the threshold were 0.15
    flagged.threshold = 0.15
    assert aps.prediction_markdown(flagged) == ("**Prediction:** malignant (flagged: P(malignant) 20.0% is at or "
                                                "above the threshold of 15.0%)")
    assert aps.prediction_markdown(fake_prediction("breast", 1, p=0.9)) == (
        "**Prediction:** normal/benign (not flagged: P(malignant) 10.0% is below the threshold of 30.0%)")


def test_score_and_threshold_never_look_equal_when_they_are_not():
    below = fake_prediction("breast", 1, p=1 - 0.1826)
    below.threshold = 0.18265
    assert aps.score_and_threshold(below) == ("18.26%", "18.27%")
    assert "18.26% is below the threshold of 18.27%" in aps.prediction_markdown(below)
    assert "P(malignant) = 18.26%, below its threshold of 18.27%" in aps.breast_verdict(below)[1]
    below.p_positive = 0.1
    assert aps.score_and_threshold(below) == ("10.0%", "18.3%")
    below.p_positive = 0.18265  # equal: one decimal says so
    assert aps.score_and_threshold(below) == ("18.3%", "18.3%")


def test_grad_cam_shows_malignancy_evidence_for_breast_and_the_answer_for_blood():
    assert aps.explained_class(fake_prediction("blood", 4)) == (4, "lymphocyte")
    for index in (0, 1):
        assert aps.explained_class(fake_prediction("breast", index)) == (0, "malignant")
    assert "evidence for malignant lay" in aps.gradcam_alt(fake_prediction("breast", 1))


def test_calibration_mix_comes_from_the_cards_validation_counts():
    card = {"validation": {"confusion_matrix": [[20, 1], [2, 55]]}}
    assert aps.calibration_mix_note(card, fake_prediction("breast", 1)) == (
        "P(malignant) is calibrated on 78 validation images, 27% (21) of them malignant. Where malignant cases are "
        "less common than that, the same score means a lower chance that an image is malignant; where more "
        "common, a higher one (if the images look alike).")
    blood = {"validation": {"confusion_matrix": (np.eye(8, dtype=int) * [10, 10, 10, 10, 10, 10, 30, 10]).tolist()}}
    assert "(neutrophil: 30% of its cells)" in aps.calibration_mix_note(blood, fake_prediction("blood", 6))
    assert aps.calibration_mix_note({}, fake_prediction("blood", 6)) == ""
    assert aps.calibration_mix_note({"validation": {"confusion_matrix": [[1]]}}, fake_prediction("blood")) == ""
    for broken in ([[1, 2], [3]], [[0, 0], [0, 0]], [["a", "b"], ["c", "d"]]):  # ragged, empty, not counts
        assert aps.calibration_mix_note({"validation": {"confusion_matrix": broken}}, fake_prediction("breast")) == ""


def test_ood_hints_fit_the_upload():
    blood = fake_prediction("blood", ood=True)
    assert aps.ood_hints(blood) == [aps.other_classifier_hint("blood")]  # no size known: nothing about cropping
    blood.source_size = (360, 363)
    assert aps.ood_hints(blood)[0] == aps.CROP_HINT
    scan = fake_prediction("breast", ood=True)
    scan.source_size = (28, 28)  # a MedMNIST thumbnail has no scanner border to crop
    assert aps.ood_hints(scan) == [aps.other_classifier_hint("breast")]
    scan.source_size = (1024, 768)
    assert aps.ood_hints(scan) == [aps.SCREENSHOT_HINT, aps.other_classifier_hint("breast")]


def test_squash_note_only_for_non_square_full_size_uploads():
    scan = fake_prediction("breast")
    assert aps.squash_note(scan) == ""  # no size known
    for square in [(500, 500), (28, 28), (510, 500)]:  # under SQUASH_NOTE_RATIO: no note
        scan.source_size = square
        assert aps.squash_note(scan) == ""
    scan.source_size = (600, 450)
    assert aps.squash_note(scan).startswith("Your 600×450 image was resized whole to 28×28, without cropping")
    scan.source_size = (450, 600)
    assert "crop to the scan" in aps.squash_note(scan)
    cell = fake_prediction("blood")
    cell.source_size = (640, 480)  # blood is centre-cropped to a square, never squashed
    assert aps.squash_note(cell) == ""


def test_other_classifier_hint_names_the_other_task():
    assert aps.other_classifier_hint("blood") == ("If this is a breast ultrasound image, choose the "
                                                  "'Breast ultrasound' classifier above and upload it there.")
    assert "'Blood cell type' classifier" in aps.other_classifier_hint("breast")


def test_summary_counts():
    results = [aps.ImageResult("a", fake_prediction("blood")), aps.ImageResult("b", fake_prediction("blood", ood=True)),
               aps.ImageResult("c", error="x")]
    assert aps.summary(results) == {"total": 3, "classified": 1, "unreliable": 1, "failed": 1}


def test_probabilities_frame():
    frame = aps.probabilities_frame(fake_prediction("blood", 3, p=0.65))
    assert list(frame["class"]) == list(get_task("blood").class_names)
    assert frame["probability"].sum() == pytest.approx(1.0)
    assert frame["shown"][3] == "65.0%"
    sure = aps.probabilities_frame(fake_prediction("blood", 3, p=0.99996))
    assert sure["shown"][3] == ">99.9%" and set(sure["shown"].drop(3)) == {"<0.1%"}  # as the text says it


@pytest.mark.parametrize("task, size, cropped", [("blood", (360, 363), True), ("blood", (4032, 3024), True),
                                                 ("blood", (28, 28), False), ("blood", (224, 224), False),
                                                 ("breast", (500, 500), False), ("breast", (28, 28), False)])
def test_model_view_caption_says_when_the_centre_was_cropped(task, size, cropped):
    """A full-size blood image is cut to its centre 200/360 as MedMNIST's were: the page must say so, or a user
    comparing the two pictures cannot tell why the model's looks zoomed in."""
    prediction = fake_prediction(task)
    prediction.source_size = size
    caption = aps.model_view_caption(prediction)
    assert aps.was_centre_cropped(prediction) == cropped
    side = round(min(size) * 200 / 360)
    assert (f"centre square of {side}×{side} px (56% of the shorter side, MedMNIST's crop) of your "
            f"{size[0]}×{size[1]} image" in caption) == cropped
    assert "28×28" in caption
    prediction.source_size = None  # a prediction made before the size was kept
    assert not aps.was_centre_cropped(prediction) and "28×28 px input" in aps.model_view_caption(prediction)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_image_the_app_shows_has_a_description_for_screen_readers(task):
    prediction = fake_prediction(task, index=1)
    assert aps.sample_alt(task).lower().startswith(get_task(task).image_kind)
    assert "28×28 pixels" in aps.model_view_alt(prediction)
    assert get_task(task).image_kind not in aps.model_view_alt(prediction).lower()  # an upload may show anything
    alt = aps.gradcam_alt(prediction)
    assert aps.explained_class(prediction)[1] in alt and "colour scale" in alt


def test_predictions_keep_the_uploads_size(predictors):
    prediction = predictors["blood"].predict(Image.fromarray(np.full((363, 360, 3), 200, np.uint8)))
    assert prediction.source_size == (360, 363)


def test_upscale_is_nearest_neighbour():
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    big = aps.upscale(image, 196)
    assert big.shape == (196, 196)
    assert (big[:7, :7] == image[0, 0, 0]).all() and (big[7:14, :7] == image[1, 0, 0]).all()
    assert aps.upscale(np.zeros((28, 28, 3), np.uint8), 56).shape == (56, 56, 3)


def test_preview():
    assert aps.preview(png(np.zeros((600, 300, 3), np.uint8)), max_side=256).shape == (256, 128, 3)
    assert aps.preview(png(np.zeros((28, 28, 3), np.uint8))).shape == (196, 196, 3)  # a thumbnail is not a speck
    assert aps.preview(png(np.zeros((150, 60, 3), np.uint8))).shape == (150, 60, 3)  # never past max_side
    assert aps.preview(b"not an image") is None
    transparent = png(np.zeros((40, 40, 4), np.uint8))  # fully transparent
    assert (aps.preview(transparent) == 255).all() and (aps.preview(transparent, background=0) == 0).all()


# --------------------------------------------------------------------------- sample gallery


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sample_gallery_covers_every_class(task):
    samples = aps.list_samples(task)
    spec = get_task(task)
    assert {s.label for s in samples} == set(spec.class_names)
    assert 2 <= len(samples) <= 3 * spec.num_classes
    for sample in samples:
        assert sample.path.name.startswith(aps.slug(sample.label) + "_")
        with Image.open(sample.path) as image:
            assert image.size == (28, 28)
            assert image.mode == ("RGB" if spec.channels == 3 else "L")


def test_slug_and_missing_gallery(tmp_path):
    assert aps.slug("normal/benign") == "normal-benign"
    assert aps.slug("immature granulocytes") == "immature_granulocytes"
    assert aps.list_samples("blood", root=tmp_path) == []
    (tmp_path / "blood").mkdir()
    (tmp_path / "blood" / "unknown_01.png").write_bytes(b"")
    (tmp_path / "blood" / "platelet_01.png").write_bytes(b"")
    assert [s.label for s in aps.list_samples("blood", root=tmp_path)] == ["platelet"]


def test_sample_manifest_matches_files():
    rows = list(csv.DictReader(open(SAMPLES / "manifest.csv")))
    assert {r["file"] for r in rows} == {f"{s.task}/{s.name}" for t in TASKS for s in aps.list_samples(t)}
    assert all(r["split"] == "test" for r in rows)


@pytest.mark.realdata
def test_make_samples_is_deterministic_and_matches_the_test_split(tmp_path, realdata_dir):
    import importlib.util

    from medclassify.data import load_split

    spec_ = importlib.util.spec_from_file_location("make_samples", REPO_ROOT / "scripts" / "make_samples.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    rows = module.make_samples(tmp_path / "a", realdata_dir)
    module.make_samples(tmp_path / "b", realdata_dir)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (SAMPLES / "manifest.csv").read_bytes()
    splits = {task: load_split(task, "test", data_dir=realdata_dir) for task in TASKS}
    for row in rows:
        split = splits[row["task"]]
        assert get_task(row["task"]).class_names[split.labels[row["index"]]] == row["label"]
        expected = split.images[row["index"]]
        for root in (tmp_path / "a", SAMPLES):
            pixels = np.asarray(Image.open(root / row["file"]))
            assert np.array_equal(pixels.reshape(expected.shape), expected), row["file"]


# --------------------------------------------------------------------------- model card


CARD = {
    "test": {
        "accuracy": 0.9, "auc": 0.95, "balanced_accuracy": 0.85, "f1_macro": 0.8, "n": 156,
        "sensitivity": 0.8, "specificity": 0.9, "ece": 0.03,
        "ci95": {"accuracy": [0.85, 0.94], "auc": [0.9, 0.98]},
        "confusion_matrix": [[30, 12], [6, 108]],
        "per_class": {"malignant": {"precision": 0.83, "recall": 0.71, "f1": 0.77, "support": 42}},
    },
    "validation": {"accuracy": 0.5},
    "training": {"command": "python -m medclassify train --task breast"},
    "decision": {"threshold": 0.2, "threshold_rule": "highest threshold keeping sensitivity >= 0.95"},
}


def test_card_metrics_prefers_test_then_validation():
    assert aps.card_metrics(CARD)[0] == "test"
    assert aps.card_metrics({**CARD, "test": None}) == ("validation", {"accuracy": 0.5})
    assert aps.card_metrics({}) == (None, None)
    assert aps.card_metrics(None) == (None, None)


def test_metrics_frame_with_confidence_intervals():
    frame = aps.metrics_frame(CARD["test"]).set_index("metric")
    assert frame.loc["Accuracy", "value"] == pytest.approx(0.9)
    assert frame.loc["Accuracy", "95% CI"] == "0.850 – 0.940"
    assert frame.loc["Balanced accuracy", "95% CI"] == ""
    assert "Sensitivity (malignant)" in frame.index
    assert aps.metrics_frame({"auc": float("nan")}).empty


def test_metrics_frame_with_the_served_copy_beside_the_model():
    card = {"test": {"accuracy": 0.9, "auc": 0.95},
            "serving": {"test": {"int8_metrics": {"accuracy": 0.89, "auc": 0.951}}, "val": {"int8_metrics": {}}}}
    served = aps.served_metrics(card, "test", "int8")
    frame = aps.metrics_frame(card["test"], served).set_index("metric")
    assert frame.loc["Accuracy", "value"] == pytest.approx(0.9)
    assert frame.loc["Accuracy", aps.SERVED_COLUMN] == pytest.approx(0.89)
    assert frame.loc["AUC", aps.SERVED_COLUMN] == pytest.approx(0.951)
    partly = aps.metrics_frame({**card["test"], "ece": 0.02}, served).set_index("metric")
    assert partly.loc["Accuracy", aps.SERVED_COLUMN] == pytest.approx(0.89)
    assert partly.loc["Expected calibration error", aps.SERVED_COLUMN] is pd.NA  # the copy's card lacks it
    # answered in float, or no copy's metrics for that split: no column
    assert aps.served_metrics(card, "test", "float") is None
    assert aps.served_metrics(card, "validation", "int8") is None
    assert aps.served_metrics({}, "test", "int8") is None
    assert aps.SERVED_COLUMN not in aps.metrics_frame(card["test"], None).columns


def test_the_ood_test_rate_is_quoted_only_for_the_model_it_was_measured_on():
    card = {"ood_check": {"precision": "int8", "test_flagged": 0.018}}
    assert aps.ood_test_rate(card, "int8") == pytest.approx(0.018)
    assert aps.ood_test_rate(card, "float") is None  # MEDCLASSIFY_SERVING_PRECISION=float: other features
    assert aps.ood_test_rate({"ood_check": {"test_flagged": 0.02}}, "float") == pytest.approx(0.02)
    assert aps.ood_test_rate({}, "int8") is None


def test_confusion_and_per_class_frames():
    frame = aps.confusion_frame(CARD["test"], get_task("breast").class_names)
    assert frame.loc["true: malignant", "pred: normal/benign"] == 12
    assert aps.confusion_frame({}, ("a", "b")) is None
    assert aps.confusion_frame({"confusion_matrix": [[1]]}, ("a", "b")) is None
    assert list(aps.per_class_frame(CARD["test"])["class"]) == ["malignant"]
    assert aps.per_class_frame({}) is None


def test_serving_text_says_which_model_answers():
    card = {"serving": {"runtime": "TensorFlow Lite int8", "test": {"n": 156, "decisions_changed": 1,
                                                                     "int8_metrics": {"accuracy": 0.878, "auc": 0.927}}}}
    text = aps.serving_text(card, "int8")
    assert "int8 copy" in text and "155 of 156 test images" in text and "auc 0.9270" in text
    assert "Grad-CAM explains the float model" in text
    # served in float (asked for, or the copy did not match its card): say so, whatever the card lists
    assert "float" in aps.serving_text(card, "float") and "int8" not in aps.serving_text(card, "float")
    assert "float" in aps.serving_text({}, "int8") and "results" not in aps.serving_text({}, "int8")
    fresh = {"validation": {"accuracy": 0.9}, "test": None}  # a model just trained: no test evaluation yet
    assert "validation results are shown above" in aps.serving_text(fresh, "float")


def test_decision_text_and_training_command():
    breast, blood = get_task("breast"), get_task("blood")
    text = aps.decision_text(CARD, breast, 0.2)
    assert "0.200" in text and "sensitivity" in text
    assert "highest" in aps.decision_text({}, blood, None)
    assert aps.training_command(CARD).startswith("python -m medclassify train")
    assert aps.training_command({}) is None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_cards_render(predictors, task):
    card = predictors[task].card
    split, metrics = aps.card_metrics(card)
    if metrics is not None:
        served = aps.served_metrics(card, split, predictors[task].precision)
        frame = aps.metrics_frame(metrics, served)
        if predictors[task].precision == "int8":  # the shipped models answer through their int8 copies
            served_rows = frame.set_index("metric")[aps.SERVED_COLUMN]
            assert served_rows[["Accuracy", "AUC"]].notna().all()
        aps.confusion_frame(metrics, get_task(task).class_names)
    json.dumps(card)  # the card is plain JSON


def test_size_note_adds_the_cards_measured_round_trip_on_test():
    trips = {"png64": {"changed": 5, "accuracy": 0.85, "mean_shift": 0.1},
             "jpeg224_q75": {"changed": 6, "accuracy": 0.8462, "mean_shift": 0.1}}
    card = {"stability": {"precision": "int8", "test": {"n": 156, "accuracy": 0.859, "round_trips": trips},
                          "val": {"n": 78, "accuracy": 0.96, "round_trips": {"png64": {"changed": 1, "accuracy": 1}}}}}
    note = aps.size_note(card, "int8")
    assert note.startswith(aps.SIZE_NOTE)
    assert note.endswith("In a check on the official test split, where each image was enlarged, saved and reduced "
                         "again, 6 of 156 answers changed (accuracy 85.9% before, 84.6% after). "
                         + aps.ROUND_TRIP_CAVEAT)
    assert "not its accuracy on full-size images" in aps.ROUND_TRIP_CAVEAT
    assert aps.size_note(card) == note  # precision unknown: the card's numbers
    assert aps.size_note(card, "float") == aps.SIZE_NOTE  # measured on the int8 copy, not on the model serving
    for without in (None, {}, {"stability": {"val": card["stability"]["val"]}},
                    {"stability": {"test": {"n": 156, "round_trips": {}}}}, {"stability": {"test": {"n": "x"}}}):
        assert aps.size_note(without) == aps.SIZE_NOTE


def test_resize_note_speaks_only_for_images_the_app_reduced():
    card = {"stability": {"precision": "int8", "test": {"n": 156, "accuracy": 0.878, "round_trips": {
        "png64": {"changed": 21, "accuracy": 0.78, "mean_shift": 0.1},
        "png224": {"changed": 23, "accuracy": 0.769, "mean_shift": 0.1, "flag_lost": 1, "flag_gained": 22}}}}}
    prediction = fake_prediction("breast")
    prediction.source_size = (560, 480)
    assert aps.resize_note(card, prediction, "int8") == (
        "This image was reduced from 560×480 to 28×28 px. In a check on the official test split, where each "
        "image was enlarged, saved and reduced again, 23 of 156 answers (15%) changed: 22 to 'malignant', 1 away "
        "from it. " + aps.ROUND_TRIP_CAVEAT)
    assert aps.resize_note(card, prediction, "float") == ""
    for size in ((28, 28), (20, 28), None):  # a thumbnail (or smaller) is not reduced
        prediction.source_size = size
        assert aps.resize_note(card, prediction) == ""
    prediction.source_size = (64, 64)
    assert aps.resize_note({}, prediction) == "" and aps.resize_note(None, prediction) == ""
    assert "reduced from 64×64 to 28×28 px" in aps.resize_note(card, prediction)
    blood = fake_prediction("blood")
    blood.source_size = (363, 360)  # a full microscope frame: MedMNIST's centre crop, then the reduction
    assert aps.resize_note(card, blood).startswith(
        "This image was cropped to its centre 200×200 px, as MedMNIST cropped its source images, and reduced to "
        "28×28 px. In a check")
    assert "changed. " in aps.resize_note(card, blood)  # no flag, no direction
