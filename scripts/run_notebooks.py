"""Execute the training notebooks (bloodmnist/bloodmnist.ipynb, breastmnist/breastmnist.ipynb).

    python scripts/run_notebooks.py                 # full mode: outputs written into the committed notebooks
    python scripts/run_notebooks.py --smoke         # smoke mode: tiny subset, one epoch, executed copy in a temp folder
    python scripts/run_notebooks.py --smoke breast  # one notebook

Full mode reads each variant's card from ``results/`` (``MEDCLASSIFY_RETRAIN=1``
retrains instead: hours on a CPU) and evaluates the shipped models; it is what
``make notebooks`` runs before the notebooks are committed.  Smoke mode sets
``MEDCLASSIFY_NOTEBOOK_SMOKE=1`` and never touches the committed notebooks.

The kernel is always this interpreter (``sys.executable``): a temporary
``python3`` kernelspec pointing at it is put first on ``JUPYTER_PATH``, so a
user-level kernelspec of another Python cannot be picked up by mistake.  Each
notebook runs with its own folder as the working directory, as in Jupyter.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"blood": REPO_ROOT / "bloodmnist" / "bloodmnist.ipynb",
             "breast": REPO_ROOT / "breastmnist" / "breastmnist.ipynb"}
SMOKE_ENV = "MEDCLASSIFY_NOTEBOOK_SMOKE"
CHECK_ROOT = "shipped-model check"


@contextlib.contextmanager
def this_python_kernel():
    """Make the ``python3`` kernel resolve to this interpreter for the duration."""
    with tempfile.TemporaryDirectory(prefix="medclassify_kernels_") as tmp:
        folder = Path(tmp) / "kernels" / "python3"
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(json.dumps({
            # capture_fd_output=False: TensorFlow's C++ start-up lines go to this terminal, not into the outputs
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.capture_fd_output=False"],
            "display_name": "Python 3 (ipykernel)", "language": "python",
        }))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp] + ([old] if old else []))
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


@contextlib.contextmanager
def environment(smoke: bool):
    """The variables the notebooks read, restored afterwards."""
    saved = {k: os.environ.get(k) for k in (SMOKE_ENV, "MEDMNIST_ROOT", "VGG16_WEIGHTS", "TF_CPP_MIN_LOG_LEVEL")}
    if smoke:
        os.environ[SMOKE_ENV] = "1"
    else:
        os.environ.pop(SMOKE_ENV, None)  # a stray variable must never put smoke outputs into the committed notebooks
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The layout CI uses (data and weights next to the repository), when nothing else is set.
    shared = REPO_ROOT.parent / "shared"
    if not os.environ.get("MEDMNIST_ROOT") and (shared / "data" / "medmnist").is_dir():
        os.environ["MEDMNIST_ROOT"] = str(shared / "data" / "medmnist")
    if not os.environ.get("VGG16_WEIGHTS") and (shared / "weights" / "vgg16_imagenet_notop.h5").is_file():
        os.environ["VGG16_WEIGHTS"] = str(shared / "weights" / "vgg16_imagenet_notop.h5")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(notebook: Path, out: Path | None = None, smoke: bool = False, timeout: int | None = None):
    """Run ``notebook`` top to bottom and write the executed copy to ``out`` (default: in place).

    Returns ``(executed notebook, seconds)``.  Raises ``nbclient.exceptions.CellExecutionError``
    on the first failing cell.  In smoke mode ``out`` must differ from ``notebook``.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(notebook).resolve()
    out = Path(out).resolve() if out is not None else notebook
    if smoke and out == notebook:
        raise ValueError("smoke mode never overwrites the committed notebook: give another output path")
    nb = nbformat.read(str(notebook), as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(notebook.parent)}})
    start = time.time()
    with environment(smoke), this_python_kernel():
        try:
            client.execute()
        finally:
            seconds = time.time() - start
            out.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out))
    return nb, seconds


def check_record(nb) -> dict | None:
    """The JSON record the notebook's shipped-model check displays, or None when it has not run."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "application/json" in data and output.get("metadata", {}).get("application/json", {}).get(
                    "root") == CHECK_ROOT:
                return data["application/json"]
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"default: all of {sorted(NOTEBOOKS)}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"set {SMOKE_ENV}=1 and write the executed copies to --out (a temp folder by default)")
    parser.add_argument("--out", type=Path, help="folder for the executed copies (smoke mode)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or list(NOTEBOOKS)
    if set(args.tasks) - set(NOTEBOOKS):
        parser.error(f"unknown task(s) {sorted(set(args.tasks) - set(NOTEBOOKS))}; choose from {sorted(NOTEBOOKS)}")
    if args.out and not args.smoke:
        parser.error("--out is for --smoke; full mode writes the committed notebooks in place")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="medclassify_notebooks_")) if args.smoke else None)
    from nbclient.exceptions import CellExecutionError

    failed = 0
    for task in args.tasks:
        notebook = NOTEBOOKS[task]
        target = out_dir / notebook.name if args.smoke else notebook
        try:
            nb, seconds = execute(notebook, target, smoke=args.smoke, timeout=args.timeout)
        except CellExecutionError as exc:
            failed += 1
            print(f"{notebook.relative_to(REPO_ROOT)}: FAILED (executed copy with the error: {target})\n{exc}",
                  file=sys.stderr)
            continue
        record = check_record(nb) or {}
        verdict = {True: "matches the model card", False: "DIFFERS from the model card",
                   None: "card has no test metrics"}[record.get("matches")]
        print(f"{notebook.relative_to(REPO_ROOT)}: ok in {seconds:.0f} s ({'smoke' if args.smoke else 'full'} mode; "
              f"shipped model {verdict}) -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
