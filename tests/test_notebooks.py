"""The training notebooks: generated from scripts/make_notebooks.py, committed with outputs that
match the shipped models' cards, and executable top to bottom (smoke mode in CI).

* ``test_notebooks_are_generated``: the committed cells are exactly what the generator writes.
* ``test_committed_outputs_match_shipped_cards``: the committed outputs were produced from the
  shipped model files and cards as they are now (skipped while a notebook has no outputs; an error in
  CI, where the committed notebooks must carry them).
* ``test_notebook_runs_in_smoke_mode`` (realdata): executes each notebook with
  ``MEDCLASSIFY_NOTEBOOK_SMOKE=1`` into a temp folder; no cell may fail and each must finish within
  ``MEDCLASSIFY_NOTEBOOK_BUDGET_S`` seconds (default 180).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
TASKS = ("blood", "breast")
BUDGET_S = float(os.environ.get("MEDCLASSIFY_NOTEBOOK_BUDGET_S", "180"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_medclassify_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_notebooks():
    return _load("make_notebooks")


@pytest.fixture(scope="module")
def run_notebooks():
    return _load("run_notebooks")


def _cells(nb) -> list:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def _shipped_state(task: str, check_keys: list) -> tuple[str, dict | None]:
    from medclassify.cards import read_card
    from medclassify.registry import get_task

    path = get_task(task).model_path
    card_test = read_card(path).get("test")
    return (hashlib.sha256(path.read_bytes()).hexdigest(),
            {key: card_test.get(key) for key in check_keys} if card_test else None)


def skip_or_fail_without_outputs(notebook: Path) -> None:
    """A committed notebook without outputs: skipped on a machine where one is being rewritten, a failure
    in CI (``CI=true``), where a skip would let a notebook committed without its results pass unnoticed."""
    from conftest import in_ci

    message = f"{notebook.name} has no outputs yet: run `make notebooks`"
    if in_ci():
        pytest.fail(f"{message} (CI=true: the committed notebooks must carry their outputs)", pytrace=False)
    pytest.skip(message)


@pytest.mark.parametrize("task", TASKS)
def test_notebooks_are_generated(make_notebooks, task):
    assert not make_notebooks.missing_narrative(), "a variant has no narrative cell in scripts/make_notebooks.py"
    committed = nbformat.read(str(make_notebooks.NOTEBOOKS[task]), as_version=4)
    nbformat.validate(committed)
    assert _cells(committed) == _cells(make_notebooks.build(task)), (
        f"{make_notebooks.NOTEBOOKS[task].name} differs from scripts/make_notebooks.py: run "
        "`python scripts/make_notebooks.py` and then `make notebooks`")


@pytest.mark.parametrize("task", TASKS)
def test_committed_outputs_match_shipped_cards(run_notebooks, task):
    committed = nbformat.read(str(run_notebooks.NOTEBOOKS[task]), as_version=4)
    if not any(cell.get("outputs") for cell in committed.cells if cell.cell_type == "code"):
        skip_or_fail_without_outputs(run_notebooks.NOTEBOOKS[task])
    record = run_notebooks.check_record(committed)
    assert record is not None, "the shipped-model check cell has no output: re-run `make notebooks`"
    assert record["smoke"] is False, "committed outputs come from smoke mode: re-run `make notebooks`"
    sha, card_test = _shipped_state(task, list(record["live_test"]))
    assert record["model_sha256"] == sha, "the notebook was executed on another model file: re-run `make notebooks`"
    assert record["card_test"] == card_test, "the card's test metrics changed since the notebook ran"
    if card_test is not None:
        assert record["matches"] is True


@pytest.mark.parametrize("task", TASKS)
def test_committed_comparison_table_is_the_current_one(run_notebooks, task):
    """The variants table in the committed outputs is what `experiments.comparison_table` gives now (the
    README's and results/comparison.md's table): a change to the cards or the table's format means
    re-running `make notebooks`."""
    from medclassify import experiments

    committed = nbformat.read(str(run_notebooks.NOTEBOOKS[task]), as_version=4)
    markdown = [output.get("data", {}).get("text/markdown", "") for cell in committed.cells
                if cell.cell_type == "code" for output in cell.get("outputs", [])]
    if not any(cell.get("outputs") for cell in committed.cells if cell.cell_type == "code"):
        skip_or_fail_without_outputs(run_notebooks.NOTEBOOKS[task])
    shown = [text for text in markdown if "Variant cards in" in text]
    assert shown, "the notebook's outputs have no comparison table: re-run `make notebooks`"
    assert len(shown) == 1 and shown[0].endswith(experiments.comparison_table(task)), \
        "the notebook shows another comparison table than the cards give now: re-run `make notebooks`"


@pytest.mark.parametrize("task", TASKS)
def test_smoke_mode_never_overwrites_the_committed_notebook(run_notebooks, task):
    notebook = run_notebooks.NOTEBOOKS[task]
    with pytest.raises(ValueError, match="never overwrites"):
        run_notebooks.execute(notebook, notebook, smoke=True)


@pytest.mark.realdata(needs=("data", "weights"))
@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_notebook_runs_in_smoke_mode(run_notebooks, tmp_path, task):
    from medclassify.registry import get_task

    notebook = run_notebooks.NOTEBOOKS[task]
    model = get_task(task).model_path
    protected = [notebook, model, model.with_suffix(".card.json"), model.with_suffix(".ood.npz"),
                 model.with_suffix(".int8.tflite"), model.with_suffix(".head.tflite")]
    before = {path: path.read_bytes() for path in protected if path.exists()}

    out = tmp_path / notebook.name
    nb, seconds = run_notebooks.execute(notebook, out, smoke=True, timeout=600)  # raises on a failing cell
    print(f"{notebook.name}: smoke mode in {seconds:.1f} s")

    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    record = run_notebooks.check_record(nb)
    assert record is not None and record["smoke"] is True
    _, card_test = _shipped_state(task, list(record["live_test"]))
    assert record["card_test"] == card_test
    assert record["matches"] is (True if card_test is not None else None)
    assert {path: path.read_bytes() for path in before} == before, "smoke mode changed a repository file"
    assert seconds < BUDGET_S, f"{notebook.name} took {seconds:.0f} s in smoke mode (budget {BUDGET_S:.0f} s)"
