"""Command line: ``napari-jointattn segment | evaluate | train | export | models``.

Bad input exits with status 2 and one line on stderr, never a traceback, and
never leaves a partial output file (every write is atomic; SIGINT and SIGTERM
remove the temporary file). ``segment`` never replaces a file it did not
create unless ``--overwrite`` is given. Library warnings and log lines are
kept off stderr (pass ``python -W default`` to see warnings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from ._version import __version__

PROG = "napari-jointattn"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        from .engine.errors import one_line

        self.exit(2, f"{PROG}: error: {one_line(message)}\n")


AXIS_HELP = "slice 3-D stacks along this axis (TIFF default 0; NIfTI: the axial axis)"


def _axis(text: str) -> int:
    """--axis: an integer in [-3, 2], checked before any work (as segment checks it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid axis {text!r}: give 0, 1 or 2") from None
    if not -3 <= value < 3:
        raise argparse.ArgumentTypeError(f"axis {value} does not exist for a 3-D stack (use 0, 1 or 2)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"seed must be an integer in [0, 4294967295], got {text!r}")
    return value


def _show(text: object) -> str:
    """A file name or description as one printable line."""
    from .engine.errors import one_line

    return one_line(text)


def _parser() -> argparse.ArgumentParser:
    from .engine.training.split import SPLITS  # numpy only: the parser stays free of torch

    p = _Parser(
        prog=PROG,
        description="Segment, evaluate and manage joint-attention DenseUNet models.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("segment", help="segment images or folders of images")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    s.add_argument("--model", default="nuclei", help="preset name or model file (default: nuclei)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    _device_args(s)
    s.add_argument("--axis", type=_axis, default=None,
                   help=AXIS_HELP)
    s.add_argument("--attention", action="store_true",
                   help="also write attention maps, one file per map with the image's shape: "
                        "DIR/<stem>_attention_<map>.tif (.nii.gz for NIfTI input)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: skip inputs whose outputs exist)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive, default=None, metavar="N",
                       help="segment files in parallel on a local dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="segment files on a running dask.distributed cluster (e.g. tcp://host:8786); "
                            "its workers must see the same paths (docs/scale.md)")
    s.add_argument("--files-per-task", type=_positive, default=1, metavar="K",
                   help="with --workers/--scheduler: files segmented by one cluster task (default 1; "
                        "more for many small images, see docs/scale.md)")

    e = sub.add_parser("evaluate", help="score a model against reference labels (prints JSON)")
    e.add_argument("--model", default="nuclei", help="preset name or model file")
    e.add_argument("--image", action="append", required=True, metavar="I",
                   help="image file to segment and score (repeat for several)")
    e.add_argument("--labels", action="append", required=True, metavar="L",
                   help="reference labels for the preceding --image")
    _device_args(e)
    e.add_argument("--axis", type=_axis, default=None,
                   help=AXIS_HELP)
    e.add_argument("--knockout", action="store_true",
                   help="also score with each attention module knocked out (what each one changes)")

    t = sub.add_parser("train", help="train or fine-tune a model on annotated images")
    t.add_argument("--image", action="append", required=True, metavar="I",
                   help="annotated image file (repeat for several, each with its --labels)")
    t.add_argument("--labels", action="append", required=True, metavar="L",
                   help="label image for the preceding --image (0 everywhere = unannotated)")
    t.add_argument("--mask", action="append", metavar="M",
                   help="optional annotated-region mask per image (nonzero = annotated)")
    t.add_argument("--from", dest="start", default="nuclei", metavar="PRESET|PATH",
                   help="start model (default: nuclei)")
    t.add_argument("--out", required=True, metavar="OUT.safetensors",
                   help="the trained model file (refused if it exists, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--classes", help="comma-separated class names (default: the start model's)")
    t.add_argument("--epochs", type=int, default=30, help="at most this many epochs (default 30)")
    t.add_argument("--max-seconds", type=float, default=None,
                   help="time budget in seconds; the best weights so far are kept when it ends")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default 0.002)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the annotations held out for validation (default 0.2)")
    t.add_argument("--split", default="auto", choices=SPLITS,
                   help="training/validation split (default auto: by image, by slices, by a strip; "
                        "see docs/training.md)")
    t.add_argument("--no-augment", action="store_true", help="train without augmentation")
    t.add_argument("--seed", type=_seed, default=0, help="random seed of the run (default 0)")
    t.add_argument("--batch-size", type=_positive, default=8, metavar="B",
                   help="crops per step (under torchrun: the global batch, shared by the processes)")
    t.add_argument("--checkpoint", metavar="PATH",
                   help="resume from PATH if it exists; written after every epoch, removed at the end")
    t.add_argument("--axis", type=_axis, default=None,
                   help=AXIS_HELP)
    t.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")

    x = sub.add_parser("export", help="export a model for other software (bioimage.io, ONNX, TorchScript)",
                       description="Export a model: a bioimage.io package (.zip), ONNX (.onnx) or "
                                   "TorchScript (.pt, with a .json sidecar). See docs/export.md.")
    x.add_argument("model", metavar="MODEL", help="preset name or model file")
    x.add_argument("--format", required=True, choices=("bioimageio", "onnx", "torchscript"),
                   help="bioimageio (a validated .zip package), onnx or torchscript")
    x.add_argument("--out", required=True, metavar="PATH",
                   help="output file: .zip (bioimageio), .onnx or .pt; its folder is created if "
                        "missing; replaced if it exists")
    x.add_argument("--sample", metavar="IMAGE",
                   help="2-D image for the checks, test tensors and cover (default: a bundled sample)")

    m = sub.add_parser("models", help="list presets and saved models")
    m.add_argument("--json", action="store_true", help="print full metadata as JSON")
    return p


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (default 512)")


class _Progress:
    """A tqdm bar on stderr fed by the engine's progress callback."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="tile", file=sys.stderr, leave=False,
                        disable=not sys.stderr.isatty())

    def __call__(self, info: dict) -> None:
        self.bar.total = info["total"]
        self.bar.n = info["done"]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def cmd_segment(args) -> int:
    from .engine.scale.batch import JobResult
    from .engine.scale.cluster import segment_files

    def on_plan(plan) -> None:
        for path, reason in plan.skipped:
            print(f"skipped {_show(path)}: {_show(reason)}", file=sys.stderr)
        if not plan.jobs:
            print(f"nothing to segment ({len(plan.skipped)} input(s) skipped)", file=sys.stderr)
        elif distributed:
            bar.total = len(plan.jobs)
            bar.refresh()

    def on_result(item) -> None:
        if not isinstance(item, JobResult):
            path, reason = item  # the reason names the file
            print(f"{PROG}: error: {_show(reason)}", file=sys.stderr)
        else:
            for warning in item.fit_warnings:
                print(f"{PROG}: warning: {_show(item.input.name)}: {_show(warning)}", file=sys.stderr)
            print(f"{_show(item.input.name)}: {item.found}, {item.seconds:.2f} s on {item.device} -> "
                  + ", ".join(_show(w) for w in item.written), flush=True)
            for note in item.notes:
                print(f"  note: {_show(note)}", file=sys.stderr)
        if distributed:
            bar.update(1)

    distributed = args.workers is not None or args.scheduler is not None
    from tqdm import tqdm

    bar = tqdm(desc="files", unit="file", file=sys.stderr, leave=False,
               disable=not (distributed and sys.stderr.isatty()))
    try:
        report = segment_files(args.inputs, args.out, args.model, workers=args.workers,
                               scheduler=args.scheduler, device=args.device, tile=args.tile,
                               axis=args.axis, attention=args.attention, overwrite=args.overwrite,
                               files_per_task=args.files_per_task, on_result=on_result, on_plan=on_plan,
                               tile_progress=lambda path: _Progress(path.name))
    finally:
        bar.close()
    if distributed and report.plan.jobs:
        print(f"{len(report.done)} of {len(report.plan.jobs)} file(s) segmented in {report.seconds:.1f} s "
              f"on {report.workers} worker(s)", file=sys.stderr)
    if report.failed and len(report.plan.jobs) > 1:
        print(f"{PROG}: error: {len(report.failed)} file(s) failed: "
              + ", ".join(_show(p.name) for p, _ in report.failed), file=sys.stderr)
    return 2 if report.failed else 0


def _warn_fit(model, image, path: Path) -> None:
    """One ``warning:`` line on stderr for each way the image differs from the model's training data."""
    from .engine.models.fit import fit_warnings

    for warning in fit_warnings(model, image, path):
        print(f"{PROG}: warning: {_show(path.name)}: {_show(warning)}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    from .engine.devices import resolve_device
    from .engine.errors import BadInputError
    from .engine.evaluation.evaluate import evaluate
    from .engine.io.files import check_regular_file

    device = resolve_device(args.device)
    if len(args.image) != len(args.labels):
        raise BadInputError(f"{len(args.image)} --image but {len(args.labels)} --labels")
    for p in args.image + args.labels:
        check_regular_file(p, "image file")
    from .engine.io.images import read_image
    from .engine.models.model import load_model

    model = load_model(args.model)
    images = []
    for p in args.image:
        images.append(read_image(p))
        _warn_fit(model, images[-1], Path(p))
    result = evaluate(model, images, args.labels, device=device, tile=args.tile, axis=args.axis,
                      knockout=args.knockout)
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def cmd_train(args) -> int:
    import signal

    from .engine.checks import check_classes, check_output_file, check_run_files
    from .engine.devices import resolve_device
    from .engine.errors import BadInputError
    from .engine.io.files import check_regular_file
    from .engine.io.images import read_image, read_labels
    from .engine.training import TrainSettings, train

    resolve_device(args.device)
    if len(args.image) != len(args.labels):
        raise BadInputError(f"{len(args.image)} --image but {len(args.labels)} --labels")
    if args.mask and len(args.mask) != len(args.image):
        raise BadInputError(f"{len(args.mask)} --mask for {len(args.image)} --image")
    # every argument is checked before any file is read or any step is taken
    check_output_file(args.out)
    check_run_files(args.out, args.checkpoint, overwrite=args.overwrite)
    classes = check_classes([c.strip() for c in args.classes.split(",")], "--classes") \
        if args.classes is not None else None
    TrainSettings(epochs=args.epochs, max_seconds=args.max_seconds, lr=args.lr,
                  val_fraction=args.val_fraction, seed=args.seed, batch_size=args.batch_size).validate()
    for p in args.image + args.labels + (args.mask or []):
        check_regular_file(p, "image file")
    images = [read_image(p) for p in args.image]
    labels = [read_labels(p) for p in args.labels]
    masks = [read_labels(p) != 0 for p in args.mask] if args.mask else None

    from tqdm import tqdm

    bar = tqdm(desc="train", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
    interrupted = []

    def on_sigint(signum, frame):  # SIGINT or SIGTERM: stop after this step, keep the best weights
        interrupted.append(signum)

    def callback(info):
        bar.total = info["epochs"] * info["steps"]
        bar.n = max(0, (info["epoch"] - 1) * info["steps"] + info["step"])
        if info["loss"] is not None:
            bar.set_postfix(loss=f"{info['loss']:.3f}", best=f"{info['best_dice']:.3f}")
        if info["val_dice"] is not None:
            where = ("start model" if info["epoch"] == 0
                     else f"epoch {info['epoch']} step {info['step']}/{info['steps']}")
            loss = "" if info["loss"] is None else f"loss {info['loss']:.4f}, "
            print(f"{where}: {loss}validation Dice {info['val_dice']:.4f} (best {info['best_dice']:.4f})",
                  file=sys.stderr)
        return not interrupted

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)
    try:
        result = train(args.start, images, labels, masks=masks, axis=args.axis, classes=classes,
                       out=args.out, epochs=args.epochs, max_seconds=args.max_seconds, lr=args.lr,
                       val_fraction=args.val_fraction, split=args.split, augment=not args.no_augment,
                       seed=args.seed, batch_size=args.batch_size, checkpoint=args.checkpoint, device=args.device,
                       callback=callback)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_term is None else previous_term)
        bar.close()
    print(f"{result.path}: best validation Dice {result.best_dice:.4f} (epoch {result.best_epoch}, "
          f"step {result.best_step}; start model {result.start_dice:.4f}), "
          f"stopped by {result.stopped}, {result.seconds:.0f} s on {result.device}; "
          f"split {result.summary['split']}; head {result.model.provenance['training']['head']}")
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 128 + int(interrupted[0]) if interrupted else 0


def cmd_export(args) -> int:
    from .engine.io.files import check_regular_file
    from .engine.models.export import export_model

    if args.sample is not None:
        check_regular_file(args.sample, "image file")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as segment creates its --out folder
    result = export_model(args.model, args.format, args.out, sample=args.sample)
    print(f"{_show(result.path)}: {args.format} export in {result.seconds:.1f} s"
          + "".join(f", {_show(p.name)}" for p in result.files[1:]))
    diffs = result.checks.get("max_abs_difference")
    if diffs is not None:
        print(f"  checked against PyTorch at {result.checks['sizes']}: max abs difference "
              f"{json.dumps(diffs)}")
    if "bioimageio" in result.checks:
        print(f"  bioimageio.core validation and test run: {result.checks['bioimageio']}")
    return 0


def cmd_models(args) -> int:
    from .engine.models.metadata import (  # headers only: no torch
        finite_json,
        list_models,
        model_dir,
    )

    rows = list_models()
    if args.json:
        print(json.dumps(finite_json([
            {"kind": r["kind"], "name": r["name"], "path": str(r["path"]) if r["path"] else None,
             "metadata": r["metadata"], "error": r["error"]} for r in rows]), indent=2, allow_nan=False))
        return 0
    print(f"model folder: {_show(model_dir())}")
    width = max([20, *(len(_show(r["name"])) for r in rows)])  # long names keep the columns
    for r in rows:
        meta = r["metadata"]
        classes = ", ".join(_show(c) for c in meta["classes"]) if meta else "-"
        if r["error"]:
            state, desc = "  [broken]", r["error"]
        elif meta is None:
            state, desc = "  [no bundled weights]", r["description"]
        else:
            state, desc = "", r["description"]
        print(f"{r['kind']:6s} {_show(r['name']):{width}s} classes: {classes}{state}\n       {_show(desc)}")
    return 0


class _Terminated(BaseException):
    """SIGTERM (e.g. a batch scheduler's time limit): unwinds like Ctrl-C, cleaning up."""


@contextlib.contextmanager
def _quiet_and_interruptible():
    """Library warnings and log lines off stderr; SIGTERM raises ``_Terminated``."""
    noisy = [logging.getLogger(name) for name in ("nibabel", "PIL", "tifffile", "imageio", "monai", "py.warnings")]
    levels = [lg.level for lg in noisy]
    previous = None
    on_main = threading.current_thread() is threading.main_thread()
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("ignore")
        for lg in noisy:
            lg.setLevel(logging.CRITICAL + 1)
        if on_main:
            def on_term(signum, frame):
                raise _Terminated()

            previous = signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            for lg, level in zip(noisy, levels):
                lg.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    from .engine.errors import BadInputError, Cancelled, one_line

    command = {"segment": cmd_segment, "evaluate": cmd_evaluate, "train": cmd_train,
               "models": cmd_models, "export": cmd_export}[args.command]
    try:
        with _quiet_and_interruptible():
            return command(args)
    except BadInputError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: not enough memory for this input on this machine", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
