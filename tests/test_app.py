"""The Streamlit app through ``streamlit.testing.v1.AppTest``: every flow, no browser.

The shipped models may be placeholders: tests check that *a* class of the
registry is shown, never which one.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from medclassify import appsupport as aps  # noqa: E402
from medclassify.registry import TASKS, get_task  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = str(REPO_ROOT / "app.py")
PREFIX = "**Prediction:** "


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def sample(task: str, index: int = 0) -> tuple[str, bytes, str]:
    """The index-th gallery sample that the OOD rule accepts (about 2% of genuine test images are
    flagged and show a warning instead of a label; the OOD tests cover those)."""
    from medclassify.inference import get_predictor

    predictor = get_predictor(task)
    accepted = [item for item in aps.list_samples(task) if not predictor.predict(item.path.read_bytes()).ood]
    item = accepted[index]
    return item.name, item.path.read_bytes(), "image/png"


def select_task(at: AppTest, task: str) -> AppTest:
    at.radio(key="task").set_value(task).run()
    assert not at.exception, at.exception
    return at


def assert_every_image_has_alt_text(at: AppTest) -> None:
    """Screen readers name a picture by its alt text; a visible caption does not count."""
    pictures = [picture for element in at.image for picture in element.proto.imgs]
    assert pictures and all(picture.alt.strip() for picture in pictures), [p.caption for p in pictures]


def upload(at: AppTest, files) -> AppTest:
    at.file_uploader(key=f"upload_{at.radio(key='task').value}").set_value(files).run()
    assert not at.exception, at.exception
    return at


def predicted_labels(at: AppTest) -> list[str]:
    """The labels of the prediction lines (a breast line goes on with the threshold rule in brackets)."""
    return [m.value[len(PREFIX):].split(" (")[0] for m in at.markdown if m.value.startswith(PREFIX)]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def no_traceback(at: AppTest) -> None:
    assert not at.exception
    everything = texts(at.markdown) + texts(at.error) + texts(at.warning) + texts(at.info) + texts(at.caption)
    assert "Traceback" not in everything


def jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((280, 280)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def at_start() -> AppTest:
    """Warms the models once for the module (the first run imports TensorFlow)."""
    return new_app()


# --------------------------------------------------------------------------- start page


def test_start_page(at_start):
    at = at_start
    assert "MedMNIST image classifier" in at.title[0].value
    chooser = at.radio(key="task")
    assert chooser.options == [TASKS[t].title for t in TASKS]
    assert chooser.value == "blood"
    assert any(TASKS["blood"].expected_input in i.value for i in at.info)
    # the disclaimer is visible on the page and in About
    assert any("not a medical device" in c.value for c in at.caption)
    assert any("not a medical device" in w.value for w in at.warning)
    uploader = at.file_uploader(key="upload_blood")
    assert uploader.accept_multiple_files
    assert {"png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "gif", "dcm"} <= {
        t.lstrip(".") for t in uploader.allowed_type}
    assert len(at.camera_input) == 0  # the webcam is only opened on request
    assert not predicted_labels(at) and not at.error
    no_traceback(at)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_classifier_description(task):
    at = select_task(new_app(), task)
    spec = get_task(task)
    assert any(spec.expected_input in i.value for i in at.info)
    assert any(spec.description in m.value for m in at.markdown)


# --------------------------------------------------------------------------- one image


def test_switching_classifier_does_not_run_one_tasks_uploads_through_the_other():
    """Blood images left in the uploader used to be re-run by the breast model (and flagged) on a switch.
    (Streamlit drops the state of a widget that a run does not draw, so the blood uploads are gone too.)"""
    at = upload(new_app(), sample("blood", 0))
    assert len(predicted_labels(at)) == 1
    at = select_task(at, "breast")
    assert predicted_labels(at) == []  # an empty breast uploader: nothing answered, nothing flagged
    assert "Unlike the training data" not in texts(at.warning)
    no_traceback(at)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_upload_one_image(task):
    at = upload(select_task(new_app(), task), sample(task, 0))
    spec = get_task(task)
    labels = predicted_labels(at)
    assert len(labels) == 1 and labels[0] in spec.class_names
    assert not at.error
    # the 28-px input, the Grad-CAM overlay with its slider, the probability chart
    assert len(at.image) >= 2
    assert at.slider(key="opacity_single").value == pytest.approx(0.5)
    assert len(at.get("vega_lite_chart")) >= 1
    captions = texts(at.caption)
    image_captions = " ".join(c for image in at.image for c in image.captions)
    assert "What the model saw" in image_captions and "Grad-CAM" in image_captions
    assert "colour scale" in image_captions  # the key drawn under the heatmap is explained
    assert_every_image_has_alt_text(at)
    if spec.decision == "threshold":
        verdicts = texts(at.warning) + texts(at.info)
        assert (aps.BREAST_POSITIVE in verdicts) != (aps.BREAST_NEGATIVE in verdicts)
        assert "threshold" in verdicts and "P(malignant)" in verdicts
        assert aps.BREAST_NOTE in captions and aps.BREAST_CHART_NOTE in captions
        assert "On the official test split the model as served here flagged" in captions  # from the card
        assert "calibrated on 78 validation images, 27% (21) of them malignant" in captions  # from the card
        line = [m.value for m in at.markdown if m.value.startswith(PREFIX)][0]
        assert "flagged: P(malignant)" in line and "the threshold of" in line  # the rule, in the headline
    else:
        assert "Calibrated probability" in captions and aps.BLOOD_SCOPE_NOTE in captions
        assert "calibrated on the validation split's cell mix" in captions
    assert "This image was reduced" not in captions  # a 28-px thumbnail goes in as it is
    no_traceback(at)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_an_image_the_app_reduced_says_how_much_resizing_moved_the_answers(task):
    """A full-size upload is reduced to 28 px; the card's measured round trip says what that costs."""
    from medclassify.inference import get_predictor

    predictor = get_predictor(task)
    for item in aps.list_samples(task):  # the first sample the OOD rule still accepts at 280 px
        buffer = io.BytesIO()
        Image.open(item.path).resize((280, 280), Image.BICUBIC).save(buffer, format="PNG")
        prediction = predictor.predict(buffer.getvalue())
        if not prediction.ood:
            break
    else:
        pytest.fail(f"every {task} sample is flagged at 280 px")
    note = aps.resize_note(predictor.card, prediction, predictor.precision)
    # a 280-px blood image is taken for a microscope frame: MedMNIST's centre crop (200/360 of it), then the reduction
    assert note.startswith("This image was cropped to its centre 156×156 px" if task == "blood"
                           else "This image was reduced from 280×280 to 28×28 px.")
    assert "In a check on the official test split" in note
    at = upload(select_task(new_app(), task), [("big.png", buffer.getvalue(), "image/png")])
    assert note in texts(at.caption)
    no_traceback(at)


def test_borderline_breast_answer_is_marked_uncertain(monkeypatch):
    """A P(malignant) a hair from the threshold must not look as firm as one far from it."""
    name, data, mime = sample("breast", 0)
    at = upload(select_task(new_app(), "breast"), (name, data, mime))
    prediction = at.session_state["results"][1][0].prediction
    firm = aps.close_call(prediction) is None
    assert any("Borderline" in w.value for w in at.warning) == (not firm)
    # move the threshold next to this image's score: the same image is now borderline
    from medclassify.inference import get_predictor

    monkeypatch.setattr(get_predictor("breast"), "threshold", float(prediction.p_positive) + 0.01)
    at = upload(select_task(new_app(), "breast"), (name, data, mime))
    assert any("Borderline" in w.value and "Treat this answer as uncertain" in w.value for w in at.warning)
    no_traceback(at)


def test_camera_photo_is_not_run_through_the_other_classifier():
    at = new_app()
    at.radio(key="source").set_value("Camera").run()
    at.camera_input(key="camera_blood").set_value(("photo.jpg", jpeg(aps.list_samples("blood")[0].path),
                                                   "image/jpeg")).run()
    assert predicted_labels(at) or "Unlike the training data" in texts(at.warning)
    at = select_task(at, "breast")
    assert [c.key for c in at.camera_input] == ["camera_breast"]
    assert not predicted_labels(at) and "Unlike the training data" not in texts(at.warning)
    no_traceback(at)


def test_opacity_slider_reuses_the_results():
    at = upload(new_app(), sample("blood", 4))
    results = at.session_state["results"]
    at.slider(key="opacity_single").set_value(0.9).run()
    assert not at.exception
    assert at.session_state["results"][1] is results[1]  # not classified again
    assert len(predicted_labels(at)) == 1
    at.slider(key="opacity_single").set_value(0.0).run()
    assert not at.exception


def test_bad_file_shows_one_line_error():
    at = upload(new_app(), ("corrupt.png", b"definitely not a png", "image/png"))
    assert len(at.error) == 1
    message = at.error[0].value
    assert "corrupt.png" in message and "not a recognised image file" in message
    assert "\n" not in message
    assert not predicted_labels(at)
    no_traceback(at)


def test_truncated_image_error():
    name, data, mime = sample("breast", 0)
    at = upload(select_task(new_app(), "breast"), ("cut.png", data[: len(data) // 2], mime))
    assert len(at.error) == 1 and "cut.png" in at.error[0].value
    no_traceback(at)


def test_ood_warning_instead_of_a_label():
    """A grayscale ultrasound sent to the blood model: warning with reasons, no label."""
    at = upload(new_app(), sample("breast", 0))
    assert not predicted_labels(at)
    warnings = [w.value for w in at.warning if "Unlike the training data" in w.value]
    assert len(warnings) == 1
    assert aps.UNRELIABLE in warnings[0]
    assert "grayscale" in warnings[0]  # the reason from ood.py
    assert aps.other_classifier_hint("blood") in warnings[0]  # where the image belongs
    expanders = [e.label for e in at.expander]
    assert any("unreliable" in label for label in expanders)
    assert_every_image_has_alt_text(at)
    assert all("blood cell" not in p.alt for e in at.image for p in e.proto.imgs)  # it is not one
    no_traceback(at)


def test_ood_colour_image_to_breast_model():
    at = upload(select_task(new_app(), "breast"), sample("blood", 0))
    assert not predicted_labels(at)
    assert any("Unlike the training data" in w.value and "colour image" in w.value
               and "'Blood cell type' classifier" in w.value for w in at.warning)


def test_dicom_upload(awkward_files):
    path = awkward_files["dicom"]
    at = upload(select_task(new_app(), "breast"), (path.name, path.read_bytes(), "application/dicom"))
    assert not at.error
    # a synthetic gradient is not an ultrasound: a label or the OOD warning, never a crash
    assert predicted_labels(at) or any("Unlike the training data" in w.value for w in at.warning)
    no_traceback(at)


# --------------------------------------------------------------------------- gallery, camera


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sample_gallery_one_click(task):
    at = select_task(new_app(), task)
    at.radio(key="source").set_value("Sample gallery").run()
    samples = aps.list_samples(task)
    assert_every_image_has_alt_text(at)  # the tiles
    # each tile's button has its own accessible name: the sample's true class and number
    names = [at.button(key=f"sample_{task}_{s.path.stem}").label for s in samples]
    assert names == [s.caption for s in samples] and len(set(names)) == len(samples)
    chosen = samples[-1]
    at.button(key=f"sample_{task}_{chosen.path.stem}").click().run()
    assert not at.exception
    labels = predicted_labels(at)
    assert len(labels) == 1 and labels[0] in get_task(task).class_names
    assert any(f"true class: **{chosen.label}**" in c.value for c in at.caption)
    # the tiles fold away under the result; another sample can still be picked from there
    assert at.expander[0].label == "Sample gallery: pick another image"  # above the result's own expanders
    at.button(key=f"sample_{task}_{samples[0].path.stem}").click().run()
    assert any(f"true class: **{samples[0].label}**" in c.value for c in at.caption)
    no_traceback(at)


def test_sample_gallery_classify_all():
    at = new_app()
    at.radio(key="source").set_value("Sample gallery").run()
    at.button(key="sample_blood_all").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    samples = aps.list_samples("blood")
    assert len(table) == len(samples)
    assert set(table["label"]) <= set(get_task("blood").class_names) | {aps.NO_ANSWER}
    assert list(table["true_class"]) == [s.label for s in samples]
    answered = table["label"] != aps.NO_ANSWER
    assert (table["agrees"][answered] == (table["label"] == table["true_class"])[answered]).all()


def test_camera_empty_and_photo():
    at = new_app()
    at.radio(key="source").set_value("Camera").run()
    assert len(at.camera_input) == 1
    assert not at.exception and not at.error and not predicted_labels(at)  # nothing taken yet
    at.camera_input(key="camera_blood").set_value(("photo.jpg", b"", "image/jpeg")).run()
    assert not at.exception
    assert len(at.error) == 1 and "empty" in at.error[0].value
    item = aps.list_samples("blood")[0]
    at.camera_input(key="camera_blood").set_value(("photo.jpg", jpeg(item.path), "image/jpeg")).run()
    assert not at.exception and not at.error
    assert predicted_labels(at) or any("Unlike the training data" in w.value for w in at.warning)
    at.camera_input(key="camera_blood").set_value(None).run()
    assert not at.exception and not predicted_labels(at)


# --------------------------------------------------------------------------- batch


@pytest.mark.parametrize("task", sorted(TASKS))
def test_batch_upload_table_progress_csv(task):
    spec = get_task(task)
    files = [sample(task, i) for i in range(3)] + [("broken.png", b"\x89PNG\r\n\x1a\nnope", "image/png")]
    at = upload(select_task(new_app(), task), files)
    # the bad file: an inline one-line error; the others proceed
    assert len(at.error) == 1 and "broken.png" in at.error[0].value
    table = at.dataframe[0].value
    assert list(table["file"]) == [f[0] for f in files]
    expected = ["file", "label"] + (["p_malignant", "threshold"] if spec.decision == "threshold"
                                    else ["confidence"]) + ["close_call", "ood", "warnings", "error"]
    assert list(table.columns) == expected
    assert set(table["label"][:3]) <= set(spec.class_names) | {aps.NO_ANSWER}
    assert table["error"].iloc[3] and not table["error"].iloc[:3].any()
    assert at.dataframe[0].proto.placeholder == aps.NO_VALUE  # the broken file's empty cells: a dash, not "None"
    assert len(at.get("download_button")) == 1
    assert len(at.get("progress")) == 1
    assert any("4 images" in m.value for m in at.markdown)
    # the first readable image is shown in detail, another one can be inspected
    inspect = at.selectbox(key="inspect")
    assert inspect.options == [f[0] for f in files[:3]]
    inspect.set_value(2).run()
    assert not at.exception
    assert len(predicted_labels(at)) + sum("Unlike the training data" in w.value for w in at.warning) == 1
    no_traceback(at)


def test_batch_of_only_bad_files():
    at = upload(new_app(), [("a.png", b"x", "image/png"), ("b.gif", b"", "image/gif")])
    assert len(at.error) == 2
    assert list(at.dataframe[0].value["file"]) == ["a.png", "b.gif"]
    assert len(at.selectbox) == 0
    no_traceback(at)


# --------------------------------------------------------------------------- about


@pytest.mark.parametrize("task", sorted(TASKS))
def test_about_the_model(task):
    at = select_task(new_app(), task)
    markdown = texts(at.markdown)
    for heading in ("Intended use", "Decision rule", "Performance", "Limitations", "Data and licences",
                    "Training"):
        assert heading in markdown
    assert "CC BY 4.0" in markdown
    assert any("not a medical device" in w.value for w in at.warning)
    from medclassify.inference import get_predictor

    predictor = get_predictor(task)
    assert f"**How answers are computed.** {aps.serving_text(predictor.card, predictor.precision)}" in markdown
    if predictor.precision == "int8":  # the performance table shows the copy that answers beside the model
        served = at.dataframe[0].value[aps.SERVED_COLUMN]
        assert served.isna().any() and served.notna().any()  # some metrics the copy was not measured on
        assert at.dataframe[0].proto.placeholder == aps.NO_VALUE  # shown as a dash, not "None"
    command = aps.training_command(predictor.card)
    if command:
        assert any(command in c.value for c in at.code)
    if get_predictor(task).card.get("test") is None:
        assert any("Test-set results are not in this model card yet" in i.value for i in at.info)
    note = aps.size_note(predictor.card, predictor.precision)
    assert "In a check on the official test split, where each image was enlarged" in note
    assert note in markdown  # the shipped card's round trip, in Limitations


def test_about_with_test_metrics_and_confidence_intervals(monkeypatch):
    from medclassify.inference import get_predictor

    predictor = get_predictor("breast")
    card = dict(predictor.card)
    card["test"] = {"accuracy": 0.85, "auc": 0.9, "n": 156, "sensitivity": 0.8, "specificity": 0.87,
                    "ci95": {"accuracy": [0.8, 0.9], "auc": [0.85, 0.95]},
                    "confusion_matrix": [[33, 9], [15, 99]]}
    monkeypatch.setattr(predictor, "card", card)
    at = select_task(new_app(), "breast")
    assert any("Official MedMNIST test split (156 images), 95% bootstrap" in c.value for c in at.caption)
    metrics = at.dataframe[0].value
    assert "95% CI" in metrics.columns
    assert "0.800 – 0.900" in set(metrics["95% CI"])
    assert any("Confusion matrix (test, float model)" in m.value for m in at.markdown)
    if aps.SERVED_COLUMN in metrics:  # shown with 4 decimals, a dash where the copy was not measured
        shown = json.loads(at.dataframe[0].proto.columns)[aps.SERVED_COLUMN]["type_config"]
        assert shown["format"] == "%.4f" and at.dataframe[0].proto.placeholder == aps.NO_VALUE
    assert any(aps.SIZE_NOTE in m.value for m in at.markdown)
    no_traceback(at)


def test_about_with_an_empty_card(monkeypatch):
    from medclassify.inference import get_predictor

    monkeypatch.setattr(get_predictor("blood"), "card", {})
    at = new_app()
    assert any("no evaluation metrics" in i.value for i in at.info)
    assert any("Intended use" in m.value for m in at.markdown)
    no_traceback(at)


# --------------------------------------------------------------------------- robustness and privacy


def test_model_that_cannot_load_gives_a_message(monkeypatch):
    import streamlit as st

    from medclassify import inference

    def broken(task, model_path=None):
        raise OSError("disk on fire\nTraceback (most recent call last):")

    st.cache_resource.clear()
    monkeypatch.setattr(inference, "get_predictor", broken)
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
        assert not at.exception
        assert any("could not be loaded" in e.value and "operator" in e.value for e in at.error)  # a damaged file
        assert "disk on fire" not in texts(at.error)
    finally:
        monkeypatch.undo()
        st.cache_resource.clear()


@pytest.mark.parametrize("error", [FileNotFoundError("model file /srv/app/model_blood.h5 not found"),
                                   ValueError("MEDCLASSIFY_SERVING_PRECISION must be int8 or float\nmore"),
                                   ValueError("model card model_blood.card.json is not valid JSON (x, line 5)")])
def test_a_model_the_operator_must_fix_says_why(monkeypatch, error):
    """Waiting does not bring back a missing model file or mend a bad setting: the page says which it is."""
    import streamlit as st

    from medclassify import inference

    def broken(task, model_path=None):
        raise error

    st.cache_resource.clear()
    monkeypatch.setattr(inference, "get_predictor", broken)
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
        assert not at.exception and len(at.error) == 1
        message = at.error[0].value
        assert str(error).splitlines()[0].replace("/srv/app/", "") in message  # no folder of the server shown
        assert "operator" in message and "\n" not in message and "/srv" not in message
        assert "try again later" not in message
    finally:
        monkeypatch.undo()
        st.cache_resource.clear()


def test_the_environment_names_the_served_model(monkeypatch, tiny_models, tmp_path):
    """$MEDCLASSIFY_BREAST_MODEL serves a retrained model without replacing the shipped one."""
    import streamlit as st

    image = sample("breast")  # picked by the shipped model, before the setting
    st.cache_resource.clear()
    try:
        monkeypatch.setenv("MEDCLASSIFY_BREAST_MODEL", str(tiny_models["breast"].path))
        at = upload(select_task(new_app(), "breast"), [image])
        assert not at.error  # an answer or the OOD warning: the tiny model may find the image unlike its data
        assert len(predicted_labels(at)) == 1 or any("Unlike the training data" in w.value for w in at.warning)
        assert any("Model file: tiny_breast.h5" in c.value for c in at.caption)  # the About tab names it

        st.cache_resource.clear()
        monkeypatch.setenv("MEDCLASSIFY_BREAST_MODEL", str(tmp_path / "retrained.h5"))
        at = select_task(new_app(), "breast")
        assert len(at.error) == 1 and "model file retrained.h5 not found" in at.error[0].value
    finally:
        monkeypatch.undo()
        st.cache_resource.clear()


def test_explainer_that_cannot_be_built_costs_only_the_overlay(monkeypatch):
    import streamlit as st

    from medclassify import explain

    def broken(model):
        raise ValueError("model has no logits layer")

    st.cache_resource.clear()
    monkeypatch.setattr(explain, "explainer_for", broken)
    try:
        at = upload(new_app(), sample("blood", 0))
        assert len(predicted_labels(at)) == 1 and not at.error
        assert "Grad-CAM explanation is not available" in texts(at.caption)
        assert "no logits layer" not in texts(at.caption)
        no_traceback(at)
    finally:
        monkeypatch.undo()
        st.cache_resource.clear()


def test_uploads_are_not_written_to_disk():
    """Upload an image carrying a unique marker; no file created meanwhile contains it."""
    marker = secrets.token_hex(16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("marker", marker)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    start = time.time() - 1
    at = upload(new_app(), ("private.png", buffer.getvalue(), "image/png"))
    assert predicted_labels(at) or at.warning
    roots = [REPO_ROOT, Path(tempfile.gettempdir())]
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".venv", ".git", "__pycache__")]
            for name in files:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                    if stat.st_mtime < start or stat.st_size > 50_000_000:
                        continue
                    assert marker.encode() not in path.read_bytes(), path
                except (OSError, PermissionError):
                    continue


def test_streamlit_config():
    import streamlit.config as config

    settings = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert settings["server"]["maxUploadSize"] == 20
    assert settings["browser"]["gatherUsageStats"] is False
    assert settings["client"]["showErrorDetails"] == "none"
    options = config._config_options_template
    for section, values in settings.items():
        for key in values:
            assert f"{section}.{key}" in options, f"unknown Streamlit option {section}.{key}"
    assert "none" in {o.value for o in config.ShowErrorDetailsConfigOptions}


def test_app_is_ui_only():
    """app.py lays out widgets; it does not touch files the user sent."""
    source = Path(APP).read_text()
    assert "open(" not in source and "write_bytes" not in source and "NamedTemporaryFile" not in source
    assert "model.predict(" not in source
