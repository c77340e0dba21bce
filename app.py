"""medclassify web app: classify blood-cell and breast-ultrasound images.

    streamlit run app.py

User interface only: the processing lives in ``medclassify`` (``appsupport``
for uploads, tables and wording, ``explain`` for Grad-CAM, ``inference`` for
the models).  Uploads stay in memory; nothing is written to disk.
"""
from __future__ import annotations

import logging

import altair as alt
import streamlit as st

st.set_page_config(page_title="medclassify: MedMNIST image classifier", page_icon=":material/biotech:", layout="wide")

from medclassify import appsupport as aps  # noqa: E402
from medclassify.cards import INTENDED_USE, LIMITATIONS  # noqa: E402
from medclassify.inference import BORDERLINE, CLOSE_CALL  # noqa: E402
from medclassify.registry import TASKS, get_task  # noqa: E402

log = logging.getLogger("medclassify.app")

SOURCES = ("Upload images", "Camera", "Sample gallery")
MAX_ERRORS_SHOWN = 20


@st.cache_resource(show_spinner="Loading the model (once)…")
def load_predictor(task: str):
    from medclassify.inference import get_predictor

    # TensorFlow keeps its default thread pools (or $MEDCLASSIFY_TF_INTRA_OP_THREADS). The int8 copies that
    # serve barely notice the setting, but the float candidate models lost 38-49% of their batch throughput
    # to one intra-op thread (benchmarks/RESULTS.md, "runtime settings"), so float serving might too.
    return get_predictor(task)


@st.cache_resource(show_spinner=False)
def load_explainer(task: str):
    from medclassify.explain import explainer_for

    return explainer_for(load_predictor(task).model).warm_up()


# ---------------------------------------------------------------------------
# Inputs


def choose_task() -> str:
    options = list(TASKS)
    task = st.radio(
        "Choose the classifier",
        options,
        format_func=lambda name: TASKS[name].title,
        captions=[TASKS[name].description for name in options],
        horizontal=True,
        key="task",
    )
    spec = get_task(task)
    st.info(f"**Expected input — {spec.title}:** {spec.expected_input}", icon=":material/image:")
    return task


def upload_items(task: str) -> list[tuple[str, bytes]]:
    files = st.file_uploader(
        aps.UPLOAD_LABEL,
        type=list(aps.UPLOAD_TYPES),
        accept_multiple_files=True,
        key=f"upload_{task}",  # one per classifier: switching never runs one task's images through the other
        help="Files are processed in memory only and are never stored.",
    )
    return [(f.name, f.getvalue()) for f in files or []]


def camera_items(task: str) -> list[tuple[str, bytes]]:
    photo = st.camera_input(
        "Take a photo of the image", key=f"camera_{task}",  # one per classifier, like the uploader
        help="The photo is processed in memory only and never stored. A photo of a screen or a print is "
             "rarely like the training images (glare, colour cast, moiré), so expect the 'unlike the training "
             "data' warning; uploading the image file itself works better.")
    if photo is None:
        return []
    return [(photo.name or "camera.jpg", photo.getvalue())]


def _pick_sample(task: str, name: str) -> None:
    st.session_state["sample"] = (task, name)


def sample_items(task: str) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The picked samples as (name, bytes), and their true classes by name."""
    samples = aps.list_samples(task)
    if not samples:
        st.info("No sample images are installed (run `python scripts/make_samples.py`).")
        return [], {}
    chosen_task, chosen = st.session_state.get("sample") or (None, None)
    if chosen_task != task:
        chosen = None
    # Once a sample is picked, the tiles fold away so its result is not pushed below the fold.
    gallery = st.expander("Sample gallery: pick another image") if chosen else st.container()
    with gallery:
        st.caption("Images from the official MedMNIST **test** split (never used for training), the first "
                   "few of each class in the split's order. The button under each image names its true class: "
                   "click it to classify the image. They were not picked to flatter the model: it gets some wrong, "
                   "and a few get the 'unlike the training data' warning, as its test numbers predict.")
        per_row = 8
        for start in range(0, len(samples), per_row):
            columns = st.columns(per_row, vertical_alignment="bottom")
            for column, sample in zip(columns, samples[start:start + per_row]):
                with column:
                    try:
                        st.image(aps.upscale(_read_sample(str(sample.path)), 84), width=84,
                                 alt=aps.sample_alt(task))
                    except Exception:
                        log.exception("sample image %s could not be shown", sample.name)
                        st.caption("(preview unavailable)")  # the button below still names the sample
                    # The button carries the true class, so each one has its own accessible name.
                    st.button(sample.caption, key=f"sample_{task}_{sample.path.stem}", on_click=_pick_sample,
                              args=(task, sample.name), help=f"Classify {sample.caption}", width="stretch", wrap=True)
        st.button(f"Classify all {len(samples)} samples", key=f"sample_{task}_all", on_click=_pick_sample,
                  args=(task, "*"))
    if not chosen:
        return [], {}
    picked = samples if chosen == "*" else [s for s in samples if s.name == chosen]
    if len(picked) == 1:
        st.caption(f"Sample **{picked[0].name}** — true class: **{picked[0].label}**")
    return [(s.name, s.path.read_bytes()) for s in picked], {s.name: s.label for s in picked}


@st.cache_data(show_spinner=False, max_entries=32)  # in memory only: uploads never reach the disk
def _preview(data: bytes, background: int):
    """The upload as decoded, once per file: every rerun (a slider, a tab) would decode it again."""
    return aps.preview(data, background=background)


@st.cache_data(show_spinner=False, max_entries=64)
def _read_sample(path: str):
    from medclassify.preprocessing import open_image

    import numpy as np

    return np.asarray(open_image(path))


# ---------------------------------------------------------------------------
# Results


def probability_chart(prediction, spec):
    frame = aps.probabilities_frame(prediction)
    base = alt.Chart(frame).encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%", title="probability")),
        y=alt.Y("class:N", sort=list(spec.class_names), title=None, axis=alt.Axis(labelLimit=220)),
        tooltip=[alt.Tooltip("class:N"), alt.Tooltip("shown:N", title="probability")],
    )
    bars = base.mark_bar(color="#4c78a8")
    labels = base.mark_text(align="left", dx=3).encode(text=alt.Text("shown:N"))
    return (bars + labels).properties(height=max(140, 28 * len(spec.class_names) + 40))


def threshold_chart(prediction, spec):
    import pandas as pd

    positive = spec.class_names[spec.positive_class]
    frame = pd.DataFrame({"what": [f"P({positive})"], "value": [float(prediction.p_positive)],
                          "threshold": [float(prediction.threshold)]})
    x = alt.X("value:Q", scale=alt.Scale(domain=[0, 1]),
              axis=alt.Axis(format="%", title=None, values=[0, 0.25, 0.5, 0.75, 1]))
    bar = alt.Chart(frame).mark_bar(color="#e45756" if prediction.class_index == spec.positive_class
                                    else "#4c78a8", size=22).encode(x=x, y=alt.Y("what:N", title=None))
    rule = alt.Chart(frame).mark_tick(color="black", thickness=3, size=34).encode(
        x="threshold:Q", y=alt.Y("what:N", title=None), tooltip=[alt.Tooltip("threshold:Q", format=".3f")])
    label = alt.Chart(frame).mark_text(align="left", dx=5, dy=-20, fontSize=11).encode(  # above the bar, not on it
        x="threshold:Q", y=alt.Y("what:N", title=None),
        text=alt.value(f"threshold {aps.percent(float(prediction.threshold))}"))
    # fit-x only: Streamlit's default also fits y, squeezing the axis labels out of a chart this short
    return (bar + rule + label).properties(height=60, padding={"top": 16, "left": 5, "right": 5, "bottom": 5},
                                           autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))


def show_model_view(prediction, data: bytes | None) -> None:
    st.image(aps.upscale(prediction.model_input, 196), width=196, caption=aps.model_view_caption(prediction),
             alt=aps.model_view_alt(prediction))
    if data is not None:
        original = _preview(data, get_task(prediction.task).background)
        if original is not None:
            with st.expander("Your image as uploaded"):
                st.image(original, alt="Your image as uploaded")


@st.fragment
def show_gradcam(prediction, task: str, key: str) -> None:
    """The overlay and its opacity slider (a fragment: moving the slider redraws only this)."""
    opacity = st.slider("Grad-CAM opacity", 0.0, 1.0, 0.5, 0.05, key=f"opacity_{key}",
                        help="0 shows only the image, 1 only the heatmap. The colour scale underneath stays.")
    try:
        from medclassify.explain import overlay, with_colour_key

        index, name = aps.explained_class(prediction)
        heatmap = load_explainer(task)(prediction.model_input, index)
        why = ("" if name == prediction.label else " (the class the threshold looks for, whatever the answer: "
               "there is a red spot even when P is low, so the colours show where, not how much)")
        st.image(with_colour_key(overlay(prediction.model_input, heatmap, opacity, size=196)), width=196,
                 alt=aps.gradcam_alt(prediction),
                 caption=f"Grad-CAM for '{name}'{why}. The strip underneath is the colour scale: blue influenced "
                         "the model least, red most, relative to this image's strongest evidence (so there is "
                         "always a red spot). A coarse map of where its evidence lay, not an outline of a cell or "
                         "lesion.")
    except Exception:
        log.exception("Grad-CAM failed")
        st.caption("The Grad-CAM explanation is not available for this image.")


def show_result(result: "aps.ImageResult", spec, task: str, data: bytes | None, key: str) -> None:
    """Everything about one image."""
    if not result.ok:
        st.error(f"**{result.name}**: {result.error}", icon=":material/error:")
        return
    prediction = result.prediction
    if prediction.ood:
        reasons = "\n".join(f"- {reason}" for reason in prediction.warnings)
        hint = "".join(f"\n\n{line}" for line in aps.ood_hints(prediction))
        st.warning(f"**Unlike the training data — no reliable answer** ({result.name})\n\n{aps.UNRELIABLE}\n\n"
                   f"{reasons}\n\nThe {spec.title.lower()} classifier expects: {spec.expected_input}{hint}",
                   icon=":material/warning:")
        left, right = st.columns([1, 2])
        with left:
            show_model_view(prediction, data)
        with right:
            predictor = load_predictor(task)
            rate = aps.ood_test_rate(predictor.card, predictor.precision)
            if rate is not None:
                st.caption(f"The rule is strict on purpose: it also flags {rate:.1%} of the genuine MedMNIST test "
                           "images, rather than answer for an image it cannot vouch for.")
            with st.expander("Model output (unreliable — for transparency only)", expanded=False):
                st.caption("The rule puts this image outside what the model was trained on, so these numbers "
                           "do not mean what they would for a suitable image.")
                st.altair_chart(probability_chart(prediction, spec), width="stretch")
        return

    with st.container(key=f"prediction_{key}"):
        st.markdown(aps.prediction_markdown(prediction))
    if spec.decision == "threshold":
        positive, sentence = aps.breast_verdict(prediction)
        if positive:
            st.warning(sentence, icon=":material/clinical_notes:")
        else:
            st.info(sentence, icon=":material/info:")
    squashed = aps.squash_note(prediction)
    if squashed:
        st.warning(squashed, icon=":material/aspect_ratio:")
    close = aps.close_call(prediction)
    if close:
        st.warning(f"{close} Treat this answer as uncertain.", icon=":material/balance:")
    predictor = load_predictor(task)
    mix = aps.calibration_mix_note(predictor.card, prediction)
    resized = aps.resize_note(predictor.card, prediction, predictor.precision)
    if spec.decision == "threshold":
        st.altair_chart(threshold_chart(prediction, spec), width="stretch")
        record = aps.breast_test_record(predictor.card, predictor.precision)
        st.caption(" ".join(part for part in (aps.BREAST_NOTE, record, mix, resized) if part))
    else:
        st.caption(f"Calibrated probability of '{prediction.label}': {aps.percent(aps.confidence(prediction))}. "
                   f"A model's suggestion for research and education, not a diagnosis. {aps.BLOOD_SCOPE_NOTE}"
                   + "".join(f" {part}" for part in (mix, resized) if part))
    col_input, col_cam, col_probs = st.columns([1, 1, 1.4])
    with col_input:
        show_model_view(prediction, data)
    with col_cam:
        show_gradcam(prediction, task, key)
    with col_probs:
        st.markdown("**Calibrated probabilities**")
        if spec.decision == "threshold":
            st.caption(aps.BREAST_CHART_NOTE)
        st.altair_chart(probability_chart(prediction, spec), width="stretch")


def classify(task: str, predictor, items: list[tuple[str, bytes]]) -> list["aps.ImageResult"]:
    """Results of the current inputs, reused while they do not change (e.g. moving a slider)."""
    key = aps.inputs_key(task, items)
    cached = st.session_state.get("results")
    if cached and cached[0] == key:
        if len(items) > 1:
            st.progress(1.0, text=f"Classified {len(items)} of {len(items)} images")
        return cached[1]
    if len(items) == 1:
        results = [aps.process_image(predictor, *items[0])]
    else:
        bar = st.progress(0.0, text=f"Classifying {len(items)} images…")

        def progress(done: int, total: int) -> None:
            bar.progress(done / total, text=f"Classified {done} of {total} images")

        results = aps.process_batch(predictor, items, batch_size=32, on_progress=progress)
    st.session_state["results"] = (key, results)
    return results


def show_batch(results, spec, task: str, items, truth: dict[str, str] | None = None) -> None:
    counts = aps.summary(results)
    st.markdown(f"**{counts['total']} images:** {counts['classified']} classified, "
                f"{counts['unreliable']} unlike the training data (no reliable answer), "
                f"{counts['failed']} could not be read.")
    failed = [r for r in results if not r.ok]
    for result in failed[:MAX_ERRORS_SHOWN]:
        st.error(f"**{result.name}**: {result.error}", icon=":material/error:")
    if len(failed) > MAX_ERRORS_SHOWN:
        st.caption(f"…and {len(failed) - MAX_ERRORS_SHOWN} more files that could not be read (see the table).")
    table = aps.results_table(results, spec, truth)
    # A file with no answer has no score: a dash, not the grid's default "None", which reads like a class name.
    st.dataframe(table, hide_index=True, width="stretch", placeholder=aps.NO_VALUE, column_config={
        "file": st.column_config.TextColumn("file", pinned=True),  # stays in view when the table scrolls sideways
        "true_class": st.column_config.TextColumn("true class"),
        "agrees": st.column_config.CheckboxColumn("label = true class"),
        "confidence": st.column_config.NumberColumn("confidence", format="%.3f"),
        "p_malignant": st.column_config.NumberColumn("P(malignant)", format="%.3f"),
        "threshold": st.column_config.NumberColumn("threshold", format="%.3f"),
        "close_call": st.column_config.CheckboxColumn(
            "close call", help="Not a firm answer: inspect the image (blood: two classes within "
                               f"{CLOSE_CALL * 100:.0f} percentage points; breast: P(malignant) within "
                               f"{BORDERLINE * 100:.0f} percentage points of the threshold)"),
        "ood": st.column_config.CheckboxColumn("unlike training data"),
        "warnings": st.column_config.TextColumn("warnings", width="large"),
        "error": st.column_config.TextColumn("error", width="large"),
    })
    predictor = load_predictor(task)
    csv = aps.results_csv(table, predictor.card, aps.decision_text(predictor.card, spec, predictor.threshold))
    st.download_button("Download results (CSV)", csv, file_name=aps.csv_name(task),
                       mime="text/csv", on_click="ignore", key="download_csv")
    readable = [i for i, r in enumerate(results) if r.ok]
    if not readable:
        return
    st.divider()
    index = st.selectbox("Inspect one image", readable, format_func=lambda i: results[i].name, key="inspect")
    if index is None:
        return
    show_result(results[index], spec, task, items[index][1], key=f"batch_{index}")


def classify_tab(task: str, predictor) -> None:
    spec = get_task(task)
    source = st.radio("Input", SOURCES, horizontal=True, key="source", label_visibility="collapsed")
    truth = None  # true classes, known only for gallery samples
    if source == SOURCES[0]:
        items = upload_items(task)
    elif source == SOURCES[1]:
        items = camera_items(task)
    else:
        items, truth = sample_items(task)
    if not items:
        if source == SOURCES[0]:
            st.caption("Upload an image to classify it, or try the sample gallery.")
        return
    results = classify(task, predictor, items)
    if len(results) == 1:
        show_result(results[0], spec, task, items[0][1], key="single")
    else:
        show_batch(results, spec, task, items, truth)


# ---------------------------------------------------------------------------
# About the model


def _table_height(rows: int) -> int:
    """Tall enough to show every row without an inner scrollbar."""
    return 35 * (rows + 1) + 3


def about_tab(task: str, predictor) -> None:
    spec = get_task(task)
    card = predictor.card or {}
    st.subheader(f"About the model: {spec.title}")
    st.warning(aps.DISCLAIMER, icon=":material/warning:")
    st.markdown(f"{card.get('description') or spec.description}\n\n**Expected input.** {spec.expected_input}")
    st.markdown(f"**Intended use.** {card.get('intended_use') or INTENDED_USE}")
    st.markdown(f"**Decision rule.** {aps.decision_text(card, spec, predictor.threshold)}")

    st.markdown("#### Performance")
    split, metrics = aps.card_metrics(card)
    if metrics is None:
        st.info("This model card has no evaluation metrics yet.")
    else:
        n = metrics.get("n")
        if split == "test":
            has_ci = bool(metrics.get("ci95"))
            st.caption(f"Official MedMNIST test split{f' ({n} images)' if n else ''}"
                       + (", 95% bootstrap confidence intervals." if has_ci else "."))
        else:
            st.info(f"Test-set results are not in this model card yet. Shown: the validation split"
                    f"{f' ({n} images)' if n else ''}, which was used to select the model, its calibration and "
                    "threshold — so these numbers are optimistic.")
        table = aps.metrics_frame(metrics, aps.served_metrics(card, split, predictor.precision))
        if not table["95% CI"].astype(bool).any():
            table = table.drop(columns="95% CI")
        st.dataframe(table, hide_index=True, width="stretch", height=_table_height(len(table)),
                     placeholder=aps.NO_VALUE,  # a metric the int8 copy was not measured on
                     column_config={"metric": st.column_config.TextColumn("metric", pinned=True),
                                    "value": st.column_config.NumberColumn("value", format="%.4f"),
                                    aps.SERVED_COLUMN: st.column_config.NumberColumn(aps.SERVED_COLUMN,
                                                                                     format="%.4f")})
        confusion = aps.confusion_frame(metrics, spec.class_names)
        if confusion is not None:
            st.markdown(f"**Confusion matrix ({split}, float model)** — rows: true class, "
                        "columns: predicted class")
            st.dataframe(confusion, width="stretch", height=_table_height(len(confusion)))
        per_class = aps.per_class_frame(metrics)
        if per_class is not None:
            with st.expander("Per-class precision, recall and F1"):
                st.dataframe(per_class, hide_index=True, width="stretch", height=_table_height(len(per_class)))

    st.markdown(f"**How answers are computed.** {aps.serving_text(card, predictor.precision)}")
    calibration = card.get("calibration") or {}
    if calibration.get("temperature") is not None:
        st.markdown(f"**Calibration.** {calibration.get('method', 'temperature scaling')}; "
                    f"T = {float(calibration['temperature']):.3f}.")
    ood = card.get("ood") or {}
    st.markdown("**Unlike the training data.** " + (ood.get("method") or "modality and blank-image rules")
                + (f"; threshold: {ood['threshold_rule']}." if ood.get("threshold_rule") else "."))

    st.markdown("#### Limitations")
    limitations = list(card.get("limitations") or LIMITATIONS.get(spec.name, []))
    limitations.append(aps.size_note(card, predictor.precision))
    st.markdown("\n".join(f"- {item}" for item in limitations))

    st.markdown("#### Data and licences")
    data = card.get("data") or {}
    st.markdown(
        f"- **Dataset:** {data.get('dataset', spec.flag)} — {data.get('source', spec.source)}\n"
        f"- **Licence:** {data.get('licence', spec.licence)}\n"
        f"- **Citation:** {data.get('citation', spec.citation)}\n"
        + (f"- **Splits:** {data['splits']}\n" if data.get("splits") else "")
    )

    st.markdown("#### Training")
    command = aps.training_command(card)
    if command:
        st.code(command, language="bash")
    training = card.get("training") or {}
    facts = []
    best = training.get("best_epoch")
    if best is not None:
        facts.append(f"best epoch of each ensemble member {best}" if isinstance(best, list) else f"best epoch {best}")
    if training.get("seed") is not None:
        facts.append(f"seed {training['seed']}")
    if training.get("wall_time_s") is not None:
        facts.append(f"training time {aps.duration(training['wall_time_s'])}")
    env = training.get("environment") or {}
    if env:
        facts.append(", ".join(f"{k} {v}" for k, v in env.items()))
    if facts:
        st.caption("; ".join(facts))
    st.caption(f"Model file: {predictor.model_path.name}" + (f" (card created {card['created']})"
                                                            if card.get("created") else ""))


# ---------------------------------------------------------------------------


def main() -> None:
    st.title(":material/biotech: MedMNIST image classifier")
    st.caption(aps.DISCLAIMER)
    task = choose_task()
    try:
        predictor = load_predictor(task)
    except Exception as exc:
        log.exception("model load failed")
        st.error(aps.load_failure_message(get_task(task).title, exc))
        return
    try:
        load_explainer(task)  # warmed now so the first overlay is quick; without it, predictions still work
    except Exception:
        log.exception("Grad-CAM explainer could not be built")
    classify_panel, about_panel = st.tabs(["Classify", "About the model"])
    with classify_panel:
        try:
            classify_tab(task, predictor)
        except Exception:
            log.exception("classification failed")
            st.error("Something went wrong while classifying. Please try another image.")
    with about_panel:
        try:
            about_tab(task, predictor)
        except Exception:
            log.exception("model card failed")
            st.error("The model card could not be shown.")


main()
