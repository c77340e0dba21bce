"""The single source of truth for the two classification tasks.

Everything that needs to know about a task -- the CLI, the app, the notebooks,
the tests -- reads it from ``TASKS`` instead of repeating file names, labels or
sizes.  The layout follows medmnist's ``info.py``: one dictionary per dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent

# Official MedMNIST v2/v3 record on Zenodo (same files the medmnist package fetches).
ZENODO_RECORD = "https://zenodo.org/records/10519652/files"

#: MedMNIST+ sizes published next to the 28-px files (``<flag>_<size>.npz``).
MEDMNIST_SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class TaskSpec:
    """Everything the project knows about one task."""

    name: str
    flag: str  # MedMNIST flag, e.g. "bloodmnist"
    title: str
    description: str
    modality: str
    class_names: tuple[str, ...]
    channels: int  # 3 = RGB, 1 = grayscale
    image_size: int
    default_model: str  # file name at the repo root
    decision: str  # "argmax" or "threshold"
    md5: dict[int, str]  # image size -> official MD5 of the npz
    licence: str
    source: str
    citation: str
    # Fraction of the shorter side kept by MedMNIST's centre crop of the source
    # images before resizing (BloodMNIST: 360x363 -> 200x200). None = no crop.
    source_center_crop: Optional[float] = None
    # Class whose probability the breast threshold applies to.
    positive_class: Optional[int] = None
    # Threshold used when a model carries no card with a validated one.
    default_threshold: float = 0.5
    # Grey level that transparent pixels of an upload become: the modality's own background
    # (a stained smear is light, an ultrasound frame outside the beam is black).
    background: int = 255
    expected_input: str = ""
    # What one image of this task shows, in words that fit "If this is a ..." (screen-reader alt text of the
    # samples, and the hint that points an image of another task to its classifier).
    image_kind: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def selection_metric(self) -> str:
        """The validation score that picks each run's epoch and the shipped variant: AUC where a threshold
        decides (what the threshold relies on), accuracy where the top class does."""
        return "auc" if self.decision == "threshold" else "accuracy"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def file_name(self, size: int = 28) -> str:
        if size not in MEDMNIST_SIZES:
            raise ValueError(f"MedMNIST has no {size}-px release; choose one of {MEDMNIST_SIZES}")
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int = 28) -> str:
        return f"{ZENODO_RECORD}/{self.file_name(size)}?download=1"

    @property
    def model_path(self) -> Path:
        return REPO_ROOT / self.default_model

    @property
    def card_path(self) -> Path:
        return self.model_path.with_suffix(".card.json")


MEDMNIST_CITATION = (
    "Yang, J. et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D "
    "biomedical image classification. Scientific Data 10, 41 (2023)."
)

TASKS: dict[str, TaskSpec] = {
    "blood": TaskSpec(
        name="blood",
        flag="bloodmnist",
        title="Blood cell type",
        description="Peripheral blood cell type from a single-cell microscope image (8 classes).",
        modality="blood smear microscopy (colour)",
        class_names=(
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        channels=3,
        image_size=28,
        default_model="model_blood.h5",
        decision="argmax",
        md5={
            28: "7053d0359d879ad8a5505303e11de1dc",
            64: "2b94928a2ae4916078ca51e05b6b800b",
            128: "adace1e0ed228fccda1f39692059dd4c",
            224: "b718ff6835fcbdb22ba9eacccd7b2601",
        },
        licence="CC BY 4.0",
        source="PBC dataset, Acevedo et al. 2020 (Data in Brief 30:105474), via MedMNIST v2",
        citation=MEDMNIST_CITATION,
        source_center_crop=200 / 360,
        expected_input=(
            "A colour microscope image of one stained blood cell: a 28-px BloodMNIST "
            "thumbnail or a full-size PBC-style JPEG (about 360x363), centred on the cell."
        ),
        image_kind="microscope image of one stained blood cell",
    ),
    "breast": TaskSpec(
        name="breast",
        flag="breastmnist",
        title="Breast ultrasound",
        description="Breast ultrasound: malignant vs normal/benign (binary).",
        modality="breast ultrasound (grayscale)",
        class_names=("malignant", "normal/benign"),
        channels=1,
        image_size=28,
        default_model="model_breast.h5",
        decision="threshold",
        md5={
            28: "750601b1f35ba3300ea97c75c52ff8f6",
            64: "742edef2a1fd1524b2efff4bd7ba9364",
            128: "363e4b3f8d712e9b5de15470a2aaadf1",
            224: "b56378a6eefa9fed602bb16d192d4c8b",
        },
        licence="CC BY 4.0",
        source="BUSI dataset, Al-Dhabyani et al. 2020 (Data in Brief 28:104863), via MedMNIST v2",
        citation=MEDMNIST_CITATION,
        source_center_crop=None,
        positive_class=0,  # the threshold is on P(malignant); label 0 = malignant
        background=0,
        expected_input=(
            "A grayscale breast ultrasound image: a 28-px BreastMNIST thumbnail or a "
            "full-size BUSI-style PNG (about 500x500)."
        ),
        image_kind="breast ultrasound image",
    ),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
