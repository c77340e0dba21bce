"""How steady the answers are when an image is enlarged, re-encoded and reduced again on its way in.

``python -m medclassify stability --task T`` enlarges each image of an official split (28 px) to a
larger square (bicubic), encodes it as PNG (and as JPEG at the largest side), and sends those bytes
through the serving path a user's upload takes: decoding, the app's reduction to 28 px, the model and
its decision rule.  It counts the answers that differ from the answer to the split's image itself
(for a thresholded task, in which direction) and how far the probabilities move.

What it measures is sensitivity to the slight softening such a round trip adds (and to JPEG's
artefacts), not the error on genuine full-size scans, which are sharp before the app reduces them
and whose originals are not on this machine.  Only sides the app merely resizes are accepted:
a side it would crop (a full-size blood image) would show the model a different picture.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from .data import load_split
from .preprocessing import centre_crop_side
from .registry import TaskSpec, get_task

DEFAULT_SIDES = (64, 224)  # MedMNIST+ sizes, which the app only resizes for every task
JPEG_QUALITY = 75  # a common default of image editors and phones' "medium" export


def round_trip_bytes(image: np.ndarray, side: int, fmt: str = "PNG", quality: int = JPEG_QUALITY) -> bytes:
    """A square uint8 image (H, W) or (H, W, C) resized to ``side`` x ``side`` (bicubic; its own side leaves
    it as it is) and encoded."""
    pixels = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    enlarged = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    enlarged.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def check_sides(spec: TaskSpec, sides) -> tuple[int, ...]:
    sides = tuple(int(s) for s in sides)
    if not sides:
        raise ValueError("give at least one side")
    for side in sides:
        if side <= spec.image_size:
            raise ValueError(f"side {side}: a round trip enlarges the {spec.image_size}-px image, so the side must "
                             f"exceed {spec.image_size}")
        if centre_crop_side((side, side), spec) is not None:
            raise ValueError(f"side {side}: the app crops a {side}x{side} {spec.name} image before reducing it, "
                             "so the model would see a different picture")
    return sides


def _answers(predictor, sources: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, probabilities) for encoded images; a refused image would make the comparison
    meaningless, so it is an error."""
    indices, probabilities = [], []
    for _, result in predictor.predict_many(sources, prefetch=False):
        if isinstance(result, str):
            raise ValueError(f"a round-trip image was refused ({result})")
        indices.append(result.class_index)
        probabilities.append([result.probabilities[name] for name in predictor.spec.class_names])
    return np.asarray(indices), np.asarray(probabilities)


def _movement(reference: np.ndarray, moved: np.ndarray) -> dict:
    # the largest change of any class's probability (for two classes: the change of P(positive))
    shift = np.abs(moved - reference).max(axis=1)
    return {"mean_shift": float(shift.mean()), "p90_shift": float(np.quantile(shift, 0.9)),
            "max_shift": float(shift.max())}


def stability_report(task: str | TaskSpec, model_path=None, split: str = "val", sides=DEFAULT_SIDES,
                     data_dir: Optional[str] = None, predictor=None) -> dict:
    """Answers of the served model to round-tripped images of ``split``, against its answers to the originals."""
    from .inference import Predictor

    spec = get_task(task) if isinstance(task, str) else task
    sides = check_sides(spec, sides)
    predictor = predictor or Predictor(spec, model_path)
    data = load_split(spec, split, data_dir=data_dir)
    images, labels = data.images, data.labels.ravel()
    reference_index, reference = _answers(predictor, [round_trip_bytes(im, spec.image_size) for im in images])
    trips = {f"png{side}": ("PNG", side) for side in sides}
    trips[f"jpeg{max(sides)}_q{JPEG_QUALITY}"] = ("JPEG", max(sides))
    report = {"task": spec.name, "split": split, "n": int(len(images)), "precision": predictor.precision,
              "jpeg_quality": JPEG_QUALITY, "accuracy": float((reference_index == labels).mean()), "round_trips": {}}
    for name, (fmt, side) in trips.items():
        index, probabilities = _answers(predictor, [round_trip_bytes(im, side, fmt) for im in images])
        trip = {"changed": int((index != reference_index).sum()), "accuracy": float((index == labels).mean())}
        if spec.decision == "threshold":  # which way: a lost flag is a missed positive
            was, now = reference_index == spec.positive_class, index == spec.positive_class
            trip.update(flag_lost=int((was & ~now).sum()), flag_gained=int((~was & now).sum()))
        report["round_trips"][name] = {**trip, **_movement(reference, probabilities)}
    return report


def store_stability(model_path, report: dict, command: str) -> dict:
    """Put one split's ``stability_report`` into the card of ``model_path`` (section ``stability``), with the
    command that reproduces it.  A split measured before on another precision or other round trips is dropped,
    so the section always describes one measurement.  Returns the section."""
    from .cards import read_card, set_section

    section = read_card(model_path).get("stability") or {}
    split = report["split"]
    other = next((section[name] for name in ("val", "test") if name != split and section.get(name)), None)
    if section.get("precision") not in (None, report["precision"]) or (
            other and list(other["round_trips"]) != list(report["round_trips"])):
        section = {}
    section.update({"precision": report["precision"], split: {**report, "command": command}})
    set_section(model_path, "stability", section)
    return section


def direction_text(task: str | TaskSpec, trip: dict) -> str:
    """': N to 'malignant', M away from it' for a thresholded task's round trip; '' for any other."""
    if "flag_lost" not in trip:
        return ""
    spec = get_task(task) if isinstance(task, str) else task
    if spec.positive_class is None:
        return ""
    flagged = spec.class_names[spec.positive_class]
    return f": {int(trip['flag_gained'])} to '{flagged}', {int(trip['flag_lost'])} away from it"


def worst_round_trip(report: dict) -> tuple[str, dict]:
    """(name, numbers) of the round trip that changed most answers of a split's report (ties: the larger mean
    shift, then the first listed): what the README, the notebooks and the app quote."""
    trips = report["round_trips"]
    name = max(trips, key=lambda key: (trips[key]["changed"], trips[key]["mean_shift"]))
    return name, trips[name]


def stability_line(section: dict) -> str:
    """The card's ``stability`` section as a sentence (README, notebooks, the app's About tab)."""
    parts, commands = [], []
    for split in ("val", "test"):
        report = section.get(split)
        if not report:
            continue
        worst, trip = worst_round_trip(report)
        direction = direction_text(report.get("task"), trip)
        parts.append(f"{split}: {trip['changed']} of {report['n']:,} answers changed ({worst}, the round trip that "
                     f"changed most{direction}), probabilities moved by {trip['mean_shift']:.3f} on average "
                     f"(90th percentile {trip['p90_shift']:.3f}), accuracy {report['accuracy']:.4f} on the "
                     f"split's images and {trip['accuracy']:.4f} after that round trip")
        commands.append(f"`{report['command']}`" if report.get("command") else "")
    if not parts:
        return ""
    served = " of the int8 copy that serves" if section.get("precision") == "int8" else ""
    trips = ", ".join((section.get("val") or section.get("test"))["round_trips"])
    cited = ", ".join(c for c in commands if c)
    return (f"Answers{served} when a split's image is enlarged (bicubic), saved ({trips}) and reduced again by the app"
            + (f" ({cited})" if cited else "") + ": " + "; ".join(parts) + ". The enlargement softens the image "
            "slightly, which a genuine full-size scan is not, so this measures sensitivity, not error.")
