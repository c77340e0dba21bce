#!/usr/bin/env python
"""Serving benchmarks: latency, throughput, load time, memory, CLI and app start.

    python benchmarks/benchmark.py            # full run (a few minutes)
    python benchmarks/benchmark.py --quick    # fewer repetitions, no variant study (about a minute)

Prints a table, writes ``benchmarks/results/latest.json`` (every number) and
``benchmarks/RESULTS.md`` (a table for the README, with the command and the
machine).  This is a measurement, not a test: nothing fails when a target is
missed; the targets are marked in the table.

What is measured, for each shipped model (``model_blood.h5``,
``model_breast.h5``) and for candidate blood CNNs built with
``build_cnn(widths=...)`` (random weights: speed does not depend on them):

* single-image latency (p50/p95/min) of the serving path
  (``Predictor.predict_arrays`` on one 28-px image: the int8 copy where the card lists one, else one
  float TensorFlow Lite call) and of
  plain ``model.predict`` in the same process, and their ratio;
* end-to-end single image: PNG bytes -> ``prepare`` -> model -> ``Prediction``
  (``Predictor.predict``), and the same for a full-size 360x363 JPEG (blood);
* throughput (images/s) of the serving path at batch 1, 32 and 256;
* model load time (``Predictor(warm=False)``) and warm-up, in this process, and
  a cold process (import TensorFlow + load + warm-up) with its peak RSS;
* the ``predict`` CLI over a folder of PNG files (files/s, peak RSS);
* the Streamlit app: process start -> ``/_stcore/health`` 200, first page
  (uploader visible, model loaded), and upload -> "Prediction:" shown, in
  headless Chromium (Playwright) -- skipped with a note when ``app.py``,
  Playwright or Chromium is missing;
* full run only: serving-path variants (the previous graph with augmentation
  layers and float input, the TensorFlow graph for single images, XLA
  ``jit_compile``, probabilities only) and runtime settings (child processes
  with TensorFlow intra-op threads 1, single images on TensorFlow instead of
  TensorFlow Lite, oneDNN off).

Timings on a busy machine are slower and noisier: the load average and the CPU
share taken by other processes are recorded next to the numbers, and "min" is
a better estimate than p50 of what an idle machine does.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CANDIDATE_WIDTHS = ((16, 32, 64), (32, 64, 128), (64, 128, 256))
TARGETS = {
    "single_p50_ms": 2.0,
    "speedup_vs_predict": 20.0,
    "blood_batch256_ips": 5000.0,
    "app_health_s": 5.0,
    "first_prediction_s": 1.0,
}

sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def other_cpu_percent(seconds: float = 1.0) -> float:
    """CPU used by every other process over ``seconds``, in percent of one core (200 = two busy cores)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = os.getpid()
    procs = [p for p in psutil.process_iter() if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return round(total, 1)


def machine_info() -> dict:
    import keras
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "platform": platform.platform(),
        "niceness": os.nice(0),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "settings_env": {k: os.environ.get(k) for k in ("MEDCLASSIFY_TF_INTRA_OP_THREADS",
                                                        "MEDCLASSIFY_SINGLE_IMAGE_RUNTIME", "MEDCLASSIFY_TFLITE_THREADS",
                                                        "TF_ENABLE_ONEDNN_OPTS")},
    }


def load_snapshot() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)], "other_cpu_percent": other_cpu_percent()}


# --------------------------------------------------------------------------- timing helpers


def percentiles(samples_s: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p95_ms": round(float(np.percentile(ms, 95)), 4),
            "min_ms": round(float(ms.min()), 4), "n": int(len(ms))}


def time_calls(fn, n: int, warmup: int = 5) -> dict:
    """Wall-clock percentiles of ``n`` calls, plus the process CPU time per call (all threads).

    The CPU time hardly depends on other processes, so it is the contention-robust number.
    """
    for _ in range(warmup):
        fn()
    samples = []
    clock = time.perf_counter
    cpu_start = time.process_time()
    for _ in range(n):
        start = clock()
        fn()
        samples.append(clock() - start)
    out = percentiles(samples)
    out["cpu_ms"] = round((time.process_time() - cpu_start) / n * 1e3, 4)
    return out


def throughput(fn, batch: int, seconds: float) -> dict:
    """Images per second of ``fn`` (one batch per call) for about ``seconds``; CPU ms per image."""
    fn()
    fn()
    done = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    while True:
        fn()
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= 3 * batch:
            return {"ips": round(done / elapsed, 1),
                    "cpu_ms_per_img": round((time.process_time() - cpu_start) / done * 1e3, 4)}


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ``ru_maxrss`` would include a parent's peak inherited over fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except ImportError:
        return float("nan")


class PeakRSS:
    """Poll a process tree's RSS in a thread; ``.peak_mb`` when done."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process] + self.process.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=2)
        return round(self.peak / 2**20, 1)


# --------------------------------------------------------------------------- models and inputs


def sample_png(task: str, seed: int = 0) -> bytes:
    """A real test-split thumbnail from the committed fixtures if there is one, else a textured synthetic image."""
    import numpy as np
    from PIL import Image

    from medclassify.registry import get_task

    folder = REPO_ROOT / "tests" / "fixtures" / "images"
    found = sorted(folder.glob(f"{task}_*.png")) if folder.is_dir() else []
    if found:
        return found[seed % len(found)].read_bytes()
    spec = get_task(task)
    rng = np.random.default_rng(seed)
    array = rng.integers(40, 220, (28, 28, spec.channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()


def fullsize_jpeg(task: str) -> bytes:
    """The sample thumbnail enlarged to a PBC-like 363x360 JPEG (exercises the centre crop + resize)."""
    from PIL import Image

    image = Image.open(io.BytesIO(sample_png(task))).resize((363, 360), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def build_candidates(folder: Path, widths_list) -> list[dict]:
    """Blood CNNs of the given widths saved with a card and OOD statistics (so every check runs)."""
    import numpy as np

    from medclassify.cards import write_card
    from medclassify import models as model_lib
    from medclassify.models import build_cnn, with_temperature
    from medclassify.ood import ood_path
    from medclassify.registry import get_task

    spec = get_task("blood")
    out = []
    for widths in widths_list:
        path = folder / f"blood_cnn_w{'-'.join(map(str, widths))}.h5"
        if not path.exists():
            model = with_temperature(build_cnn(spec, widths=tuple(widths)), 1.5)
            model = model_lib.inference_model(model)  # saved like training saves: augmentation stripped
            model.save(str(path))
            dim = widths[-1]
            np.savez_compressed(ood_path(path), means=np.zeros((spec.num_classes, dim), np.float32),
                                precision=np.eye(dim, dtype=np.float32))
            write_card(path, {"task": "blood", "decision": {"rule": "argmax", "threshold": None},
                              "ood": {"distance_threshold": 1e12, "min_colourfulness": 8.0}})
        note = trained_accuracy("blood", widths=widths)
        out.append({"name": f"blood cnn {'/'.join(map(str, widths))}{f' ({note})' if note else ''}", "task": "blood", "path": str(path),
                    "kind": "candidate", "widths": list(widths)})
    return out


def trained_accuracy(task: str, widths=None, card_path=None) -> str:
    """``<variant>: test accuracy X`` from the results card of a trained model of this size, or ''.

    Speed does not depend on the weights, but the speed/accuracy trade does: each benchmarked
    architecture is labelled with the test accuracy its training variant reached, when one exists.
    """
    from medclassify.cards import load_card_file
    from medclassify.experiments import RESULTS_DIR

    key = "accuracy" if task == "blood" else "auc"
    paths = [Path(card_path)] if card_path else sorted((RESULTS_DIR / task).glob("*.card.json"))
    matches = []
    for path in paths:
        if "_seed" in path.name or not path.exists():
            continue
        card = load_card_file(path)
        config = (card.get("training") or {}).get("config") or {}
        if widths is not None and (config.get("model") != "cnn" or list(config.get("widths") or []) != list(widths)
                                   or (config.get("ensemble") or 1) != 1):
            continue
        if key in (card.get("test") or {}):
            matches.append(card)
    if not matches:
        return ""
    # several variants share an architecture: label it with the one validation prefers, as shipping does
    card = max(matches, key=lambda c: (c.get("validation") or {}).get(key, float("-inf")))
    return f"{card.get('variant', '?')}: test {key} {card['test'][key]:.4f}"


def shipped_models() -> list[dict]:
    from medclassify.cards import read_card
    from medclassify.registry import TASKS

    out = []
    for name, spec in TASKS.items():
        if spec.model_path.exists():
            note = trained_accuracy(name, card_path=spec.card_path)
            served = read_card(spec.model_path).get("serving") or {}
            key = "accuracy" if name == "blood" else "auc"
            value = ((served.get("test") or {}).get("int8_metrics") or {}).get(key)
            if value is not None:
                note += f"; served int8 copy: {value:.4f}"
            out.append({"name": f"{name} (shipped{', ' + note if note else ''})", "task": name, "path": str(spec.model_path),
                        "kind": "shipped"})
    return out


# --------------------------------------------------------------------------- in-process measurements


def measure_model(entry: dict, quick: bool, explore: bool) -> dict:
    import numpy as np

    from medclassify.inference import Predictor, serving_runtime

    task, path = entry["task"], entry["path"]
    result = dict(entry)
    start = time.perf_counter()
    predictor = Predictor(task, path, warm=False, single_image_runtime=serving_runtime())
    result["load_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    predictor.warm_up()
    result["warmup_s"] = round(time.perf_counter() - start, 3)
    result["params"] = int(predictor.model.count_params())
    result["precision"] = predictor.precision
    result["rss_after_load_mb"] = rss_mb()
    spec = predictor.spec
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, *spec.input_shape), dtype=np.uint8)

    n_fast, n_slow = (300, 30) if quick else (2000, 100)
    result["serving"] = time_calls(lambda: predictor.predict_arrays(one), n_fast, warmup=20)
    model = predictor.model
    one_float = one.astype(np.float32)
    result["model_predict"] = time_calls(lambda: model.predict(one_float, verbose=0), n_slow, warmup=3)
    result["speedup_p50"] = round(result["model_predict"]["p50_ms"] / result["serving"]["p50_ms"], 1)

    png = sample_png(task)
    result["prepare_png"] = time_calls(lambda: _prepare(png, spec), n_fast // 2)
    result["end_to_end_png"] = time_calls(lambda: predictor.predict(png), n_fast // 2, warmup=5)
    if spec.source_center_crop:
        jpeg = fullsize_jpeg(task)
        result["end_to_end_fullsize_jpeg"] = time_calls(lambda: predictor.predict(jpeg), n_fast // 4, warmup=3)

    seconds = 1.0 if quick else 3.0
    result["throughput"] = {}
    for batch in (1, 32, 256):
        images = rng.integers(0, 256, (batch, *spec.input_shape), dtype=np.uint8)
        result["throughput"][str(batch)] = throughput(lambda: predictor.predict_arrays(images), batch, seconds)
    # the streaming path over prepared-from-bytes inputs (decode + prepare + OOD + Prediction objects)
    pngs = [sample_png(task, seed=i) for i in range(256)]
    start = time.perf_counter()
    count = sum(1 for _ in predictor.predict_many(pngs * (1 if quick else 4), batch_size=256))
    result["predict_many_png_ips"] = round(count / (time.perf_counter() - start), 1)

    if explore:
        result["variants"] = measure_variants(predictor, one, rng, quick)
    result["rss_after_bench_mb"] = rss_mb()
    return result


def _prepare(data: bytes, spec):
    from medclassify.preprocessing import prepare

    return prepare(data, spec)


def measure_variants(predictor, one, rng, quick: bool) -> dict:
    """The serving graph against what it replaced and against options that were tried."""
    import keras
    import numpy as np
    import tensorflow as tf

    from medclassify.inference import LiteSingleImage, compile_serving_function, serving_model
    from medclassify.models import feature_tensor

    spec = predictor.spec
    n = 300 if quick else 1500
    seconds = 1.0 if quick else 2.0
    batch = rng.integers(0, 256, (256, *spec.input_shape), dtype="uint8")
    out = {}

    def record(name, fn, dtype="uint8", batches=True):
        x1 = one if dtype == "uint8" else one.astype("float32")
        xb = batch if dtype == "uint8" else batch.astype("float32")
        try:
            single = time_calls(lambda: [np.asarray(t) for t in _as_list(fn(x1))], n, warmup=20)
            batch256 = (throughput(lambda: [np.asarray(t) for t in _as_list(fn(xb))], 256, seconds) if batches
                        else None)
            out[name] = {"single": single, "batch256": batch256}
        except Exception as exc:  # a variant that does not work here is a finding, not a crash
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}

    # 1. what the serving path was before: a tf.function over the whole loaded Keras model (augmentation
    #    layers included, if the file has any), float32 input, NumPy cast on every call
    model = predictor.model
    full = keras.Model(model.inputs, [model.output, feature_tensor(model)])
    old = tf.function(lambda x: full(x, training=False),
                      input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.float32)])
    record("previous path: tf.function over the loaded model, float32", lambda x: old(x.astype("float32")))
    # 2. the float TensorFlow serving graph (concrete function, uint8, no augmentation layers): batches
    #    of models without an int8 copy
    record("float: concrete fn, uint8, no augmentation", predictor.compile("uint8"))
    # 2b. float TensorFlow Lite (XNNPACK): single images of models without an int8 copy
    if predictor._serving_inputs == 1:
        record("float, single image: TensorFlow Lite (XNNPACK)",
               LiteSingleImage(predictor._serving_model, spec.input_shape), batches=False)
    # 2c. the int8 copy (int8 backbone, float head): the shipped file where there is one, else converted
    #     here with random calibration images (speed does not depend on the calibration)
    record("int8 backbone + float head (TensorFlow Lite)", predictor._quantized or _int8_copy(predictor, rng))
    # 3. same graph through tf.function dispatch instead of the concrete function
    serving, n_inputs = serving_model(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.uint8)])
    def dispatch(x):
        x = tf.cast(x, tf.float32)
        return serving(x if n_inputs == 1 else [x] * n_inputs, training=False)

    record("serving graph via tf.function dispatch", dispatch)
    # 4. XLA
    record("serving + XLA jit_compile", predictor.compile("uint8", jit_compile=True))
    # 5. probabilities only (no feature output)
    probs_only, n_inputs = serving_model(model, features=False)
    record("serving, probabilities only", compile_serving_function(probs_only, spec.input_shape, "uint8",
                                                                   n_inputs=n_inputs))
    return out


def _int8_copy(predictor, rng):
    from medclassify.inference import serving_model
    from medclassify.quantization import int8_copy

    graph, _ = serving_model(predictor.model, features=False)
    return int8_copy(graph, rng.integers(0, 256, (64, *predictor.spec.input_shape)).astype("float32"))


def _as_list(outputs):
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


# --------------------------------------------------------------------------- child processes


def cold_process(entry: dict) -> dict:
    """A fresh Python: import TensorFlow + load + warm up; peak RSS of that process."""
    code = (
        "import json, os, resource, sys, time\n"
        "t0 = time.perf_counter()\n"
        "import tensorflow\n"
        "t1 = time.perf_counter()\n"
        "from medclassify.inference import Predictor, serving_runtime\n"
        f"p = Predictor({entry['task']!r}, {entry['path']!r}, warm=False, single_image_runtime=serving_runtime())\n"
        "t2 = time.perf_counter()\n"
        "p.warm_up()\n"
        "t3 = time.perf_counter()\n"
        # VmHWM, not getrusage: ru_maxrss survives fork+exec and would report the parent's peak
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "peak = round(int(hwm[0].split()[1]) / 1024, 1) if hwm else None\n"
        "print(json.dumps({'import_tf_s': round(t1 - t0, 3), 'load_s': round(t2 - t1, 3),"
        " 'warmup_s': round(t3 - t2, 3), 'ready_s': round(t3 - t0, 3), 'peak_rss_mb': peak}))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = round(wall, 3)
    return data


RUNTIME_SETTINGS = (
    {"name": "default (intra-op threads = cores, oneDNN on)", "env": {}},
    {"name": "intra-op threads 1", "env": {"MEDCLASSIFY_TF_INTRA_OP_THREADS": "1"}},
    {"name": "single images on TensorFlow (not TFLite)", "env": {"MEDCLASSIFY_SINGLE_IMAGE_RUNTIME": "tensorflow"}},
    {"name": "intra-op threads 1, single images on TensorFlow",
     "env": {"MEDCLASSIFY_TF_INTRA_OP_THREADS": "1", "MEDCLASSIFY_SINGLE_IMAGE_RUNTIME": "tensorflow"}},
    {"name": "TFLite 1 thread", "env": {"MEDCLASSIFY_TFLITE_THREADS": "1"}},
    {"name": "float model, no int8 copy (MEDCLASSIFY_SERVING_PRECISION=float)",
     "env": {"MEDCLASSIFY_SERVING_PRECISION": "float"}},
    {"name": "default threads, oneDNN off", "env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
    {"name": "intra-op threads 1, oneDNN off", "env": {"MEDCLASSIFY_TF_INTRA_OP_THREADS": "1",
                                                       "TF_ENABLE_ONEDNN_OPTS": "0"}},
)


def settings_child(models: list[dict], setting: dict, quick: bool) -> dict:
    """Run this script in a child process with TensorFlow settings (they must precede TensorFlow's start-up)."""
    cmd = [sys.executable, __file__, "--settings-child", "--models-json", json.dumps(models)]
    if quick:
        cmd.append("--quick")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEDCLASSIFY_TF_INTRA_OP_THREADS", "MEDCLASSIFY_SINGLE_IMAGE_RUNTIME", "MEDCLASSIFY_TFLITE_THREADS",
                        "MEDCLASSIFY_SERVING_PRECISION", "TF_ENABLE_ONEDNN_OPTS")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **setting["env"])
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_settings_child(models: list[dict], quick: bool) -> None:
    """Measure with the settings in the environment (``Predictor`` applies them)."""
    import numpy as np

    from medclassify.inference import Predictor, serving_runtime

    out = {}
    for entry in models:
        start = time.perf_counter()
        predictor = Predictor(entry["task"], entry["path"], single_image_runtime=serving_runtime())
        ready = time.perf_counter() - start
        rng = np.random.default_rng(0)
        one = rng.integers(0, 256, (1, *predictor.spec.input_shape), dtype=np.uint8)
        batch = rng.integers(0, 256, (256, *predictor.spec.input_shape), dtype=np.uint8)
        out[entry["name"]] = {
            "load_and_warmup_s": round(ready, 3),
            "single": time_calls(lambda: predictor.predict_arrays(one), 300 if quick else 1500, warmup=20),
            "batch256": throughput(lambda: predictor.predict_arrays(batch), 256, 1.0 if quick else 2.0),
        }
    print(json.dumps(out))


def measure_cli(n_files: int, workdir: Path) -> dict:
    """``python -m medclassify predict --json`` over a folder of 28-px PNGs (blood, shipped model)."""
    from medclassify.registry import get_task

    spec = get_task("blood")
    if not spec.model_path.exists():
        return {"skipped": "no shipped blood model"}
    folder = workdir / "cli_pngs"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    blobs = [sample_png("blood", seed=i) for i in range(8)]
    for i in range(n_files):
        (folder / f"img{i:06d}.png").write_bytes(blobs[i % len(blobs)])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "medclassify", "predict", "--task", "blood", "--json", "--batch-size", "256",
           "--no-progress", str(folder)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = PeakRSS(proc.pid)
    first = None
    lines = 0
    for _ in proc.stdout:
        if first is None:
            first = time.perf_counter() - start
        lines += 1
    err = proc.stderr.read()
    code = proc.wait()
    wall = time.perf_counter() - start
    peak = watcher.stop()
    shutil.rmtree(folder, ignore_errors=True)
    if code != 0 or lines != n_files:
        return {"error": f"exit {code}, {lines} lines for {n_files} files: {err.strip()[-300:]}"}
    streaming = wall - (first or 0)
    return {"files": n_files, "wall_s": round(wall, 2), "first_result_s": round(first or 0, 2),
            "files_per_s_after_first": round((n_files - 1) / streaming, 1) if streaming > 0 else None,
            "files_per_s_overall": round(n_files / wall, 1), "peak_rss_mb": peak, "command": shlex.join(cmd[1:])}


# --------------------------------------------------------------------------- the app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_app(timeout_s: float = 120.0) -> dict:
    """Streamlit cold start to health 200, first page, upload -> prediction (headless Chromium)."""
    app = REPO_ROOT / "app.py"
    if not app.exists():
        return {"skipped": "app.py does not exist yet"}
    try:
        import psutil  # noqa: F401
    except ImportError:
        return {"skipped": "psutil is not installed"}
    port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT))
    streamlit = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
                 "--server.address", "127.0.0.1", "--server.port", str(port),
                 "--browser.gatherUsageStats", "false"]
    result: dict = {"command": "streamlit run app.py --server.headless true --server.address 127.0.0.1 "
                               f"--server.port {port}"}
    logfile = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(streamlit, cwd=REPO_ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    watcher = PeakRSS(proc.pid, interval=0.1)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                logfile.seek(0)
                return {"error": f"streamlit exited with {proc.returncode}: {logfile.read()[-500:]}"}
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > timeout_s:
                return {"error": f"no health 200 within {timeout_s:.0f} s"}
            time.sleep(0.05)
        result["health_200_s"] = round(time.perf_counter() - start, 3)
        result.update(measure_browser(url, start, timeout_s))
        result["server_peak_rss_mb"] = watcher.stop()
    finally:
        watcher.stop()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        logfile.close()
    return result


_UPLOAD_STARTED: dict = {}


def t_upload(page) -> float:
    return _UPLOAD_STARTED[id(page)]


def wait_until_settled(page, timeout_ms: float) -> None:
    """Until the script run is over (Streamlit's running indicator is gone) and the browser is idle.

    Uploading into a page that is still rendering its first run (charts, tables, gallery) measured
    0.6-0.7 s of waiting for the browser before the upload even reached the server; a user uploads
    into a page that has finished loading.
    """
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    page.evaluate("() => new Promise(resolve => requestIdleCallback(() => resolve(), {timeout: 10000}))")


def upload_and_wait(page, image: Path, timeout_ms: float) -> tuple[float, str]:
    """Upload ``image`` and wait until the app shows "**Prediction:** <label>" for it."""
    uploader = page.locator("input[type=file]").first
    start = _UPLOAD_STARTED[id(page)] = time.perf_counter()
    uploader.set_input_files(str(image))
    result = page.locator(".st-key-prediction_single").get_by_text("Prediction:").first
    result.wait_for(timeout=timeout_ms)
    elapsed = round(time.perf_counter() - start, 3)
    return elapsed, " ".join(result.inner_text().split())[:80]


def measure_browser(url: str, process_start: float, timeout_s: float) -> dict:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"browser_skipped": "Playwright is not installed"}
    if not Path(CHROMIUM).exists():
        return {"browser_skipped": f"{CHROMIUM} not found"}
    out: dict = {}
    images = sorted((REPO_ROOT / "tests" / "fixtures" / "images").glob("blood_*.png"))
    if len(images) < 2:
        tmp = Path(tempfile.mkdtemp())
        images = []
        for i in range(2):
            images.append(tmp / f"blood_{i}.png")
            images[-1].write_bytes(sample_png("blood", seed=i))
    timeout_ms = timeout_s * 1000
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            # the first page runs the script: imports, loads the default task's model (blood) and warms it up
            page.locator("input[type=file]").first.wait_for(state="attached", timeout=timeout_ms)
            page.get_by_text("Upload one or more images").first.wait_for(timeout=timeout_ms)
            out["first_page_s"] = round(time.perf_counter() - t0, 3)
            out["process_start_to_uploader_s"] = round(time.perf_counter() - process_start, 3)
            wait_until_settled(page, timeout_ms)
            out["first_page_settled_s"] = round(time.perf_counter() - t0, 3)
            out["first_prediction_s"], out["first_prediction_text"] = upload_and_wait(page, images[0], timeout_ms)
            # the page is done when Streamlit's "running" indicator is gone (charts, Grad-CAM)
            page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                   timeout=timeout_ms)
            out["first_result_complete_s"] = round(time.perf_counter() - t_upload(page), 3)
            # a second user on the warm server: new session, model already loaded
            second = browser.new_page()
            t2 = time.perf_counter()
            second.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            second.get_by_text("Upload one or more images").first.wait_for(timeout=timeout_ms)
            out["second_session_page_s"] = round(time.perf_counter() - t2, 3)
            wait_until_settled(second, timeout_ms)
            out["second_session_settled_s"] = round(time.perf_counter() - t2, 3)
            out["second_session_prediction_s"], _ = upload_and_wait(second, images[1], timeout_ms)
        except Exception as exc:
            out["browser_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        finally:
            browser.close()
    return out


# --------------------------------------------------------------------------- report


def fmt(value, digits=2, suffix=""):
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def mark(ok) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def _ok(value, target, higher=False):
    if value is None:
        return None
    return value >= target if higher else value <= target


def latency_rows(results: dict) -> list[list[str]]:
    rows = []
    for m in results["models"]:
        if "error" in m:
            rows.append([m["name"], m["error"]] + [""] * (len(LATENCY_HEADER) - 2))
            continue
        s, p, e = m["serving"], m["model_predict"], m["end_to_end_png"]
        full = m.get("end_to_end_fullsize_jpeg")
        rows.append([
            _served_name(m), f"{m['params'] / 1e6:.2f} M",
            f"{fmt(s['p50_ms'])} / {fmt(s['p95_ms'])} / {fmt(s['min_ms'])}"
            f"{mark(_ok(s['p50_ms'], TARGETS['single_p50_ms']))}",
            fmt(s["cpu_ms"]),
            f"{fmt(p['p50_ms'], 1)} / {fmt(p['p95_ms'], 1)}",
            f"{fmt(m['speedup_p50'], 0)}×{mark(_ok(m['speedup_p50'], TARGETS['speedup_vs_predict'], True))}",
            f"{fmt(e['p50_ms'])} / {fmt(e['p95_ms'])}",
            f"{fmt(full['p50_ms'])} / {fmt(full['p95_ms'])}" if full else "–",
        ])
    return rows


def _served_name(m: dict) -> str:
    return f"{m['name']} — served {'int8' if m.get('precision') == 'int8' else 'float'}"


LATENCY_HEADER = ["model", "params", "serving, 1 image: p50 / p95 / min (ms)", "CPU ms per call",
                  "model.predict p50 / p95 (ms)", "speed-up (p50)", "28-px PNG bytes → Prediction p50 / p95 (ms)",
                  "363×360 JPEG → Prediction p50 / p95 (ms)"]


def throughput_rows(results: dict) -> list[list[str]]:
    rows = []
    cores = results["machine"]["cores"] or 1
    for m in results["models"]:
        if "error" in m:
            continue
        t = m["throughput"]
        b256 = t["256"]
        cold = m.get("cold") or {}
        rows.append([
            _served_name(m), fmt(t["1"]["ips"], 0), fmt(t["32"]["ips"], 0),
            f"{fmt(b256['ips'], 0)}{mark(_ok(b256['ips'], TARGETS['blood_batch256_ips'], True) if m['task'] == 'blood' else None)}",
            f"{fmt(b256['cpu_ms_per_img'], 3)} (≈ {fmt(cores * 1e3 / b256['cpu_ms_per_img'], 0)})",
            fmt(m.get("predict_many_png_ips"), 0),
            f"{fmt(m['load_s'])} + {fmt(m['warmup_s'])}",
            fmt(cold.get("ready_s")), fmt(cold.get("peak_rss_mb"), 0),
        ])
    return rows


THROUGHPUT_HEADER = ["model", "img/s batch 1", "img/s batch 32", "img/s batch 256",
                     "CPU ms/img at 256 (≈ idle img/s on all cores)", "PNG bytes → Predictions img/s (predict_many)",
                     "load + warm-up (s)", "cold process ready (s)", "cold process peak RSS (MB)"]


def variant_table(results: dict) -> str:
    models = [m for m in results["models"] if m.get("variants")]
    if not models:
        return ""
    names = list(models[0]["variants"])
    header = ["serving variant"] + [f"{m['name']}: 1 img p50 (min) ms · b256 img/s" for m in models]
    rows = []
    for name in names:
        row = [name]
        for m in models:
            v = m["variants"].get(name, {})
            batch = fmt(v["batch256"]["ips"], 0) if v.get("batch256") else "–"
            row.append(v.get("error", "")[:60] if "error" in v else
                       f"{fmt(v['single']['p50_ms'])} ({fmt(v['single']['min_ms'])}) · {batch}")
        rows.append(row)
    return markdown_table(header, rows)


def settings_table(results: dict) -> str:
    settings = results.get("runtime_settings") or {}
    if not settings:
        return ""
    model_names = []
    for data in settings.values():
        for name in data:
            if name != "error" and name not in model_names:
                model_names.append(name)
    header = ["runtime setting"] + [f"{n}: 1 img p50 (min) ms · b256 img/s" for n in model_names]
    rows = []
    for setting, data in settings.items():
        if "error" in data:
            rows.append([setting, data["error"][:80]] + [""] * (len(model_names) - 1))
            continue
        rows.append([setting] + [f"{fmt(data[n]['single']['p50_ms'])} ({fmt(data[n]['single']['min_ms'])}) · "
                                 f"{fmt(data[n]['batch256']['ips'], 0)}" if n in data else "–" for n in model_names])
    return markdown_table(header, rows)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def app_lines(app: dict) -> list[str]:
    if not app:
        return []
    if "skipped" in app:
        return [f"- App: skipped ({app['skipped']})."]
    if "error" in app:
        return [f"- App: {app['error']}"]
    out = [f"- App cold start (`streamlit run app.py`) to `/_stcore/health` 200: **{fmt(app['health_200_s'])} s**"
           f"{mark(app['health_200_s'] <= TARGETS['app_health_s'])} (target ≤ {TARGETS['app_health_s']:g} s)"]
    if "browser_skipped" in app:
        out.append(f"- Browser measurements skipped ({app['browser_skipped']}).")
    if "first_page_s" in app:
        out.append(f"- First page in Chromium (script run: imports, model load and warm-up): {fmt(app['first_page_s'])} s "
                   f"({fmt(app['process_start_to_uploader_s'])} s after the process started); finished rendering "
                   f"(script run over, browser idle) at {fmt(app.get('first_page_settled_s'))} s")
    if "first_prediction_s" in app:
        ok = app["first_prediction_s"] <= TARGETS["first_prediction_s"]
        out.append(f"- Upload (into the finished page) → \"Prediction:\" shown: first image "
                   f"**{fmt(app['first_prediction_s'])} s**{mark(ok)} "
                   f"(target ≤ {TARGETS['first_prediction_s']:g} s); whole result (charts, Grad-CAM) "
                   f"{fmt(app.get('first_result_complete_s'))} s; a second session on the warm server: page "
                   f"{fmt(app.get('second_session_page_s'))} s (finished {fmt(app.get('second_session_settled_s'))} s), "
                   f"upload → prediction {fmt(app.get('second_session_prediction_s'))} s")
    if "browser_error" in app:
        out.append(f"- Browser: {app['browser_error']}")
    if "server_peak_rss_mb" in app:
        out.append(f"- App server peak RSS: {fmt(app['server_peak_rss_mb'], 0)} MB")
    return out


def render_markdown(results: dict) -> str:
    m = results["machine"]
    load0, load1 = results["load_before"], results["load_after"]
    contended = results["contended"]
    lines = [
        "<!-- generated by benchmarks/benchmark.py; do not edit by hand -->",
        "### Serving performance",
        "",
        f"Measured {results['date']} with `{results['command']}` on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB RAM, Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']} "
        f"(CPU only{'; niceness ' + str(m['niceness']) if m['niceness'] else ''}).",
        "",
    ]
    if contended:
        lines += [f"> **Contended machine:** load average {load0['loadavg'][0]} → {load1['loadavg'][0]}, other processes "
                  f"used {load0['other_cpu_percent']:.0f}% / {load1['other_cpu_percent']:.0f}% of one core before/after. "
                  "Numbers are slower and noisier than on an idle machine; *min* approximates the idle latency.", ""]
    lines += ["Single image:", "", markdown_table(LATENCY_HEADER, latency_rows(results)), "",
              "Batches, loading and memory:", "", markdown_table(THROUGHPUT_HEADER, throughput_rows(results)), ""]
    lines += [
        "*Serving* = `Predictor.predict_arrays` on one 28-px image. *Served int8*: the shipped model's int8 "
        "copy (`python -m medclassify quantize`; int8 convolutional backbone, float head, TensorFlow Lite with "
        "XNNPACK kernels) answers single images and batches; its test numbers are in the model name. "
        "*Served float*: one float TensorFlow Lite call per image, batches through one compiled TensorFlow "
        "graph. "
        "*model.predict* = Keras `model.predict` on the same image in the same run; *→ Prediction* = "
        "`Predictor.predict(bytes)` (decode, MedMNIST crop/resize, model, out-of-distribution check). "
        "Throughput is the serving path on uint8 batches; *CPU ms/img* is the process CPU time (all threads), which "
        "other processes hardly change, and the estimate in brackets is cores × 1000 / CPU ms. *Cold process* = "
        "a fresh Python importing TensorFlow, loading and warming up the model. Candidate models are "
        "`build_cnn(widths=...)` with random weights (speed does not depend on the weights); where a training "
        "variant of the same architecture exists in `results/`, its test accuracy is given beside the name, so "
        "the speed/accuracy trade can be read off the tables.",
        "",
    ]
    variants = variant_table(results)
    if variants:
        lines += ["Serving-path variants (same process):", "", variants, ""]
    settings = settings_table(results)
    if settings:
        lines += ["TensorFlow runtime settings (one child process each):", "", settings, ""]
    cli = results.get("cli") or {}
    if "files" in cli:
        lines.append(f"- CLI `python -m medclassify predict --task blood --json` over {cli['files']:,} PNG files: "
                     f"{fmt(cli['wall_s'])} s wall including start-up ({fmt(cli['first_result_s'])} s to the first "
                     f"result), {fmt(cli['files_per_s_after_first'], 0)} files/s streaming, peak RSS "
                     f"{fmt(cli['peak_rss_mb'], 0)} MB")
    elif cli:
        lines.append(f"- CLI: {cli.get('skipped') or cli.get('error')}")
    lines += app_lines(results.get("app") or {})
    lines.append(f"- Peak RSS of the benchmark process (all models above loaded): {fmt(results['peak_rss_mb'], 0)} MB")
    lines.append("")
    lines.append(f"Targets: serving p50 ≤ {TARGETS['single_p50_ms']:g} ms and ≥ {TARGETS['speedup_vs_predict']:g}× "
                 f"model.predict; blood ≥ {TARGETS['blood_batch256_ips']:,.0f} img/s at batch 256; app health ≤ "
                 f"{TARGETS['app_health_s']:g} s; first prediction ≤ {TARGETS['first_prediction_s']:g} s.")
    lines += ["", "Reproduce with `make benchmark` (`python benchmarks/benchmark.py --readme`, which also pastes these "
              "tables here); add `--quick` for a short run.", ""]
    return "\n".join(lines)


def print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print()


def print_summary(results: dict) -> None:
    print_table(LATENCY_HEADER, latency_rows(results))
    print_table(THROUGHPUT_HEADER, throughput_rows(results))
    for table in (variant_table(results), settings_table(results)):
        if table:
            print(table, end="\n\n")
    body = render_markdown(results).split("\n")
    print("\n".join(line for line in body if line.startswith("- ") or line.startswith("> ")))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; no variant or thread study")
    parser.add_argument("--no-app", action="store_true", help="skip the Streamlit/browser measurements")
    parser.add_argument("--no-candidates", action="store_true", help="only the shipped models")
    parser.add_argument("--candidate-widths", nargs="+", metavar="W1,W2,W3",
                        help="blood CNN widths to build and measure (default 16,32,64, 32,64,128 and 64,128,256)")
    parser.add_argument("--explore", action="store_true", help="variant and thread study even with --quick")
    parser.add_argument("--cli-files", type=int, help="files for the CLI run (default 1000 quick, 5000 full; 0 skips)")
    parser.add_argument("--model", action="append", default=[], metavar="TASK=PATH",
                        help="also measure this model file (repeatable)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "latest.json"))
    parser.add_argument("--markdown", default=str(RESULTS_MD))
    parser.add_argument("--readme", action="store_true",
                        help="also replace the README's benchmark section with the new tables")
    parser.add_argument("--settings-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.settings_child:
        run_settings_child(json.loads(args.models_json), args.quick)
        return 0

    command = "python benchmarks/benchmark.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    explore = args.explore or not args.quick
    log("benchmark: measuring the machine load…")
    load_before = load_snapshot()
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="medclassify-bench-"))
    models = shipped_models()
    for spec_arg in args.model:
        task, _, path = spec_arg.partition("=")
        models.append({"name": f"{task} {Path(path).name}", "task": task, "path": path, "kind": "extra"})
    if not args.no_candidates:
        widths = CANDIDATE_WIDTHS
        if args.candidate_widths:
            widths = [tuple(int(w) for w in item.split(",")) for item in args.candidate_widths]
        models += build_candidates(workdir, widths)

    results: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "machine": machine,
        "load_before": load_before,
        "targets": TARGETS,
        "models": [],
    }
    for entry in models:
        log(f"benchmark: {entry['name']} …")
        try:
            measured = measure_model(entry, args.quick, explore)
        except Exception as exc:
            measured = dict(entry, error=f"{type(exc).__name__}: {exc}")
        results["models"].append(measured)
    results["peak_rss_mb"] = peak_rss_mb()

    for measured in results["models"]:
        if "error" in measured or (args.quick and measured["kind"] == "candidate"):
            continue
        log(f"benchmark: cold process for {measured['name']} …")
        measured["cold"] = cold_process(measured)

    if explore:
        results["runtime_settings"] = {}
        light = [{k: m[k] for k in ("name", "task", "path")} for m in results["models"] if "error" not in m]
        for setting in RUNTIME_SETTINGS:
            log(f"benchmark: {setting['name']} (child process) …")
            results["runtime_settings"][setting["name"]] = settings_child(light, setting, args.quick)

    n_cli = args.cli_files if args.cli_files is not None else (1000 if args.quick else 5000)
    if n_cli:
        log(f"benchmark: CLI over {n_cli} files …")
        results["cli"] = measure_cli(n_cli, workdir)
    if not args.no_app:
        log("benchmark: app cold start and browser …")
        results["app"] = measure_app()
    else:
        results["app"] = {"skipped": "--no-app"}

    results["load_after"] = load_snapshot()
    cores = machine["cores"] or 1
    results["contended"] = bool(
        max(load_before["loadavg"][0], results["load_after"]["loadavg"][0]) > 0.5 * cores
        or max(load_before["other_cpu_percent"], results["load_after"]["other_cpu_percent"]) > 30)
    shutil.rmtree(workdir, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    Path(args.markdown).write_text(markdown)
    print_summary(results)
    log(f"benchmark: wrote {out} and {args.markdown}")
    if args.readme:
        from medclassify.experiments import replace_between_markers

        replace_between_markers(REPO_ROOT / "README.md", "benchmarks", markdown)
        log("benchmark: README.md's benchmark section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
