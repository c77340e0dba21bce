"""Loading the official MedMNIST npz files without the torch-based medmnist package.

Files live where medmnist keeps them (``~/.medmnist``) unless ``--data-dir`` or
``MEDMNIST_ROOT`` says otherwise, so users who already downloaded them reuse
their copies.  A folder named by ``--data-dir`` or ``MEDMNIST_ROOT`` must exist
(a misspelt one is an error, not a new folder); only ``~/.medmnist`` is created.
A missing file is fetched from the official Zenodo record and its MD5 is checked
against the registry; a corrupt file is never silently used.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .registry import TaskSpec, get_task

SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or of the wrong shape."""


def default_data_dir(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """``data_dir`` if given, else ``$MEDMNIST_ROOT``, else medmnist's default ``~/.medmnist``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("MEDMNIST_ROOT")
    if env:
        return Path(env).expanduser()
    return Path("~/.medmnist").expanduser()


def _check_chosen_root(root: Path, data_dir) -> None:
    """A folder the user named (``data_dir`` or ``$MEDMNIST_ROOT``) must exist: a misspelt name must not
    silently become a new folder with a fresh download in it.  Only the default ``~/.medmnist`` is created."""
    if root.is_dir():
        return
    problem = "is not a folder" if root.exists() else "does not exist"
    if data_dir:
        raise DataError(f"data folder {root} {problem}")
    if os.environ.get("MEDMNIST_ROOT"):
        raise DataError(f"data folder {root} {problem} (set by MEDMNIST_ROOT)")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_path(task: str | TaskSpec, size: int = 28, data_dir=None, download: bool = True,
                 verify: bool = True) -> Path:
    """Path of the task's npz file, downloading it (MD5-checked) when missing."""
    spec = get_task(task) if isinstance(task, str) else task
    root = default_data_dir(data_dir)
    _check_chosen_root(root, data_dir)
    path = root / spec.file_name(size)
    expected = spec.md5[size]
    if not path.exists():
        if not download:
            raise DataError(f"{path} not found (set --data-dir or MEDMNIST_ROOT to the folder holding {path.name})")
        path = _download(spec, size, root)
    if verify:
        actual = md5sum(path)
        if actual != expected:
            raise DataError(
                f"{path} is corrupt or not the official file: MD5 {actual}, expected {expected}. "
                f"Delete it and download again from {spec.url(size)}"
            )
    return path


def _download(spec: TaskSpec, size: int, root: Path) -> Path:
    import keras

    root.mkdir(parents=True, exist_ok=True)  # only ever the default folder: dataset_path checked a chosen one
    try:
        # Keras prints "Downloading data from ..." and its progress bar to stdout, which would corrupt the
        # CLI's JSON output (evaluate --json, predict --json): it goes to stderr with the other progress.
        with contextlib.redirect_stdout(sys.stderr):
            fetched = keras.utils.get_file(
                fname=spec.file_name(size),
                origin=spec.url(size),
                md5_hash=spec.md5[size],
                hash_algorithm="md5",
                cache_dir=str(root),
                cache_subdir=".",
            )
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download {spec.file_name(size)} from {spec.url(size)} ({exc}); "
            f"download it by hand (MD5 {spec.md5[size]}) into {root}"
        ) from exc
    return Path(fetched)


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, (N,)


def load_split(task: str | TaskSpec, split: str, size: int = 28, data_dir=None,
               download: bool = True) -> Split:
    """One official split as uint8 images with an explicit channel axis and flat int labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    spec = get_task(task) if isinstance(task, str) else task
    path = dataset_path(spec, size, data_dir, download=download)
    try:
        with np.load(path) as npz:
            images = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} could not be read as a MedMNIST npz: {exc}") from exc
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != (size, size, spec.channels):
        raise DataError(f"{path}: {split} images have shape {images.shape[1:]}, expected {(size, size, spec.channels)}")
    return Split(images=images.astype(np.uint8, copy=False), labels=labels.reshape(-1).astype(np.int64))


def load_all(task: str | TaskSpec, size: int = 28, data_dir=None, download: bool = True) -> dict[str, Split]:
    return {split: load_split(task, split, size, data_dir, download) for split in SPLITS}
