"""Command line of the blood cell and breast ultrasound classifiers: python -m medclassify COMMAND ...

Exit status: 0 success, 1 when any input failed, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from .experiments import VARIANTS
from .inference import DEFAULT_BATCH_SIZE
from .models import AUGMENTATION_POLICIES, MODEL_KINDS
from .preprocessing import IMAGE_ENDINGS
from .registry import TASKS, get_task
from .robustness import DEFAULT_SIDES

#: What a folder walk picks up (a file named on the command line is read whatever its name).
IMAGE_SUFFIXES = {f".{ending}" for ending in IMAGE_ENDINGS}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one worth showing), and the description as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse exits 2 on usage errors; keep that, with a short message
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    # `medclassify` when run as the command `pip install -e .` installs, else the module form.
    prog = "medclassify" if Path(sys.argv[0]).name == "medclassify" else "python -m medclassify"
    parser = _Parser(prog=prog, description=__doc__.rstrip())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def task_arg(p):
        p.add_argument("--task", required=True, choices=sorted(TASKS), help="which classifier")

    def data_arg(p):
        p.add_argument("--data-dir", help="folder with the MedMNIST npz files (default $MEDMNIST_ROOT or ~/.medmnist)")

    t = sub.add_parser("train", help="train a model on the official training split")
    task_arg(t)
    data_arg(t)
    t.add_argument("--model", choices=MODEL_KINDS, default="cnn", help="architecture")
    t.add_argument("--epochs", type=int, default=30, help="the best epoch on validation is kept")
    t.add_argument("--batch-size", type=int, default=128, help="training images per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    t.add_argument("--label-smoothing", type=float, default=0.05, help="0 = off")
    t.add_argument("--mixup", type=float, default=0.0, help="mixup with weights from Beta(a, a); 0 = off")
    t.add_argument("--ema", type=float, default=0.0,
                   help="keep the moving average of the weights with this momentum (e.g. 0.99); 0 = off")
    t.add_argument("--widths", default="32,64,128", help="CNN channels per stage, comma-separated")
    t.add_argument("--dropout", type=float, default=0.3, help="dropout before the classifier")
    t.add_argument("--no-augment", action="store_true", help="train without augmentation layers")
    t.add_argument("--augmentation", choices=AUGMENTATION_POLICIES, default="default", help="augmentation policy")
    t.add_argument("--class-weight", action="store_true", help="balanced class weights")
    t.add_argument("--smote", action="store_true", help="SMOTE-oversample the training split")
    t.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, augmentation)")
    t.add_argument("--ensemble", type=int, default=1, help="train N seeds and save their logit average as one model")
    t.add_argument("--limit", type=int,
                   help="smoke runs: a stratified subset of about N training images; validation is subsampled "
                        "too (about N/4), so the validation numbers are noisy and not comparable with full runs")
    t.add_argument("--vgg16-weights", help="VGG16 notop h5 (default $VGG16_WEIGHTS, else download 'imagenet')")
    t.add_argument("--vgg16-input-size", type=int, default=32, help="VGG16: images are upsampled to this size")
    t.add_argument("--finetune-epochs", type=int, default=0, help="VGG16: epochs with the base unfrozen")
    t.add_argument("--finetune-lr", type=float, default=1e-4, help="VGG16: learning rate of the unfrozen phase")
    t.add_argument("--target-sensitivity", type=float, default=0.95,
                   help="breast: validation sensitivity for malignant the threshold must keep")
    t.add_argument("--out", required=True,
                   help="output .h5 (a missing folder is made); its card and OOD statistics go beside it (never a "
                        "shipped model: those are replaced only by `ship`)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (its card, OOD statistics and int8 copy go with it)")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    e = sub.add_parser("evaluate", help="metrics of a saved model on an official split")
    task_arg(e)
    data_arg(e)
    e.add_argument("--model", help="model file (default: the shipped model)")
    e.add_argument("--split", choices=("val", "test"), default="test",
                   help="official split to evaluate on: compare candidate models on val; test reports a final "
                        "model, once")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--bootstrap", type=_resamples, default=0, help="bootstrap resamples for 95%% CIs (e.g. 1000)")
    e.add_argument("--write-card", action="store_true", help="store the metrics in the model card")

    p = sub.add_parser("predict", help="classify image files, folders or globs")
    task_arg(p)
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per model call (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")

    x = sub.add_parser("export", help="export a model for TensorFlow Serving")
    task_arg(x)
    x.add_argument("--model", help="model file (default: the shipped model)")
    x.add_argument("--format", choices=("savedmodel",), default="savedmodel", help="export format")
    x.add_argument("--out", required=True,
                   help="model base folder; written to OUT/<next version>/ (an OUT ending in a number is the version)")

    o = sub.add_parser("fit-ood", help="fit the out-of-distribution rule (train statistics, validation threshold)")
    task_arg(o)
    data_arg(o)
    o.add_argument("--model", help="model file (default: the shipped model)")

    v = sub.add_parser("experiment", help="train + evaluate one named variant, writing results/<task>/<variant>.card.json")
    task_arg(v)
    data_arg(v)
    v.add_argument("--variant", required=True, help="a name from medclassify/experiments.py: "
                   + "; ".join(f"{task}: {', '.join(VARIANTS[task])}" for task in sorted(VARIANTS)))
    v.add_argument("--seed", type=int, default=0, help="seed of this run (member k of an ensemble uses 1000*seed+k)")
    v.add_argument("--epochs", type=int, help="override the variant's epochs (a trial run: written under "
                                              "runs/trial/ and results/trial/, which `report` ignores)")
    v.add_argument("--limit", type=int, help="small subset (a trial run, as with --epochs)")
    v.add_argument("--bootstrap", type=_resamples, default=1000, help="bootstrap resamples for the 95%% CIs")

    sub.add_parser("report", help="regenerate results/comparison.md and the README's Results section from the "
                                  "variant cards")

    c = sub.add_parser("ood-check", help="flag rates of the OOD rule on test, cross-task images and photos")
    task_arg(c)
    data_arg(c)
    c.add_argument("--model", help="model file (default: the shipped model)")
    c.add_argument("--write-card", action="store_true", help="store the rates in the model card")

    r = sub.add_parser("stability", help="how many answers change when a split's images are enlarged, saved "
                                         "as PNG/JPEG and reduced again by the app")
    task_arg(r)
    data_arg(r)
    r.add_argument("--model", help="model file (default: the shipped model)")
    r.add_argument("--split", choices=("val", "test"), default="val",
                   help="official split: compare candidate models on val; test reports a final model")
    r.add_argument("--sides", type=int, nargs="+", default=list(DEFAULT_SIDES),
                   help="square sides in pixels the split's images are enlarged to (PNG each; JPEG at the largest)")
    r.add_argument("--write-card", action="store_true", help="store the result in the model card (per split)")

    q = sub.add_parser("quantize", help="write the int8 serving copy of a model (<model>.int8.tflite), compare it "
                                        "with the float model on val and test, refit the OOD statistics")
    task_arg(q)
    data_arg(q)
    q.add_argument("--model", help="model file (default: the shipped model)")

    s = sub.add_parser("ship", help="copy a trained variant to the shipped model files (model_<task>.h5 + card + OOD), "
                                    "then quantize it")
    task_arg(s)
    data_arg(s)
    s.add_argument("--variant", help="default: the variant medclassify/experiments.py marks as shipped")
    s.add_argument("--seed", type=int, default=0, help="which seed run of the variant")
    return parser


def _resamples(text: str) -> int:
    """--bootstrap: 0 (no intervals) or more; argparse reports anything else as a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler = {"train": _train, "evaluate": _evaluate, "predict": _predict, "export": _export,
               "fit-ood": _fit_ood, "experiment": _experiment, "report": _report,
               "ship": _ship, "ood-check": _ood_check, "quantize": _quantize,
               "stability": _stability}[args.command]
    problem = _missing_model_file(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


# Commands whose --model names a model file (train's --model is the architecture).
_MODEL_FILE_COMMANDS = ("evaluate", "predict", "export", "fit-ood", "ood-check", "quantize")


def _missing_model_file(args) -> str:
    """'model file X not found' when the command's model file (--model, else the shipped one) is missing, else ''.

    One message and one exit status (1: an input failed, like a missing data file) for every command, checked
    before TensorFlow is imported.
    """
    if args.command not in _MODEL_FILE_COMMANDS:
        return ""
    from .registry import get_task

    model = args.model or get_task(args.task).model_path
    return "" if Path(model).is_file() else f"model file {model} not found"


def _command_line(args) -> str:
    return "python -m medclassify " + " ".join(shlex.quote(a) for a in args.argv)


# TrainConfig fields whose command-line option is not simply "--" + the field name
_TRAIN_OPTION = {"learning_rate": "--lr", "finetune_learning_rate": "--finetune-lr"}


class _UsageError(ValueError):
    """A setting the parser accepted but the recipe cannot use; the message names the option."""


def train_config(args):
    """The ``TrainConfig`` a parsed ``train`` command line asks for; raises ``_UsageError``."""
    from .training import InvalidConfig, TrainConfig

    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise _UsageError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    try:
        return TrainConfig(
            task=args.task, model=args.model, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
            weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, mixup=args.mixup, ema=args.ema,
            augment=not args.no_augment, augmentation=args.augmentation,
            class_weight=args.class_weight, smote=args.smote, widths=widths, dropout=args.dropout, seed=args.seed,
            limit=args.limit, data_dir=args.data_dir, vgg16_weights=args.vgg16_weights,
            vgg16_input_size=args.vgg16_input_size, finetune_epochs=args.finetune_epochs,
            finetune_learning_rate=args.finetune_lr, target_sensitivity=args.target_sensitivity, ensemble=args.ensemble,
            verbose=0 if args.quiet else (1 if sys.stderr.isatty() else 2),
        )
    except InvalidConfig as exc:
        raise _UsageError(_option_message(exc)) from None


def _option_message(exc) -> str:
    """An ``InvalidConfig`` in the words of the command line: the option, not the field."""
    option = _TRAIN_OPTION.get(exc.field, "--" + exc.field.replace("_", "-"))
    return f"{option} must be {exc.rule}, got {exc.value!r}"


def _train(args) -> int:
    from .data import DataError
    from .training import save_trained, train

    try:
        cfg = train_config(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out
    problem = _unwritable_model_path(out, overwrite=args.overwrite)
    if problem:  # found now, not after the whole training run
        print(f"error: --out {out}: {problem}", file=sys.stderr)
        return 2
    # stdout carries only the JSON summary: Keras's progress (its bar, or per-epoch loss and accuracy lines,
    # which show a diverging run in a log file) goes to stderr with the selector's validation scores.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            result = train(cfg)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    from .cards import card_path
    from .ood import fit_ood, ood_path

    with contextlib.redirect_stdout(sys.stderr):
        save_trained(result, out, command=_command_line(args))
        fit_ood(args.task, out, args.data_dir)
    chance = 1.0 / get_task(args.task).num_classes
    if result.val_metrics["balanced_accuracy"] < chance + 0.05:  # the usual look of a --limit/--epochs smoke run
        print(f"warning: validation balanced accuracy {result.val_metrics['balanced_accuracy']:.3f} is at chance "
              f"level ({chance:.3f}): this model has not learned the task; train longer or on more images",
              file=sys.stderr)
    summary = {k: result.val_metrics[k] for k in ("accuracy", "balanced_accuracy", "auc")}
    summary.update(n=result.val_metrics.get("n"), model=out, card=str(card_path(out)), ood=str(ood_path(out)),
                   best_epoch=result.best_epoch, temperature=round(result.temperature, 4),
                   threshold=result.threshold, wall_time_s=round(result.wall_time_s, 1))
    print(json.dumps({"validation": summary}))
    return 0


def _unwritable_model_path(out: str, overwrite: bool = False) -> str:
    """Why ``out`` cannot take a saved model, or ''.  Creates nothing: a run that fails leaves no folder."""
    from .training import model_files

    path = Path(out)
    if path.suffix not in (".h5", ".keras"):
        return "the model file must end in .h5 (or .keras)"
    try:
        # The card, OOD statistics and int8 copy are named after the model without its ending, so
        # model_blood.keras would replace the shipped model's; `ship` checks what replaces them.
        stem = path.resolve().with_suffix("")
        shipped = next((spec for spec in TASKS.values() if spec.model_path.resolve().with_suffix("") == stem), None)
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop (RuntimeError before Python 3.13)
        return f"cannot be resolved ({exc})"
    if shipped is not None:
        return (f"{path.name} would replace the shipped {shipped.name} model's files; train to another file (the "
                f"app serves it with MEDCLASSIFY_{shipped.name.upper()}_MODEL=<file>)")
    folder = path.parent if str(path.parent) else Path(".")
    # `--out runs/x.h5` on a fresh clone: runs/ is ignored by git and absent. The save makes it, so only the
    # nearest folder that exists has to be one, and writable.
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"folder {folder} cannot be created: {existing} is a file"
        taken = [file for file in model_files(path) if file.exists()]
        if taken and not overwrite:  # the card of results/<task>/<variant> counts: it is a committed result
            return f"{taken[0]} exists; add --overwrite to replace it and the files named after it"
    except OSError as exc:  # a folder on the way that cannot be looked into (permissions)
        return f"folder {folder} cannot be created ({exc.strerror or exc})"
    if not os.access(existing, os.W_OK):
        return f"folder {existing} is not writable"
    return ""


def _evaluate(args) -> int:
    from .cards import add_evaluation
    from .data import DataError
    from .evaluation import evaluate

    try:
        metrics = evaluate(args.task, args.model, args.split, args.data_dir, bootstrap=args.bootstrap)
    except (DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_metrics(metrics)
    if args.write_card:
        try:
            add_evaluation(metrics["model"], metrics, _command_line(args))
        except OSError as exc:  # no card beside the model, or one that cannot be written: the metrics are out
            print(f"error: card not updated: {exc}", file=sys.stderr)
            return 1
    return 0


def _print_metrics(m: dict) -> None:
    ci = m.get("ci95", {})

    def line(key, label=None):
        value = m[key]
        extra = f"  (95% CI {ci[key][0]:.4f}-{ci[key][1]:.4f})" if key in ci else ""
        print(f"{label or key:<22}{value:.4f}{extra}")

    print(f"{m['task']} model {m['model']} on the {m['split']} split (n={m['n']})")
    for key in ("accuracy", "balanced_accuracy", "auc", "precision_macro", "recall_macro", "f1_macro",
                "precision_weighted", "recall_weighted", "f1_weighted", "ece"):
        line(key)
    if "threshold" in m:
        print(f"{'threshold':<22}{m['threshold']:.4f}")
        for key in ("sensitivity", "specificity", "accuracy_at_0_5"):
            line(key)
    print("per class:")
    for name, row in m["per_class"].items():
        print(f"  {name:<24} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  n={row['support']}")
    print("confusion matrix (rows = true, columns = predicted):")
    for row in m["confusion_matrix"]:
        print("  " + " ".join(f"{v:5d}" for v in row))


# --------------------------------------------------------------------------- predict: inputs and output

def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk_images(folder: str | os.PathLike) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if _is_image_name(name):
                yield os.path.join(root, name)


def expand_paths(patterns: Iterable[str]) -> Iterator[str]:
    """Files, folders and glob patterns -> image file paths, lazily and in a stable order.

    * a file is yielded as given (whatever its suffix: it was named on purpose);
    * a folder yields its image files (``IMAGE_SUFFIXES``), recursively, sorted
      by name within each folder; hidden files and folders are skipped;
    * a glob (``*``, ``?``, ``[...]``, ``**`` recursive) yields the image files
      it matches, sorted, and the image files inside any folders it matches;
    * a pattern that matches nothing is yielded as it is, so it is reported as
      missing ("no such file").
    """
    for pattern in patterns:
        pattern = os.fspath(pattern)
        path = Path(pattern)
        if path.is_dir():
            yield from _walk_images(path)
        elif path.exists():
            yield str(path)
        else:
            found = False
            for match in sorted(glob.iglob(pattern, recursive=True)):
                if os.path.isdir(match):
                    for file in _walk_images(match):
                        found = True
                        yield file
                elif os.path.isfile(match) and _is_image_name(os.path.basename(match)):
                    found = True
                    yield match
            if not found:
                yield pattern


def _count(iterator: Iterable) -> int:
    return sum(1 for _ in iterator)


def _one_field(text: str) -> str:
    """``text`` with control characters (newline, tab, escape, ...) and Unicode line breaks written as Python
    escapes (``\\n``, ``\\t``, ``\\x1b``, ``\\u2028``), so that a file name keeps the text output at one
    tab-separated line per file."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp")
                   else ch for ch in text)


def _error_text(source: str, error: str) -> str:
    """The error of one input as the CLI reports it: a glob that matched nothing is not a missing file."""
    if error.startswith("no such file") and glob.has_magic(source):
        return f"no file matches {source}"
    return error


def _predict(args) -> int:
    """``python -m medclassify predict``: stream results, one line per input file.

    ``args``: ``task``, ``model`` (or None), ``json``, ``batch_size``,
    ``no_progress``, ``paths``.  With ``--json`` each line is one JSON object,
    ``{"file", "task", "label", "class_index", "probabilities", "ood",
    "close_call", "warnings"}`` (breast also ``p_malignant``, ``threshold``) or
    ``{"file", "error"}``.  A progress bar goes to stderr.  Returns 0 when every file was
    classified, 1 when any failed (or none was found), 2 on usage errors.
    """
    from .inference import NO_ANSWER, Predictor

    spec = get_task(args.task)
    batch_size = getattr(args, "batch_size", None)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {batch_size}", file=sys.stderr)
        return 2
    try:  # a missing --model was reported by main, before TensorFlow was imported
        predictor = Predictor(spec, getattr(args, "model", None))
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: cannot load the {spec.name} model: {exc}", file=sys.stderr)
        return 1
    progress = None
    if not getattr(args, "no_progress", False):
        from tqdm import tqdm

        # Counting walks the folders once more but holds nothing: memory stays flat.
        total = _count(expand_paths(args.paths))
        progress = tqdm(total=total, unit="img", file=sys.stderr, desc=f"predict {spec.name}",
                        mininterval=0.5, dynamic_ncols=True)
    as_json = getattr(args, "json", False)
    seen = failed = 0
    out = sys.stdout
    try:  # a file name that is not valid UTF-8 must not end the run with a traceback
        out.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
    try:
        for source, result in predictor.predict_many(expand_paths(args.paths), batch_size=batch_size):
            seen += 1
            if isinstance(result, str):
                failed += 1
                error = _error_text(source, result)
                line = (json.dumps({"file": source, "error": error}) if as_json
                        else f"{_one_field(source)}\terror: {_one_field(error)}")
            elif as_json:
                line = json.dumps(result.to_json(file=source))
            elif result.ood:  # as in the app: an image unlike the training data gets no answer, only the reason
                line = f"{_one_field(source)}\t{NO_ANSWER}\t-\tWARNING: " + "; ".join(result.warnings)
            else:
                if result.p_positive is not None:  # thresholded: the label's own probability can be under 50%
                    positive = spec.class_names[spec.positive_class]
                    line = (f"{_one_field(source)}\t{result.label}\tP({positive})={result.p_positive:.3f}"
                            f"\tthreshold={result.threshold:.3f}")
                else:
                    line = f"{_one_field(source)}\t{result.label}\t{result.probabilities[result.label]:.3f}"
                if result.close_call:
                    line += "\tclose call"  # nearly a coin toss, as the app marks it
            out.write(line + "\n")
            if seen % batch_size == 0:
                out.flush()
            if progress is not None:
                progress.update(1)
        out.flush()
    except BrokenPipeError:  # e.g. `... | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    finally:
        if progress is not None:
            progress.close()
    if seen == 0:
        print("error: no image files found in " + " ".join(map(str, args.paths)), file=sys.stderr)
        return 1
    return 1 if failed else 0


def _export(args) -> int:
    from .export import export_savedmodel

    try:
        out = export_savedmodel(args.task, args.out, args.model)
    except (FileExistsError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SavedModel written to {out}")
    return 0


def _fit_ood(args) -> int:
    from .data import DataError
    from .ood import fit_ood

    try:
        settings = fit_ood(args.task, args.model, args.data_dir)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(settings))
    return 0


def _experiment(args) -> int:
    from .data import DataError
    from .experiments import card_file, is_trial, run_variant, variant_config
    from .training import InvalidConfig

    try:
        variant_config(args.task, args.variant, epochs=args.epochs, limit=args.limit)
    except InvalidConfig as exc:
        print(f"error: {_option_message(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # unknown variant
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras's progress: stdout is only the JSON line, as in train
            card = run_variant(args.task, args.variant, seed=args.seed, data_dir=args.data_dir,
                               bootstrap=args.bootstrap, command=_command_line(args), epochs=args.epochs,
                               limit=args.limit)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    trial = is_trial(epochs=args.epochs, limit=args.limit)
    # Only the validation numbers, which are what variants are compared on: the test metrics are in
    # the card for the report, and printing them after every run invites choosing by them.
    val = card.get("validation") or {}
    print(json.dumps({"card": str(card_file(args.task, args.variant, args.seed, trial)),
                      "val": {k: val.get(k) for k in ("accuracy", "auc", "sensitivity", "specificity",
                                                      "accuracy_at_0_5") if k in val}}))
    return 0


def _report(args) -> int:
    from . import experiments

    readme = Path(experiments.REPO_ROOT) / "README.md"

    def readme_text():
        try:
            return readme.read_text()
        except OSError:
            return None

    before = readme_text()
    print(experiments.write_report())
    after = readme_text()
    if after is not None and after != before:  # write_report rewrites the block between the results markers
        print(f"{readme}: Results section rewritten")
    return 0


def _ship(args) -> int:
    from .data import DataError
    from .experiments import SHIPPED, ship, variant_config

    try:
        variant_config(args.task, args.variant or SHIPPED[args.task])
    except ValueError as exc:  # an unknown variant is a usage error, as in `experiment`
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(ship(args.task, args.variant, args.seed, data_dir=args.data_dir))
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _stability(args) -> int:
    from .data import DataError
    from .registry import get_task
    from .robustness import stability_report, store_stability

    try:
        report = stability_report(args.task, args.model, args.split, args.sides, args.data_dir)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.write_card:
        store_stability(args.model or get_task(args.task).model_path, report, _command_line(args))
    print(json.dumps(report))
    return 0


def _quantize(args) -> int:
    from .data import DataError
    from .experiments import quantize_and_refit

    try:
        section = quantize_and_refit(args.task, args.model, args.data_dir, command=_command_line(args))
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(section))
    return 0


def _ood_check(args) -> int:
    from .cards import set_section
    from .data import DataError
    from .oodcheck import ood_report
    from .registry import get_task

    try:
        report = ood_report(args.task, args.model, args.data_dir)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.write_card:
        set_section(args.model or get_task(args.task).model_path, "ood_check",
                    {**report, "command": _command_line(args)})
    print(json.dumps(report))
    return 0
