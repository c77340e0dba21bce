"""Loading the MedMNIST npz files: paths, MD5 checks, shapes and error messages."""
from pathlib import Path

import numpy as np
import pytest

from medclassify.data import DataError, dataset_path, default_data_dir, load_all, load_split, md5sum
from medclassify.registry import get_task

FIXTURE_SIZES = {"blood": {"train": 96, "val": 96, "test": 96}, "breast": {"train": 30, "val": 10, "test": 10}}
OFFICIAL_SIZES = {"blood": {"train": 11959, "val": 1712, "test": 3421}, "breast": {"train": 546, "val": 78, "test": 156}}


def test_default_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "env"))
    assert default_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MEDMNIST_ROOT")
    assert default_data_dir() == Path("~/.medmnist").expanduser()
    assert default_data_dir("~/x") == Path.home() / "x"


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_load_fixture_splits(fixture_data_dir, task):
    spec = get_task(task)
    splits = load_all(task, data_dir=fixture_data_dir)
    assert set(splits) == {"train", "val", "test"}
    for name, split in splits.items():
        assert split.images.dtype == np.uint8
        assert split.images.shape == (FIXTURE_SIZES[task][name], 28, 28, spec.channels)
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (FIXTURE_SIZES[task][name],)
        assert set(np.unique(split.labels)) == set(range(spec.num_classes))  # stratified: every class present


def test_fixture_matches_official_format():
    with np.load(Path(__file__).parent / "fixtures" / "breastmnist.npz") as npz:
        assert set(npz.files) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
        assert npz["train_images"].shape[1:] == (28, 28)  # no channel axis, like the official file
        assert npz["train_labels"].shape[1:] == (1,)
        assert npz["train_labels"].dtype == np.uint8


def test_unpatched_md5_mismatch_is_a_data_error(fixture_npz_dir):
    # Without the registry patch, the fixture file is (rightly) not the official file.
    with pytest.raises(DataError, match="corrupt or not the official file.*MD5"):
        load_split("breast", "train", data_dir=fixture_npz_dir)
    # verify=False skips the check
    assert dataset_path("breast", data_dir=fixture_npz_dir, verify=False) == fixture_npz_dir / "breastmnist.npz"


def test_md5sum(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert md5sum(path) == "900150983cd24fb0d6963f7d28e17f72"


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError, match="not found.*MEDMNIST_ROOT"):
        dataset_path("blood", data_dir=tmp_path, download=False)


def test_missing_file_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import keras

    calls = []

    def fail(**kwargs):
        calls.append(kwargs)
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", fail)
    with pytest.raises(DataError, match="could not download bloodmnist.npz.*network unreachable.*by hand"):
        load_split("blood", "test", data_dir=tmp_path)
    assert calls and calls[0]["md5_hash"] == get_task("blood").md5[28]
    assert calls[0]["origin"] == get_task("blood").url(28)


def _fake_get_file(calls):
    """Stands in for ``keras.utils.get_file``: prints to stdout as Keras does, then writes the file."""

    def get_file(**kwargs):
        calls.append(kwargs)
        print(f"Downloading data from {kwargs['origin']}")
        print("1/1 [==============================] - 0s")
        target = Path(kwargs["cache_dir"]) / kwargs["cache_subdir"] / kwargs["fname"]
        target.write_bytes(b"downloaded")
        return str(target)

    return get_file


def test_download_progress_goes_to_stderr_not_stdout(tmp_path, monkeypatch, capsys):
    """stdout carries the CLI's JSON (evaluate --json, predict --json): Keras's download messages must not."""
    import keras

    calls = []
    monkeypatch.setattr(keras.utils, "get_file", _fake_get_file(calls))
    path = dataset_path("blood", data_dir=tmp_path, verify=False)
    assert calls and path == tmp_path / "bloodmnist.npz" and path.read_bytes() == b"downloaded"
    out, err = capsys.readouterr()
    assert out == ""
    assert "Downloading data from" in err and "1/1" in err


@pytest.mark.parametrize("how", ["argument", "MEDMNIST_ROOT"])
def test_a_named_data_folder_that_does_not_exist_is_an_error_not_a_new_folder(tmp_path, monkeypatch, how):
    import keras

    calls = []
    monkeypatch.setattr(keras.utils, "get_file", _fake_get_file(calls))
    typo = tmp_path / "medmnsit"
    if how == "argument":
        monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
        data_dir = typo
    else:
        monkeypatch.setenv("MEDMNIST_ROOT", str(typo))
        data_dir = None
    for download in (True, False):
        with pytest.raises(DataError) as info:
            load_split("blood", "test", data_dir=data_dir, download=download)
        message = str(info.value)
        assert message.startswith(f"data folder {typo} does not exist") and "\n" not in message
        assert ("MEDMNIST_ROOT" in message) == (how == "MEDMNIST_ROOT")
    assert not typo.exists() and not calls  # nothing created, nothing downloaded


def test_a_named_data_path_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        dataset_path("blood", data_dir=tmp_path / "file")


def test_the_default_data_folder_is_still_created(tmp_path, monkeypatch):
    import keras

    calls = []
    monkeypatch.setattr(keras.utils, "get_file", _fake_get_file(calls))
    monkeypatch.delenv("MEDMNIST_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = dataset_path("breast", verify=False)
    assert path == tmp_path / ".medmnist" / "breastmnist.npz" and path.exists() and len(calls) == 1


def test_unknown_split(fixture_data_dir):
    with pytest.raises(ValueError, match="unknown split"):
        load_split("blood", "holdout", data_dir=fixture_data_dir)


def _patch_md5(monkeypatch, task: str, path: Path):
    import dataclasses

    from medclassify import registry

    spec = registry.TASKS[task]
    monkeypatch.setitem(registry.TASKS, task, dataclasses.replace(spec, md5={**spec.md5, 28: md5sum(path)}))


def test_wrong_shape_is_a_data_error(tmp_path, monkeypatch):
    path = tmp_path / "breastmnist.npz"
    np.savez_compressed(path, train_images=np.zeros((4, 32, 32), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    _patch_md5(monkeypatch, "breast", path)
    with pytest.raises(DataError, match=r"expected \(28, 28, 1\)"):
        load_split("breast", "train", data_dir=tmp_path)


def test_missing_key_is_a_data_error(tmp_path, monkeypatch):
    path = tmp_path / "breastmnist.npz"
    np.savez_compressed(path, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    _patch_md5(monkeypatch, "breast", path)
    with pytest.raises(DataError, match="could not be read as a MedMNIST npz"):
        load_split("breast", "val", data_dir=tmp_path)


def test_garbage_file_is_a_data_error(tmp_path, monkeypatch):
    path = tmp_path / "breastmnist.npz"
    path.write_bytes(b"definitely not a zip file" * 10)
    _patch_md5(monkeypatch, "breast", path)
    with pytest.raises(DataError):
        load_split("breast", "train", data_dir=tmp_path)


@pytest.mark.realdata
@pytest.mark.parametrize("task", ["blood", "breast"])
def test_official_files(realdata_dir, task):
    spec = get_task(task)
    path = dataset_path(task, data_dir=realdata_dir, download=False)  # MD5-verified
    assert md5sum(path) == spec.md5[28]
    for name, split in load_all(task, data_dir=realdata_dir, download=False).items():
        assert split.images.shape == (OFFICIAL_SIZES[task][name], 28, 28, spec.channels)
        assert split.labels.min() == 0 and split.labels.max() == spec.num_classes - 1
