"""Shared fixtures and the skip-or-fail policy for tests that need outside resources.

Markers (declared in pytest.ini):

* ``realdata``: needs the official MedMNIST npz files (``$MEDMNIST_ROOT``, else
  ``~/.medmnist``, else ``<repo>/../shared/data/medmnist`` as laid out in CI).
  ``@pytest.mark.realdata(needs=("weights",))`` needs ``$VGG16_WEIGHTS`` instead
  (``needs=("data", "weights")`` both).
* ``browser``: needs ``/usr/bin/chromium``.

A missing resource SKIPS the test on a user's machine and FAILS it where it is
required: ``CI=true`` (any CI), ``MEDCLASSIFY_REQUIRE_REALDATA=1`` (realdata) or
``MEDCLASSIFY_REQUIRE_BROWSER=1`` (browser).

Fixture data: ``tests/fixtures/{bloodmnist,breastmnist}.npz`` are small
stratified cuts of the official files (``tests/fixtures/make_fixtures.py``).
Their MD5 differs from the official one the registry checks, so
``fixture_data_dir`` replaces the registry's ``TaskSpec`` entries (via
``dataclasses.replace``) with copies whose 28-px MD5 is the fixture's, for the
duration of one test; the real-data tests in the same session still see the
official MD5s.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("medclassify", deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", parent=settings.get_profile("medclassify"), derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                          or ("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "medclassify"))
except ImportError:  # hypothesis is a dev requirement; only test_preprocessing needs it
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_IMAGES = FIXTURES / "images"
DATA_FILES = ("bloodmnist.npz", "breastmnist.npz")
CHROMIUM = Path("/usr/bin/chromium")


# --------------------------------------------------------------------------- resources

def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def in_ci() -> bool:
    return _truthy("CI")


def realdata_required() -> bool:
    return in_ci() or _truthy("MEDCLASSIFY_REQUIRE_REALDATA")


def browser_required() -> bool:
    return in_ci() or _truthy("MEDCLASSIFY_REQUIRE_BROWSER")


def _data_candidates() -> list[Path]:
    env = os.environ.get("MEDMNIST_ROOT")
    out = [Path(env).expanduser()] if env else []
    out += [Path("~/.medmnist").expanduser(), REPO_ROOT.parent / "shared" / "data" / "medmnist"]
    return list(dict.fromkeys(out))  # without repeats (MEDMNIST_ROOT may be set to the fallback below)


def find_realdata_dir() -> Path | None:
    """The first candidate folder holding both official npz files, or None."""
    for path in _data_candidates():
        if all((path / name).is_file() for name in DATA_FILES):
            return path
    return None


def find_vgg16_weights() -> Path | None:
    env = os.environ.get("VGG16_WEIGHTS")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "weights" / "vgg16_imagenet_notop.h5")
    for path in candidates:
        if path.is_file():
            return path
    return None


REALDATA_DIR = find_realdata_dir()
VGG16_WEIGHTS = find_vgg16_weights()
# Let the library's own defaults (and subprocesses) find what the tests found.
if REALDATA_DIR is not None and not os.environ.get("MEDMNIST_ROOT"):
    os.environ["MEDMNIST_ROOT"] = str(REALDATA_DIR)
if VGG16_WEIGHTS is not None and not os.environ.get("VGG16_WEIGHTS"):
    os.environ["VGG16_WEIGHTS"] = str(VGG16_WEIGHTS)


def _missing(message: str, required: bool, how: str) -> None:
    if required:
        pytest.fail(f"{message} -- required here ({how}); provide it or unset the requirement", pytrace=False)
    pytest.skip(message)


def require_realdata() -> Path:
    if REALDATA_DIR is None:
        tried = ", ".join(str(p) for p in _data_candidates())
        _missing(f"official MedMNIST files {' and '.join(DATA_FILES)} not found (tried {tried}; set MEDMNIST_ROOT)",
                 realdata_required(), "CI=true or MEDCLASSIFY_REQUIRE_REALDATA=1")
    return REALDATA_DIR


def require_vgg16_weights() -> Path:
    if VGG16_WEIGHTS is None:
        _missing("VGG16 ImageNet notop weights not found (set VGG16_WEIGHTS to vgg16_imagenet_notop.h5)",
                 realdata_required(), "CI=true or MEDCLASSIFY_REQUIRE_REALDATA=1")
    return VGG16_WEIGHTS


def require_chromium() -> Path:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)", browser_required(),
                 "CI=true or MEDCLASSIFY_REQUIRE_BROWSER=1")
    return CHROMIUM


def require_playwright():
    """``playwright.sync_api``; its absence skips a browser test on a user's machine and fails it where the
    browser tests are required (an ``importorskip`` would skip them in CI too)."""
    try:
        from playwright import sync_api
    except ImportError as exc:
        _missing(f"Playwright for Python is not installed ({exc}; pip install playwright)", browser_required(),
                 "CI=true or MEDCLASSIFY_REQUIRE_BROWSER=1")
    return sync_api


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("realdata")
    if marker is not None:
        needs = marker.kwargs.get("needs", marker.args[0] if marker.args else ("data",))
        needs = (needs,) if isinstance(needs, str) else tuple(needs)
        if "data" in needs:
            require_realdata()
        if "weights" in needs:
            require_vgg16_weights()
    if item.get_closest_marker("browser") is not None:
        require_chromium()


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    """Folder with the official npz files (skips or fails like the ``realdata`` marker)."""
    return require_realdata()


@pytest.fixture(scope="session")
def vgg16_weights() -> Path:
    return require_vgg16_weights()


# --------------------------------------------------------------------------- fixture data

def fixture_md5s() -> dict[str, str]:
    from medclassify.data import md5sum

    return {"blood": md5sum(FIXTURES / "bloodmnist.npz"), "breast": md5sum(FIXTURES / "breastmnist.npz")}


def patch_registry_md5(mp: pytest.MonkeyPatch) -> None:
    """Make the registry accept the fixture npz files (28 px) instead of the official ones."""
    from medclassify import registry

    for name, digest in fixture_md5s().items():
        spec = registry.TASKS[name]
        mp.setitem(registry.TASKS, name, dataclasses.replace(spec, md5={**spec.md5, 28: digest}))


@pytest.fixture(scope="session")
def fixture_npz_dir(tmp_path_factory) -> Path:
    """A temp copy of the fixture npz files (official names and format). MD5 NOT patched."""
    out = tmp_path_factory.mktemp("medmnist_fixture")
    for name in DATA_FILES:
        shutil.copyfile(FIXTURES / name, out / name)
    return out


@pytest.fixture
def fixture_data_dir(fixture_npz_dir, monkeypatch) -> Path:
    """The fixture npz folder, with the registry MD5s patched to match for this test."""
    patch_registry_md5(monkeypatch)
    return fixture_npz_dir


@pytest.fixture(scope="session")
def fixture_images() -> dict[str, SimpleNamespace]:
    """Real test-split thumbnails saved as PNG/JPEG: name -> (path, task, label)."""
    manifest = json.loads((FIXTURE_IMAGES / "labels.json").read_text())
    return {name: SimpleNamespace(path=FIXTURE_IMAGES / name, **info) for name, info in manifest.items()}


TINY_WIDTHS = (8, 16)  # two stages: tracing the train step dominates the cost
TINY_LIMITS = {"blood": 96, "breast": 30}


@pytest.fixture(autouse=True, scope="session")
def _served_models_are_the_shipped_ones():
    """$MEDCLASSIFY_BLOOD_MODEL / $MEDCLASSIFY_BREAST_MODEL in a developer's shell would make the app and
    get_predictor serve another model than the shipped one the tests check."""
    saved = {name: os.environ.pop(name) for name in ("MEDCLASSIFY_BLOOD_MODEL", "MEDCLASSIFY_BREAST_MODEL")
             if name in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_models(fixture_npz_dir, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Tiny blood and breast models trained once per session on the fixture data.

    Each entry: ``path`` (.h5 with card and ood.npz beside it), ``result``
    (the TrainResult), ``ood`` (the fit_ood settings).
    """
    from medclassify.ood import fit_ood
    from medclassify.training import TrainConfig, save_trained, train

    out = tmp_path_factory.mktemp("tiny_models")
    models = {}
    with pytest.MonkeyPatch.context() as mp:
        patch_registry_md5(mp)
        for task in ("blood", "breast"):
            cfg = TrainConfig(task=task, epochs=1, limit=TINY_LIMITS[task], widths=TINY_WIDTHS, batch_size=64,
                              data_dir=str(fixture_npz_dir), verbose=0, seed=0)
            result = train(cfg)
            path = save_trained(result, out / f"tiny_{task}.h5", command=f"tests: tiny {task}")
            settings_ = fit_ood(task, path, str(fixture_npz_dir))
            models[task] = SimpleNamespace(path=path, result=result, ood=settings_)
    return models


# --------------------------------------------------------------------------- awkward files

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (RGB, 8 bit) with a token IDAT: nothing big is allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", rle: bool = False,
                claimed_size: Optional[tuple[int, int]] = None, bits_stored: int = 16,
                window: Optional[tuple[float, float]] = None) -> Path:
    """A minimal valid DICOM file (Secondary Capture, explicit VR little endian) holding ``pixels`` (uint16).

    ``pixels`` of shape (frames, rows, columns) gives a multi-frame file; ``rle`` stores it RLE-compressed;
    ``claimed_size`` (rows, columns) then overwrites the header's size, as a malicious file would;
    ``bits_stored`` is the header's significant bits; ``window`` adds (Window Center, Window Width).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Test^Synthetic"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    if rle:
        from pydicom.uid import RLELossless

        ds.compress(RLELossless, pixels.astype(np.uint16))
    if claimed_size is not None:
        ds.Rows, ds.Columns = claimed_size
    ds.save_as(str(path), enforce_file_format=True)
    return path


def task_images(fixture_images, task: str) -> list[Path]:
    """The fixture images of one task, sorted by path."""
    return sorted(info.path for info in fixture_images.values() if info.task == task)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(width: int, height: int, channels: int = 3, seed: int = 0, noise: float = 8.0) -> np.ndarray:
    """A smooth, non-symmetric uint8 test pattern with some texture (Gaussian noise of sd ``noise``)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 255.0 * (0.6 * x / max(width - 1, 1) + 0.4 * (y / max(height - 1, 1)) ** 2)
    planes = [np.clip(base * f + rng.normal(0, noise, base.shape), 0, 255) for f in (1.0, 0.7, 0.4)[:channels]]
    array = np.stack(planes, axis=-1).astype(np.uint8)
    return array[..., 0] if channels == 1 else array


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


#: kind -> expected outcome: "ok" (a valid array) or "error" (ImageError)
AWKWARD_KINDS = {
    "zero_bytes": "error",
    "text_renamed_png": "error",
    "truncated_png": "error",
    "truncated_jpeg": "error",
    "huge_dimensions": "error",
    "png_16bit": "ok",
    "cmyk_jpeg": "ok",
    "palette_png": "ok",
    "animated_gif": "ok",
    "one_pixel": "error",
    "dicom": "ok",
}


def make_awkward_files(folder: Path) -> dict[str, Path]:
    """Malformed or unusual image files, one per ``AWKWARD_KINDS`` entry."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(gradient(96, 72))  # blood's centre crop of it (40 px) still covers 28 px
    png = _encode(rgb, "PNG")
    jpeg = _encode(rgb, "JPEG", quality=90)
    files = {
        "zero_bytes": ("empty.png", b""),
        "text_renamed_png": ("notes.png", b"This is not an image, just some text.\n" * 5),
        "truncated_png": ("truncated.png", png[: len(png) // 2]),
        "truncated_jpeg": ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        "huge_dimensions": ("huge.png", png_header_only(100_000, 100_000)),
        "png_16bit": ("sixteen.png", _encode(Image.fromarray((gradient(60, 60, 1).astype(np.uint16) * 257)), "PNG")),
        "cmyk_jpeg": ("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG", quality=90)),
        "palette_png": ("palette.png", _encode(rgb.convert("P"), "PNG")),
        "animated_gif": ("animated.gif", _encode(rgb, "GIF", save_all=True,
                                                 append_images=[Image.fromarray(255 - gradient(96, 72))],
                                                 duration=100, loop=0)),
        "one_pixel": ("one.png", _encode(Image.new("RGB", (1, 1), (120, 30, 60)), "PNG")),
    }
    paths = {}
    for kind, (name, data) in files.items():
        paths[kind] = folder / name
        paths[kind].write_bytes(data)
    paths["dicom"] = write_dicom(folder / "scan.dcm", gradient(64, 64, 1).astype(np.uint16) * 64)
    assert set(paths) == set(AWKWARD_KINDS)
    return paths


@pytest.fixture(scope="session")
def awkward_files(tmp_path_factory) -> dict[str, Path]:
    """kind -> path of a malformed/unusual image file (see ``AWKWARD_KINDS`` for the expected outcome)."""
    return make_awkward_files(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="session")
def awkward_kinds() -> dict[str, str]:
    return dict(AWKWARD_KINDS)
