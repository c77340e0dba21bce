"""How often the "unlike the training data" rule fires, on in-distribution and foreign images.

``python -m medclassify ood-check --task T`` reports the flagged fraction of

* the official test split (in distribution: should be small, <= 5%),
* the other task's test images (cross-task: blood cells sent to the breast model,
  ultrasound sent to the blood model),
* ordinary photographs: random crops of the sample photos that ship with
  scikit-learn and matplotlib, in colour and in grayscale.

The photos are not in any training split, so they are honest held-out data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import load_split
from .registry import TASKS, get_task


def photo_paths() -> list[Path]:
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    candidates = [sk / "china.jpg", sk / "flower.jpg", mpl / "grace_hopper.jpg", mpl / "Minduka_Present_Blue_Pack.png"]
    return [p for p in candidates if p.exists()]


def photo_crops(per_photo: int = 12, seed: int = 0) -> list[Image.Image]:
    """Random square crops (10-100% of the shorter side) of each photo, in colour and grayscale."""
    rng = np.random.default_rng(seed)
    crops = []
    for path in photo_paths():
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            for _ in range(per_photo):
                side = int(min(width, height) * rng.uniform(0.1, 1.0))
                left = int(rng.integers(0, width - side + 1))
                top = int(rng.integers(0, height - side + 1))
                crop = image.crop((left, top, left + side, top + side))
                crops.append(crop)
                crops.append(crop.convert("L"))
    return crops


def flag_counts(predictor, images) -> tuple[float, int, dict[str, int]]:
    """(flagged share of the images the model answered, how many it answered, why it refused the others).

    A refused image ("image is too small" and the like) is neither flagged nor passed, so it counts in
    neither the share nor its denominator; the refusals are counted by reason (the message up to its
    details in brackets).
    """
    flags, refusals = [], {}
    for _, result in predictor.predict_many(images):
        if isinstance(result, str):
            reason = result.split(" (", 1)[0].strip()
            refusals[reason] = refusals.get(reason, 0) + 1
        else:
            flags.append(result.ood)
    share = float(np.mean(flags)) if flags else float("nan")
    return share, len(flags), refusals


def ood_report(task: str, model_path=None, data_dir=None) -> dict:
    from .inference import Predictor

    spec = get_task(task)
    predictor = Predictor(spec, model_path)
    other = next(name for name in TASKS if name != spec.name)
    test = load_split(spec, "test", data_dir=data_dir).images
    foreign = load_split(other, "test", data_dir=data_dir).images
    sets = {"test": [img[..., 0] if img.shape[-1] == 1 else img for img in test],
            "cross_task": [img[..., 0] if img.shape[-1] == 1 else img for img in foreign],
            "photos": photo_crops()}
    report = {"task": spec.name, "precision": predictor.precision}  # the OOD features differ between the two
    for name, images in sets.items():
        share, answered, refusals = flag_counts(predictor, images)
        report.update({f"{name}_flagged": share, f"n_{name}": answered, f"n_{name}_refused": sum(refusals.values())})
        if refusals:
            report[f"{name}_refusals"] = refusals
    return report
