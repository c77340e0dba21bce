"""The task registry: the single source of truth for names, labels, shapes and files."""
import re

import pytest

from medclassify import registry
from medclassify.registry import MEDMNIST_SIZES, REPO_ROOT, TASKS, get_task


def test_two_tasks():
    assert sorted(TASKS) == ["blood", "breast"]
    for name, spec in TASKS.items():
        assert spec.name == name
        assert get_task(name) is spec
        # the words the app builds its sentences from ("If this is a <image_kind>, choose ...")
        assert spec.image_kind and spec.image_kind == spec.image_kind.lower() and spec.expected_input


def test_blood_spec():
    spec = get_task("blood")
    assert spec.flag == "bloodmnist"
    assert spec.class_names == ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                                "monocyte", "neutrophil", "platelet")
    assert spec.num_classes == 8
    assert spec.channels == 3 and spec.image_size == 28
    assert spec.input_shape == (28, 28, 3)
    assert spec.decision == "argmax"
    assert spec.positive_class is None
    assert spec.source_center_crop == pytest.approx(200 / 360)


def test_breast_spec():
    spec = get_task("breast")
    assert spec.flag == "breastmnist"
    assert spec.class_names == ("malignant", "normal/benign")
    assert spec.class_names[0] == "malignant"  # label 0 = malignant, as in MedMNIST
    assert spec.num_classes == 2
    assert spec.channels == 1
    assert spec.input_shape == (28, 28, 1)
    assert spec.decision == "threshold"
    assert spec.positive_class == 0
    assert 0.0 < spec.default_threshold < 1.0
    assert spec.source_center_crop is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_paths_and_metadata(name):
    spec = get_task(name)
    assert spec.model_path == REPO_ROOT / f"model_{name}.h5"
    assert spec.card_path == REPO_ROOT / f"model_{name}.card.json"
    assert spec.model_path.parent == REPO_ROOT
    for text in (spec.title, spec.description, spec.modality, spec.licence, spec.source, spec.citation,
                 spec.expected_input):
        assert isinstance(text, str) and text.strip()
    assert "CC BY" in spec.licence
    assert set(spec.md5) == set(MEDMNIST_SIZES)
    assert all(re.fullmatch(r"[0-9a-f]{32}", digest) for digest in spec.md5.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_file_names_and_urls(name):
    spec = get_task(name)
    assert spec.file_name() == f"{spec.flag}.npz"
    assert spec.file_name(64) == f"{spec.flag}_64.npz"
    assert spec.url(28).startswith(registry.ZENODO_RECORD + "/")
    assert spec.url(28).endswith(f"/{spec.flag}.npz?download=1")
    with pytest.raises(ValueError, match="no 32-px release"):
        spec.file_name(32)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'lung'.*blood.*breast"):
        get_task("lung")


def test_specs_are_frozen():
    with pytest.raises(Exception):
        TASKS["blood"].channels = 1
