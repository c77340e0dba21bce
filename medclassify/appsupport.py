"""Everything the web app needs that is not user interface.

``app.py`` only lays out widgets; the processing of uploads, the results table,
the wording of results, the sample gallery and the model-card tables live here
so they can be tested without a browser.  Uploads are handled as ``bytes`` in
memory only: nothing here writes a file.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .inference import BORDERLINE, NO_ANSWER
from .preprocessing import FORMATS_TEXT, IMAGE_ENDINGS, ImageError, is_medmnist_thumbnail
from .registry import REPO_ROOT, TASKS, TaskSpec, get_task

SAMPLE_DIR = REPO_ROOT / "sample_images"

#: File types the uploader accepts (``preprocessing`` decodes all of them).
UPLOAD_TYPES = IMAGE_ENDINGS
UPLOAD_LABEL = f"Upload one or more images ({FORMATS_TEXT})"

DISCLAIMER = (
    "Research and education software: not a medical device. It must not be used for diagnosis, "
    "triage or any clinical decision."
)

#: What a table shows where a number does not exist (an unreadable file's score, a metric never measured).
NO_VALUE = "—"

UNRELIABLE = "This image is unlike the training data, so the app cannot give a reliable answer for it."

#: Wording of the breast result: what the model's threshold rule says, never advice (see DISCLAIMER) and never
#: reassurance: at the shipped threshold the model still misses some malignant images.
BREAST_POSITIVE = "Flagged by this model as possibly malignant"
BREAST_NEGATIVE = "Not flagged by this model"
BREAST_NOT_RULED_OUT = "This does not rule out malignancy."
BREAST_NOTE = (
    "P(malignant) is compared with the model's threshold, which was chosen on the validation split to miss "
    "few malignant images, so some benign images are flagged too. 'normal/benign' is one class: the model does "
    "not tell normal tissue from a benign lesion. This is not a diagnosis: only a qualified clinician with the "
    "full examination can assess a lesion."
)
#: What the blood model cannot say, next to every blood answer (the card's limitations say it at length).
BLOOD_SCOPE_NOTE = (
    "The model knows only the 8 normal cell types it was trained on, from healthy donors: an abnormal cell "
    "(a leukaemic blast, say) still gets one of those 8 names."
)
#: Why a full-size blood image may look unlike the training data: the crop that MedMNIST's source images got.
CROP_HINT = (
    "Full-size images are cut to their centre as MedMNIST cut its 360×363 source images, which show one "
    "centred cell. A cell photographed closer, farther or at another magnification looks different to the "
    "model: compare 'What the model saw' with your image."
)
#: Why the breast chart of both probabilities must not be read by its larger bar.
BREAST_CHART_NOTE = "The decision compares P(malignant) with the threshold above, not with 50%."
#: What the 28-px input means for an answer (shown with the card's own limitations).
SIZE_NOTE = ("Answers come from a 28×28 px reduction of the image: the same picture at another size or "
             "compression can get another answer, most often near the decision boundary but not only there. "
             "'What the model saw' shows the input.")


def _worst_round_trip(card: Optional[dict], precision: Optional[str]) -> Optional[tuple]:
    """(answers changed, images, accuracy before, accuracy after, the trip's numbers) of the round trip that
    changed most test answers, from the card's ``stability`` section (``python -m medclassify stability
    --split test --write-card``); None without one, or when it was measured on another precision than the
    one serving."""
    from .robustness import worst_round_trip

    section = (card or {}).get("stability") or {}
    if precision is not None and section.get("precision") not in (None, precision):
        return None
    try:
        test = section["test"]
        _, worst = worst_round_trip(test)
        return int(worst["changed"]), int(test["n"]), float(test["accuracy"]), float(worst["accuracy"]), worst
    except (KeyError, TypeError, ValueError, AttributeError):  # no measurement, or a card from before it
        return None


#: What the round-trip numbers are and are not (the enlargement blurs; a genuine full-size image is sharp).
ROUND_TRIP_CAVEAT = ("That round trip blurs more than reducing a genuine full-size image does, so it shows how "
                     "sensitive the model is to resizing, not its accuracy on full-size images, which is unmeasured.")


def size_note(card: Optional[dict], precision: Optional[str] = None) -> str:
    """``SIZE_NOTE``, with how many test answers a resize round trip changed where the card measured it."""
    worst = _worst_round_trip(card, precision)
    if worst is None:
        return SIZE_NOTE
    changed, n, before, after, _ = worst
    return (SIZE_NOTE + f" In a check on the official test split, where each image was enlarged, saved and "
            f"reduced again, {changed:,} of {n:,} answers changed (accuracy {before:.1%} before, {after:.1%} "
            "after). " + ROUND_TRIP_CAVEAT)


def resize_note(card: Optional[dict], prediction, precision: Optional[str] = None) -> str:
    """For an image the app reduced to the model's size: how much resizing moved this model's test answers."""
    spec = get_task(prediction.task)
    size, side = prediction.source_size, spec.image_size
    worst = _worst_round_trip(card, precision)
    if not size or max(size) <= side or worst is None:
        return ""
    from .robustness import direction_text

    changed, n, _, _, trip = worst
    direction = direction_text(spec, trip)
    crop = _crop_side(prediction)
    how = (f"cropped to its centre {crop}×{crop} px, as MedMNIST cropped its source images, and reduced to "
           f"{side}×{side} px" if crop else f"reduced from {size[0]}×{size[1]} to {side}×{side} px")
    return (f"This image was {how}. In a check on the official test split, where each image was enlarged, saved "
            f"and reduced again, {changed:,} of {n:,} answers ({changed / n:.0%}) changed{direction}. "
            + ROUND_TRIP_CAVEAT)


#: What to try when a full-size ultrasound is unlike the training data: MedMNIST's images show only the scan.
SCREENSHOT_HINT = (
    "A screenshot or export that shows the scanner's text, rulers or borders around the scan looks unlike the "
    "training images, which show the scan alone: crop to the ultrasound image itself."
)


# ---------------------------------------------------------------------------
# Processing uploads


@dataclass
class ImageResult:
    """One input image: a prediction, or a one-line error."""

    name: str
    prediction: Optional[object] = None  # medclassify.inference.Prediction
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    @property
    def reliable(self) -> bool:
        return self.ok and not self.prediction.ood


def error_message(exc: BaseException) -> str:
    """One line for the page.  An unexpected error shows only its kind: its text may hold internals (paths,
    tensor names) that say nothing to a clinician, and the log has it whole (``process_image``)."""
    if isinstance(exc, ImageError):
        text = str(exc).strip().splitlines()
        return text[0] if text else "the image could not be read"
    return f"could not process this image ({type(exc).__name__})"


def one_line(exc: BaseException) -> str:
    """An error's first line, for a message that someone can act on (a missing model file, a bad setting)."""
    from .inference import without_folders
    from .preprocessing import first_line

    return without_folders(first_line(exc)).rstrip(".")


def load_failure_message(title: str, exc: BaseException) -> str:
    """The page's one line when a model cannot be loaded: the reason where the operator can act on it."""
    if isinstance(exc, (FileNotFoundError, ValueError)):  # a missing model or card, a bad setting
        return f"The {title} model could not be loaded: {one_line(exc)}. The server's operator needs to fix this."
    if isinstance(exc, OSError):  # a damaged model file (h5py) or a failing disk; the log says which
        return (f"The {title} model could not be loaded: its files could not be read. "
                "The server's operator needs to fix this.")
    return f"The {title} model could not be loaded. Please try again later."


def process_image(predictor, name: str, data: bytes) -> ImageResult:
    """Classify one uploaded file from its bytes; any failure becomes ``ImageResult.error``."""
    try:
        return ImageResult(name, prediction=predictor.predict(bytes(data)))
    except Exception as exc:  # one bad file must never stop the page
        if not isinstance(exc, ImageError):  # a bad upload is the user's news; anything else is a bug to trace
            logging.getLogger(__name__).exception("could not process upload %r", name)
        return ImageResult(name, error=error_message(exc))


def process_batch(predictor, items: Sequence[tuple[str, bytes]], batch_size: int = 64,
                  on_progress: Optional[Callable[[int, int], None]] = None) -> list[ImageResult]:
    """Classify many ``(name, bytes)`` with ``Predictor.predict_many``; results in input order.

    ``on_progress(done, total)`` is called as results arrive.  A file that fails
    gets its one-line error and the others go on.
    """
    total = len(items)
    results: list[ImageResult] = []

    def report():
        if on_progress is not None:
            on_progress(len(results), total)

    try:
        stream = predictor.predict_many((bytes(data) for _, data in items), batch_size=batch_size)
        for (name, _), (_, outcome) in zip(items, stream):
            if isinstance(outcome, str):
                results.append(ImageResult(name, error=outcome))
            else:
                results.append(ImageResult(name, prediction=outcome))
            report()
    except Exception:
        # Something failed beyond one file's decoding (e.g. inside a model call):
        # finish the rest one by one so every file still gets its own answer or error.
        logging.getLogger(__name__).exception("batch prediction failed after %d of %d files; answering the rest "
                                              "one by one", len(results), total)
    for name, data in items[len(results):]:
        results.append(process_image(predictor, name, data))
        report()
    return results


def inputs_key(task: str, items: Sequence[tuple[str, bytes]]) -> str:
    """A short digest of the task and the inputs: the app reuses results while it is unchanged."""
    digest = hashlib.sha256(task.encode())
    for name, data in items:
        digest.update(name.encode("utf-8", "replace") + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------
# Wording and tables of results


def confidence(prediction) -> float:
    return float(prediction.probabilities[prediction.label])


def breast_verdict(prediction) -> tuple[bool, str]:
    """(positive?, careful sentence with P(malignant) and the threshold) for a breast prediction."""
    spec = get_task(prediction.task)
    positive = prediction.class_index == spec.positive_class
    p, threshold = score_and_threshold(prediction)
    if positive:
        return True, f"{BREAST_POSITIVE} (P(malignant) = {p}, at or above its threshold of {threshold})."
    return False, f"{BREAST_NEGATIVE} (P(malignant) = {p}, below its threshold of {threshold}). {BREAST_NOT_RULED_OUT}"


def breast_test_record(card: dict, precision: str) -> str:
    """How the answering model did on the test split, in counts a clinician can weigh, or ''."""
    test = (card or {}).get("test") or {}
    matrix = test.get("confusion_matrix")
    served = served_metrics(card, "test", precision) or test
    if not matrix or served.get("sensitivity") is None or served.get("specificity") is None:
        return ""
    spec = get_task(card.get("task") or "breast")
    counts = np.asarray(matrix).sum(axis=1)
    malignant, benign = int(counts[spec.positive_class]), int(counts[1 - spec.positive_class])
    caught = round(float(served["sensitivity"]) * malignant)
    false_flags = benign - round(float(served["specificity"]) * benign)
    # About shows the float model's confusion matrix; the answers here may come from its int8 copy
    answering = "the model as served here" if served is not test else "this model"
    return (f"On the official test split {answering} flagged {caught} of {malignant} malignant images and "
            f"{false_flags} of {benign} benign ones" + (": it misses some malignant images." if caught < malignant
                                                       else "."))


def percent(p: float) -> str:
    """A probability for the page: never a '100.0%' or '0.0%' that the model cannot mean."""
    p = float(p)
    if p > 0.999:
        return ">99.9%"
    if p < 0.001:
        return "<0.1%"
    return f"{p:.1%}"


def _crop_side(prediction) -> Optional[int]:
    """The side of the centre square MedMNIST's crop kept of the upload, or None (no crop, or no size)."""
    from .preprocessing import centre_crop_side

    return centre_crop_side(prediction.source_size, get_task(prediction.task)) if prediction.source_size else None


def sample_alt(task: str) -> str:
    # what each sample shows, for screen readers (st.image's alt text; a caption is not an accessible name);
    # only for the samples: what an upload shows is not known
    kind = get_task(task).image_kind
    return f"{kind[:1].upper()}{kind[1:]} from the MedMNIST test split"


def model_view_alt(prediction) -> str:
    # Says what the view is, not what the picture shows: an upload may be anything (this view is also shown
    # beside the "unlike the training data" warning).
    size = get_task(prediction.task).image_size
    return f"Your image as the model saw it: {size}×{size} pixels, enlarged"


def gradcam_alt(prediction) -> str:
    return (f"Grad-CAM heatmap over the model's input, showing where the evidence for "
            f"{explained_class(prediction)[1]} lay, "
            "with a blue-to-red colour scale beneath it")


def model_view_caption(prediction) -> str:
    """What 'What the model saw' shows: the whole thumbnail, or the centre crop of a full-size image."""
    spec = get_task(prediction.task)
    size = spec.image_size
    side = _crop_side(prediction)
    if side is not None:
        width, height = prediction.source_size
        share = spec.source_center_crop
        return (f"What the model saw: a centre square of {side}×{side} px ({share:.0%} of the shorter side, "
                f"MedMNIST's crop) of your {width}×{height} image, reduced to {size}×{size} px and enlarged here")
    return f"What the model saw: the {size}×{size} px input, enlarged with nearest neighbour"


def was_centre_cropped(prediction) -> bool:
    return _crop_side(prediction) is not None


def close_call(prediction) -> Optional[str]:
    """Why the answer is nearly a coin toss (``Prediction.close_call``), or None.

    Blood: 'close call between A (p) and B (q)'; breast: 'borderline', P(malignant) near the threshold.
    """
    if not prediction.close_call:
        return None
    spec = get_task(prediction.task)
    if spec.decision == "threshold":
        positive = spec.class_names[spec.positive_class]
        p, threshold = score_and_threshold(prediction)
        return (f"Borderline: P({positive}) = {p} is within {BORDERLINE * 100:.0f} percentage points of the "
                f"threshold ({threshold}).")
    (first, p), (second, q) = sorted(prediction.probabilities.items(), key=lambda item: item[1], reverse=True)[:2]
    return f"Close call between {first} ({percent(p)}) and {second} ({percent(q)})."


def prediction_markdown(prediction) -> str:
    """The stable line that carries the label: ``**Prediction:** <label>``, and for a thresholded task the rule
    that made it (a "malignant" at P = 18% must not read as a contradiction of the larger benign bar)."""
    line = f"**Prediction:** {prediction.label}"
    spec = get_task(prediction.task)
    if spec.decision != "threshold":
        return line
    positive = spec.class_names[spec.positive_class]
    p, threshold = score_and_threshold(prediction)
    if prediction.class_index == spec.positive_class:
        return f"{line} (flagged: P({positive}) {p} is at or above the threshold of {threshold})"
    return f"{line} (not flagged: P({positive}) {p} is below the threshold of {threshold})"


#: How far from square (longer / shorter side) a full-size image that MedMNIST only resized may be before the
#: app says that it was resized whole, frame and all.
SQUASH_NOTE_RATIO = 1.05


def _full_size_resized(prediction) -> bool:
    """A full-size upload (not a MedMNIST thumbnail) of a task whose source images MedMNIST resized uncropped."""
    return (not get_task(prediction.task).source_center_crop and bool(prediction.source_size)
            and not is_medmnist_thumbnail(prediction.source_size))


def squash_note(prediction) -> str:
    """A note when a non-square full-size image was resized whole to the square model input, or ''.

    MedMNIST describes BUSI's sources as 500x500 (BUSI's images vary in size), and resized them whole. So the
    shape alone is not a fault, but black bars or a scanner frame around an export are resized with the scan and
    are not in the training images (validation images given black bars got many wrong answers that the
    out-of-distribution rule let through): the user should know that nothing was cropped."""
    if not _full_size_resized(prediction):
        return ""
    width, height = prediction.source_size
    if max(width, height) / min(width, height) < SQUASH_NOTE_RATIO:
        return ""
    size = get_task(prediction.task).image_size
    return (f"Your {width}×{height} image was resized whole to {size}×{size}, without cropping, as MedMNIST "
            "resized its source scans. Black bars, a border or the scanner's screen around the scan are not in "
            "the training images: if yours has them, crop to the scan itself and upload again, since the answer "
            "can change.")


def ood_hints(prediction) -> list[str]:
    """What the user can try when an image is unlike the training data."""
    hints = []
    if was_centre_cropped(prediction):
        hints.append(CROP_HINT)
    elif _full_size_resized(prediction):
        hints.append(SCREENSHOT_HINT)
    return hints + [other_classifier_hint(prediction.task)]


def other_classifier_hint(task: str) -> str:
    """Where an image of the other modality belongs (a breast scan sent to the blood model, say)."""
    return " ".join(f"If this is a {spec.image_kind}, choose the '{spec.title}' classifier above and upload it there."
                    for name, spec in TASKS.items() if name != task)


def score_and_threshold(prediction) -> tuple[str, str]:
    """P(positive) and the threshold as percentages, with one more decimal where one would make them look equal
    ("18.3% is below the threshold of 18.3%")."""
    p, threshold = float(prediction.p_positive), float(prediction.threshold)
    if percent(p) == percent(threshold) and p != threshold and 0.001 <= min(p, threshold):
        return f"{p:.2%}", f"{threshold:.2%}"
    return percent(p), percent(threshold)


def explained_class(prediction) -> tuple[int, str]:
    """The class whose evidence Grad-CAM shows: the predicted one, or for a thresholded task always the class the
    threshold looks for, since where the malignancy evidence lies is what a reader weighs either way."""
    spec = get_task(prediction.task)
    index = spec.positive_class if spec.decision == "threshold" else prediction.class_index
    return index, spec.class_names[index]


def calibration_mix_note(card: Optional[dict], prediction) -> str:
    """The class mix the probabilities were calibrated on (the validation split's), or '' when the card lacks it:
    a calibrated probability is a frequency in that mix, not the chance for a lesion or cell in another one."""
    matrix = np.asarray(((card or {}).get("validation") or {}).get("confusion_matrix") or [], dtype=object)
    spec = get_task(prediction.task)
    if matrix.shape != (spec.num_classes, spec.num_classes):
        return ""
    try:
        counts = matrix.astype(int).sum(axis=1)
    except (TypeError, ValueError):
        return ""
    total = int(counts.sum())
    if total <= 0:
        return ""
    index, name = explained_class(prediction)
    share = f"{counts[index] / total:.0%}"
    if spec.decision == "threshold":
        return (f"P({name}) is calibrated on {total} validation images, {share} ({counts[index]}) of them {name}. "
                f"Where {name} cases are less common than that, the same score means a lower chance that an image "
                f"is {name}; where more common, a higher one (if the images look alike).")
    return (f"The probabilities are calibrated on the validation split's cell mix ({name}: {share} of its cells), "
            "not on a patient's differential count.")


def probabilities_frame(prediction):
    import pandas as pd

    probabilities = [float(p) for p in prediction.probabilities.values()]
    return pd.DataFrame({"class": list(prediction.probabilities), "probability": probabilities,
                         "shown": [percent(p) for p in probabilities]})  # the bars' labels say what the text says


def results_table(results: Iterable[ImageResult], spec: TaskSpec | str, truth: Optional[dict[str, str]] = None):
    """One row per file: file, label, confidence or P(malignant) and threshold, close_call, [true_class, agrees,]
    ood, warnings, error.

    A thresholded task (breast) has no confidence column: its label comes from comparing P(malignant) with the
    threshold, so the probability of the label can be well under 50% ("malignant" at P = 0.30 > 0.18) and
    would read as a contradiction.  ``close_call`` marks an answer that is not firm (``Prediction.close_call``), so a
    table row is not read as more certain than the single-image view.  ``truth`` (file name -> true class, for
    the sample gallery) adds the true class and whether the label agrees with it (empty when there is no label).
    """
    import pandas as pd

    spec = get_task(spec) if isinstance(spec, str) else spec
    threshold_task = spec.decision == "threshold"
    scores = ["p_malignant", "threshold"] if threshold_task else ["confidence"]
    rows = []
    for result in results:
        row = {"file": result.name, "label": "", "true_class": (truth or {}).get(result.name, ""), "agrees": None,
               **dict.fromkeys(scores), "close_call": None, "ood": None, "warnings": "", "error": ""}
        prediction = result.prediction
        if prediction is None:
            row["error"] = result.error or "could not process this image"
        elif prediction.ood:
            row["label"] = NO_ANSWER
            row["ood"] = True
            row["warnings"] = "; ".join(prediction.warnings)
        else:
            row["label"] = prediction.label
            row["ood"] = False
            row["close_call"] = prediction.close_call
            if row["true_class"]:
                row["agrees"] = prediction.label == row["true_class"]
            if threshold_task:
                row["p_malignant"] = round(float(prediction.p_positive), 4)
                row["threshold"] = round(float(prediction.threshold), 4)
            else:
                row["confidence"] = round(confidence(prediction), 4)
        rows.append(row)
    # The answer's own numbers next to it: on a phone only the first three or four columns fit the screen.
    columns = (["file", "label"] + scores + ["close_call"] + (["true_class", "agrees"] if truth else [])
               + ["ood", "warnings", "error"])
    frame = pd.DataFrame(rows, columns=columns)
    for column in scores:
        frame[column] = frame[column].astype("Float64")
    for column in ("close_call", "ood", "agrees"):
        if column in frame:
            frame[column] = frame[column].astype("boolean")
    return frame


def results_csv(frame, card: Optional[dict] = None, decision_rule: str = "") -> bytes:
    """The table as CSV; with ``card``, every row also names the model and its decision rule, so a file
    passed on later still says where its labels came from and that they are not diagnoses."""
    if card is not None:
        details = ", ".join(part for part in (card.get("variant"), card.get("created") and f"card {card['created']}")
                            if part)
        model = f"{card.get('name', '')}" + (f" ({details})" if details else "")
        frame = frame.assign(model=model, decision_rule=decision_rule, note=DISCLAIMER)
    return frame.to_csv(index=False).encode("utf-8")


def summary(results: Sequence[ImageResult]) -> dict:
    return {
        "total": len(results),
        "classified": sum(r.reliable for r in results),
        "unreliable": sum(r.ok and r.prediction.ood for r in results),
        "failed": sum(not r.ok for r in results),
    }


# ---------------------------------------------------------------------------
# Images for display


def upscale(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Enlarge a small uint8 image with nearest neighbour (every model pixel stays a sharp square)."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return np.asarray(Image.fromarray(array.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))


def preview(data: bytes, max_side: int = 256, background: int = 255, min_side: int = 196) -> Optional[np.ndarray]:
    """A small RGB view of the uploaded image as decoded (works for tif and DICOM too), transparency
    shown as ``background`` like the model sees it; a thumbnail smaller than ``min_side`` is enlarged with
    nearest neighbour, so a 28-px upload is not a speck.  None if impossible."""
    from PIL import Image

    from .preprocessing import open_image, to_mode

    try:
        image = to_mode(open_image(bytes(data)), 3, background)
        image.thumbnail((max_side, max_side))
        longest = max(image.size)
        factor = min(max_side // longest, -(-min_side // longest))  # whole pixels, never past max_side
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        return np.asarray(image)
    except ImageError:  # the upload's own fault; its result says why
        return None
    except Exception:  # a decoder bug: no preview either, but on record
        logging.getLogger(__name__).exception("preview failed")
        return None


# ---------------------------------------------------------------------------
# Sample gallery


def slug(class_name: str) -> str:
    """File-name form of a class name: ``normal/benign`` -> ``normal-benign``."""
    return class_name.replace("/", "-").replace(" ", "_")


@dataclass(frozen=True)
class Sample:
    path: Path
    task: str
    label: str  # the true class, from the file name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def caption(self) -> str:
        return f"{self.label} #{self.path.stem.rsplit('_', 1)[-1].lstrip('0') or '0'}"


def list_samples(task: str, root: Path | str = SAMPLE_DIR) -> list[Sample]:
    """The gallery of ``task``: ``<root>/<task>/<class slug>_<nn>.png``, in class order."""
    spec = get_task(task)
    folder = Path(root) / spec.name
    if not folder.is_dir():
        return []
    by_slug = {slug(name): name for name in spec.class_names}
    samples = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".png":
            continue
        stem, _, number = path.stem.rpartition("_")
        if stem in by_slug and number.isdigit():
            samples.append(Sample(path, spec.name, by_slug[stem]))
    order = {name: i for i, name in enumerate(spec.class_names)}
    return sorted(samples, key=lambda s: (order[s.label], s.path.name))


# ---------------------------------------------------------------------------
# Model card


METRIC_NAMES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auc": "AUC",
    "sensitivity": "Sensitivity (malignant)",
    "specificity": "Specificity",
    "f1_macro": "F1 (macro)",
    "precision_macro": "Precision (macro)",
    "recall_macro": "Recall (macro)",
    "f1_weighted": "F1 (weighted)",
    "accuracy_at_0_5": "Accuracy at P>0.5 (MedMNIST's cut-off)",  # short: the pinned column cuts long names
    "ece": "Expected calibration error",
}


def card_metrics(card: dict) -> tuple[Optional[str], Optional[dict]]:
    """The split whose metrics the card reports: ``("test", m)``, else ``("validation", m)``, else (None, None)."""
    for split in ("test", "validation"):
        metrics = (card or {}).get(split)
        if isinstance(metrics, dict) and metrics:
            return split, metrics
    return None, None


def _number(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


SERVED_COLUMN = "int8 copy (answers here)"


def metrics_frame(metrics: dict, served: Optional[dict] = None):
    """Metric, value and 95% bootstrap CI (when the card has one) as a table.

    ``served``: the same metrics of the int8 serving copy, which gives the answers on screen, as one more column.
    """
    import pandas as pd

    cis = metrics.get("ci95") or {}
    rows = []
    for key, title in METRIC_NAMES.items():
        value = _number(metrics.get(key))
        if value is None:
            continue
        ci = cis.get(key)
        ci_text = ""
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
            ci_text = f"{float(ci[0]):.3f} – {float(ci[1]):.3f}"
        row = {"metric": title, "value": round(value, 4), "95% CI": ci_text}
        if served:
            served_value = _number(served.get(key))
            row[SERVED_COLUMN] = None if served_value is None else round(served_value, 4)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["metric", "value", "95% CI"] + ([SERVED_COLUMN] if served else []))
    if served:
        frame[SERVED_COLUMN] = frame[SERVED_COLUMN].astype("Float64")  # a metric the copy lacks shows empty
    return frame


def served_metrics(card: dict, split: Optional[str], precision: str) -> Optional[dict]:
    """The int8 copy's metrics on ``split``, when that copy is what answers (see ``serving_text``)."""
    serving = (card or {}).get("serving") or {}
    section = {"test": "test", "validation": "val"}.get(split or "")
    if precision != "int8" or section is None:
        return None
    return (serving.get(section) or {}).get("int8_metrics") or None


def ood_test_rate(card: dict, precision: str) -> Optional[float]:
    """The share of genuine test images the OOD rule flags, if it was measured on the model that answers.

    The int8 copy and the float model give the rule slightly different features, so a rate measured on one
    is not quoted for the other (an older card that does not say which was measured is taken at its word).
    """
    check = (card or {}).get("ood_check") or {}
    if check.get("precision") not in (None, precision):
        return None
    return check.get("test_flagged")


def confusion_frame(metrics: dict, class_names: Sequence[str]):
    """Rows = true class, columns = predicted class; None if the card has no matrix."""
    import pandas as pd

    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return None
    matrix = np.asarray(matrix, dtype=int)
    if matrix.shape != (len(class_names), len(class_names)):
        return None
    return pd.DataFrame(matrix, index=[f"true: {c}" for c in class_names],
                        columns=[f"pred: {c}" for c in class_names])


def per_class_frame(metrics: dict):
    import pandas as pd

    per_class = metrics.get("per_class") or {}
    if not per_class:
        return None
    rows = [{"class": name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}}
            for name, values in per_class.items()]
    return pd.DataFrame(rows)


def training_command(card: dict) -> Optional[str]:
    return ((card or {}).get("training") or {}).get("command")


def decision_text(card: dict, spec: TaskSpec, threshold: Optional[float]) -> str:
    if spec.decision == "threshold":
        positive = spec.class_names[spec.positive_class]
        rule = ((card or {}).get("decision") or {}).get("threshold_rule")
        text = f"'{positive}' when P({positive}) ≥ {threshold:.3f}" if threshold is not None else \
            f"'{positive}' when P({positive}) is above the threshold"
        return text + (f" ({rule})." if rule else ".")
    return "The class with the highest calibrated probability."


def serving_text(card: dict, precision: str) -> str:
    """How the answers on screen are computed: the int8 serving copy (and how it compares) or the float model."""
    serving = (card or {}).get("serving") or {}
    if precision != "int8" or not serving:
        split = card_metrics(card)[0]
        return ("Predictions come from the model itself (float)"
                + (f", whose {split} results are shown above." if split else "."))
    text = (f"Predictions come from an int8 copy of the model ({serving.get('runtime', 'TensorFlow Lite')}), "
            "which runs faster on CPUs.")
    test = serving.get("test") or {}
    if test.get("n"):
        metrics = test.get("int8_metrics") or {}
        shown = ", ".join(f"{METRIC_NAMES.get(k, k).lower()} {metrics[k]:.4f}" for k in ("accuracy", "auc")
                          if k in metrics)
        text += (f" It makes the same decision as the model above on {test['n'] - test['decisions_changed']} of "
                 f"{test['n']} test images" + (f" ({shown})." if shown else "."))
    return text + " Grad-CAM explains the float model."


def duration(seconds: float) -> str:
    """'2 h 49 min', '16 min', '45 s'."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def csv_name(task: str) -> str:
    return f"medclassify_{task}_results.csv"
