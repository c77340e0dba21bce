"""The benchmark script runs and writes its files (speed itself is measured, never asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import benchmark  # noqa: E402


def test_architectures_are_labelled_with_their_trained_accuracy():
    # one 64/128/256 CNN is cnn_flips_wide; the shipped ensemble of three of them is not that architecture
    label = benchmark.trained_accuracy("blood", widths=(64, 128, 256))
    assert label.startswith("cnn_flips_wide: test accuracy 0.")
    assert benchmark.trained_accuracy("blood", widths=(3, 5, 7)) == ""  # never trained: no label
    names = [m["name"] for m in benchmark.shipped_models()]
    assert any(name.startswith("breast (shipped, ") and "test auc" in name for name in names)


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path):
    out, markdown = tmp_path / "latest.json", tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", "--quick", "--no-app", "--no-candidates", "--cli-files", "0",
         "--out", str(out), "--markdown", str(markdown)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    by_task = {m["task"]: m for m in results["models"]}
    assert set(by_task) == {"blood", "breast"}
    for measured in by_task.values():
        assert "error" not in measured, measured.get("error")
        assert measured["serving"]["p50_ms"] > 0 and measured["model_predict"]["p50_ms"] > 0
        assert measured["speedup_p50"] == pytest.approx(
            measured["model_predict"]["p50_ms"] / measured["serving"]["p50_ms"], rel=0.05)
        assert set(measured["throughput"]) == {"1", "32", "256"}
    text = markdown.read_text()
    assert "Single image:" in text and "img/s batch 256" in text and "Reproduce with `make benchmark`" in text
