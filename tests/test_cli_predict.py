"""The predict command (``cli._predict``): its file walk, output lines, exit codes and memory on 10,000 files.

Models: the session's ``tiny_models`` (conftest), trained on the fixture data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import png_bytes, task_images
from medclassify import cli
from medclassify.cli import expand_paths
from medclassify.inference import BORDERLINE
from medclassify.registry import TASKS, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_NAMES = sorted(TASKS)
JSON_KEYS = {"file", "task", "label", "class_index", "probabilities", "ood", "close_call", "warnings"}


# --------------------------------------------------------------------------- expand_paths

def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_expand_paths_folders_globs_and_missing(tmp_path):
    root = tmp_path / "imgs"
    touch(root / "b.png")
    touch(root / "a.JPG")
    touch(root / "notes.txt")
    touch(root / ".hidden.png")
    touch(root / "sub" / "c.dcm")
    touch(root / ".cache" / "d.png")
    touch(root / "sub" / "deeper" / "e.tif")
    other = touch(tmp_path / "other.bin")

    folder = list(expand_paths([str(root)]))
    assert folder == [str(root / "a.JPG"), str(root / "b.png"), str(root / "sub" / "c.dcm"),
                      str(root / "sub" / "deeper" / "e.tif")]
    assert isinstance(expand_paths([str(root)]), types.GeneratorType)  # lazy

    # an explicitly named file is taken whatever its suffix
    assert list(expand_paths([str(other)])) == [str(other)]
    # globs: image files only, sorted; ** is recursive; matched folders are walked
    assert list(expand_paths([str(root / "*.png")])) == [str(root / "b.png")]
    assert list(expand_paths([str(root / "**" / "*.dcm")])) == [str(root / "sub" / "c.dcm")]
    assert list(expand_paths([str(root / "su*")])) == [str(root / "sub" / "c.dcm"),
                                                      str(root / "sub" / "deeper" / "e.tif")]
    # missing paths and globs that match nothing come back as they are (reported as errors)
    missing = str(tmp_path / "nope.png")
    nothing = str(tmp_path / "*.jpeg")
    assert list(expand_paths([missing, nothing])) == [missing, nothing]
    # patterns are expanded in the order given; Path objects work too
    assert list(expand_paths([str(other), root / "b.png"])) == [str(other), str(root / "b.png")]


# --------------------------------------------------------------------------- the predict CLI

def make_folder(tmp_path: Path, fixture_images, broken: bool) -> tuple[Path, list[str]]:
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    names = []
    for i, path in enumerate(task_images(fixture_images, "blood")):
        target = folder / ("nested" if i % 2 else "") / path.name
        target.write_bytes(path.read_bytes())
        names.append(str(target))
    (folder / "readme.txt").write_text("not an image, and not picked up")
    if broken:
        bad = folder / "zz_broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        names.append(str(bad))
    return folder, names


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.out.splitlines() if line.strip()], captured.err


def test_cli_predict_folder_json_and_progress(tiny_models, fixture_images, tmp_path, capsys):
    folder, names = make_folder(tmp_path, fixture_images, broken=True)
    model = str(tiny_models["blood"].path)
    code, lines, err = run_cli(["predict", "--task", "blood", "--model", model, "--json", "--batch-size", "3",
                                str(folder)], capsys)
    records = [json.loads(line) for line in lines]
    assert sorted(r["file"] for r in records) == sorted(names)  # one line per file
    assert len(records) == len(names)
    good = [r for r in records if "error" not in r]
    bad = [r for r in records if "error" in r]
    assert len(good) == len(names) - 1 and len(bad) == 1
    assert set(bad[0]) == {"file", "error"} and bad[0]["file"].endswith("zz_broken.png")
    for r in good:
        assert JSON_KEYS <= set(r)
        assert set(r["probabilities"]) == set(get_task("blood").class_names)
        assert r["label"] == get_task("blood").class_names[r["class_index"]]
    assert code == 1  # one file failed
    # the progress bar (stderr, never stdout) reached the total
    assert "predict blood" in err and f"{len(names)}/{len(names)}" in err


def test_cli_predict_all_good_exits_zero(tiny_models, fixture_images, tmp_path, capsys):
    folder, names = make_folder(tmp_path, fixture_images, broken=False)
    model = str(tiny_models["blood"].path)
    glob_pattern = str(folder / "**" / "*.png")
    code, lines, err = run_cli(["predict", "--task", "blood", "--model", model, "--json", "--no-progress",
                                glob_pattern], capsys)
    expected = sorted(n for n in names if n.endswith(".png"))
    assert code == 0
    assert [json.loads(line)["file"] for line in lines] == expected
    assert "predict blood" not in err  # --no-progress


def test_cli_predict_text_output(tiny_models, fixture_images, capsys):
    paths = [str(p) for p in task_images(fixture_images, "breast")]
    code, lines, _ = run_cli(["predict", "--task", "breast", "--model", str(tiny_models["breast"].path),
                              "--no-progress", *paths], capsys)
    assert code == 0 and len(lines) == len(paths)
    answered = 0
    for path, line in zip(paths, lines):
        file, label, confidence, *warning = line.split("\t")
        assert file == path
        if label == "no reliable answer":  # the tiny model finds some fixture images unlike its training data
            assert confidence == "-" and warning[0].startswith("WARNING: ")
        else:  # thresholded: P(malignant) and the threshold, not the label's own probability
            assert label in get_task("breast").class_names and warning[1:] in ([], ["close call"])
            p_malignant = float(confidence.removeprefix("P(malignant)="))
            threshold = float(warning[0].removeprefix("threshold="))
            assert 0 <= p_malignant <= 1
            answered += 1
            if abs(p_malignant - threshold) > 0.001:  # printed to 3 decimals
                assert (label == "malignant") == (p_malignant > threshold)
            if abs(abs(p_malignant - threshold) - BORDERLINE) > 0.001:
                assert (warning[1:] == ["close call"]) == (abs(p_malignant - threshold) < BORDERLINE)
    assert answered >= 1, "every line was withheld: the threshold checks above never ran"


@pytest.mark.parametrize("task", ["blood", "breast"])
def test_cli_predict_marks_close_calls(task, tiny_models, fixture_images, capsys, monkeypatch):
    """Every answer is a close call when the margins span all probabilities, and none when they are 0: the
    text line ends in 'close call' and the JSON says so, as the app marks it."""
    from medclassify import inference

    paths = [str(p) for p in task_images(fixture_images, task)]
    argv = ["predict", "--task", task, "--model", str(tiny_models[task].path), "--no-progress", *paths]
    for margin, expected in ((1.01, True), (0.0, False)):
        monkeypatch.setattr(inference, "CLOSE_CALL", 2 * margin)
        monkeypatch.setattr(inference, "BORDERLINE", margin)
        _, lines, _ = run_cli(argv, capsys)
        answered = [line for line in lines if "\tno reliable answer\t" not in line]
        assert answered and all(line.endswith("\tclose call") == expected for line in answered)
        _, lines, _ = run_cli(argv + ["--json"], capsys)
        records = [json.loads(line) for line in lines]
        assert all(record["close_call"] == expected for record in records if not record["ood"])


def test_cli_predict_breast_json_has_threshold(tiny_models, fixture_images, capsys):
    path = str(task_images(fixture_images, "breast")[0])
    code, lines, _ = run_cli(["predict", "--task", "breast", "--model", str(tiny_models["breast"].path),
                              "--json", "--no-progress", path], capsys)
    record = json.loads(lines[0])
    assert code == 0 and JSON_KEYS <= set(record)
    assert 0 <= record["p_malignant"] <= 1 and record["threshold"] is not None


def test_cli_predict_missing_and_usage_errors(tiny_models, tmp_path, capsys):
    model = str(tiny_models["blood"].path)
    missing = str(tmp_path / "missing.png")
    code, lines, _ = run_cli(["predict", "--task", "blood", "--model", model, "--json", "--no-progress", missing],
                             capsys)
    assert code == 1 and [json.loads(line) for line in lines] == [
        {"file": missing, "error": f"no such file: {missing}"}]
    # usage errors: exit 2
    code, lines, err = run_cli(["predict", "--task", "blood", "--model", model, "--batch-size", "0", missing],
                               capsys)
    assert code == 2 and not lines and "batch-size" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--task", "nosuchtask", missing])
    assert exc.value.code == 2
    # a missing model file is an input that failed (exit 1), as for every command that takes --model
    code, lines, err = run_cli(["predict", "--task", "blood", "--model", str(tmp_path / "no_model.h5"), missing],
                               capsys)
    assert code == 1 and not lines and "not found" in err
    # an empty folder: nothing classified is a failure, said on stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines, err = run_cli(["predict", "--task", "blood", "--model", model, "--no-progress", str(empty)], capsys)
    assert code == 1 and not lines and "no image files" in err


# --------------------------------------------------------------------------- 10,000 files, flat memory

def write_many_pngs(folder: Path, n: int, distinct: int = 64) -> None:
    """``n`` small PNGs (28x28 RGB) in 10 sub-folders; encoding ``distinct`` images once keeps this fast."""
    rng = np.random.default_rng(0)
    blobs = [png_bytes(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(distinct)]
    for part in range(10):
        (folder / f"part{part}").mkdir(parents=True)
    for i in range(n):
        (folder / f"part{i % 10}" / f"img{i:05d}.png").write_bytes(blobs[i % distinct])


@pytest.mark.slow
def test_cli_predict_10000_files_streams_with_flat_memory(tiny_models, tmp_path):
    psutil = pytest.importorskip("psutil")
    n = 10_000
    folder = tmp_path / "many"
    write_many_pngs(folder, n)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "medclassify", "predict", "--task", "blood", "--json", "--batch-size", "256",
               "--model", str(tiny_models["blood"].path), str(folder)]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stderr_chunks: list[str] = []
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    watched = psutil.Process(proc.pid)
    rss_samples: list[tuple[int, int]] = []  # (lines seen, rss bytes)
    count = 0
    files = set()
    try:
        for line in proc.stdout:
            record = json.loads(line)
            assert "error" not in record, record
            files.add(record["file"])
            count += 1
            if count % 500 == 0:
                try:
                    rss_samples.append((count, watched.memory_info().rss))
                except psutil.NoSuchProcess:  # pragma: no cover
                    break
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
    drain.join(timeout=10)
    elapsed = time.monotonic() - start
    assert code == 0, "".join(stderr_chunks)[-2000:]
    assert count == n and len(files) == n  # one JSON line per file
    assert f"{n}/{n}" in "".join(stderr_chunks)  # the progress bar finished on stderr
    # Flat memory: after the first batches RSS stays put (measured: +1 MB from 1,500 to 10,000 files). Holding
    # the ~8,500 later prepared images and predictions would add ~40 MB; allow 20 MB of allocator noise.
    baseline = [rss for seen, rss in rss_samples if seen >= 1500][0]
    peak = max(rss for _, rss in rss_samples)
    assert peak - baseline < 20 * 1024 * 1024, [(s, r // 2**20) for s, r in rss_samples]
    assert elapsed < 150


def test_text_output_fields_escape_control_characters():
    from medclassify.cli import _error_text, _one_field

    assert _one_field("a\nb\tc\x1bd\u2028e.png") == "a\\nb\\tc\\x1bd\\u2028e.png"
    assert _one_field("plain é ü/scan\udcff.png") == "plain é ü/scan\udcff.png"  # printable text and surrogates kept
    assert _error_text("x/**/*.png", "no such file: x/**/*.png") == "no file matches x/**/*.png"
    assert _error_text("x.png", "no such file: x.png") == "no such file: x.png"
    assert _error_text("x[1].png", "cannot read the image") == "cannot read the image"
