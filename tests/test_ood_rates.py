"""Acceptance rates of the "unlike the training data" rule on the shipped models (``realdata``).

At most 5% of the official test images may be flagged, and at least 90% of
cross-task images (blood cells to the breast model, ultrasound to the blood
model) and of ordinary photographs must be.
"""
import pytest

from medclassify.oodcheck import ood_report, photo_crops, photo_paths

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_shipped_model_flags_foreign_images_but_not_test_images(realdata_dir, task):
    report = ood_report(task, data_dir=realdata_dir)
    assert report["test_flagged"] <= 0.05, report
    assert report["cross_task_flagged"] >= 0.90, report
    assert report["photos_flagged"] >= 0.90, report


def test_photo_crops_are_colour_and_grayscale():
    assert len(photo_paths()) >= 3
    crops = photo_crops(per_photo=2)
    assert {crop.mode for crop in crops} == {"RGB", "L"}
    assert len(crops) == 4 * len(photo_paths())
