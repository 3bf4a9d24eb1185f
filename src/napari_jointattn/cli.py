"""Command line: ``napari-jointattn segment | evaluate | train | models``.

Bad input exits with status 2 and one line on stderr, never a traceback, and
never leaves a partial output file (every write is atomic).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import __version__

PROG = "napari-jointattn"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
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
    s.add_argument("--axis", type=int, default=None,
                   help="slice 3-D stacks along this axis (TIFF default 0; NIfTI: the axial axis)")
    s.add_argument("--attention", action="store_true",
                   help="also write attention maps: DIR/<stem>_attention_<module>.tif")

    e = sub.add_parser("evaluate", help="score a model against reference labels (prints JSON)")
    e.add_argument("--model", default="nuclei", help="preset name or model file")
    e.add_argument("--image", action="append", required=True, metavar="I")
    e.add_argument("--labels", action="append", required=True, metavar="L")
    _device_args(e)
    e.add_argument("--axis", type=int, default=None)

    t = sub.add_parser("train", help="train or fine-tune a model on annotated images")
    t.add_argument("--image", action="append", required=True, metavar="I")
    t.add_argument("--labels", action="append", required=True, metavar="L",
                   help="label image for the preceding --image (0 everywhere = unannotated)")
    t.add_argument("--mask", action="append", metavar="M",
                   help="optional annotated-region mask per image (nonzero = annotated)")
    t.add_argument("--from", dest="start", default="nuclei", metavar="PRESET|PATH",
                   help="start model (default: nuclei)")
    t.add_argument("--out", required=True, metavar="OUT.safetensors")
    t.add_argument("--classes", help="comma-separated class names (default: the start model's)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--max-seconds", type=float, default=None)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--axis", type=int, default=None)
    t.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")

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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def cmd_segment(args) -> int:
    import numpy as np

    from .engine.devices import resolve_device
    from .engine.errors import BadInputError
    from .engine.imageio import list_inputs, output_stem, read_image, write_labels, write_tiff
    from .engine.models import load_model
    from .engine.inference import segment

    device = resolve_device(args.device)
    model = load_model(args.model)
    inputs = list_inputs(args.inputs)
    stems: dict[str, Path] = {}
    for path in inputs:
        stem = output_stem(path)
        if stem in stems:
            raise BadInputError(f"{path} and {stems[stem]} would write the same output name {stem!r}")
        stems[stem] = path
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    for path in inputs:
        img = read_image(path)
        bar = _Progress(path.name)
        try:
            result = segment(img, model, device=device, tile=args.tile, axis=args.axis,
                             attention=args.attention, callback=bar)
        finally:
            bar.close()
        suffix = ".nii.gz" if img.format == "nifti" else ".tif"
        target = out / f"{img.stem}_labels{suffix}"
        write_labels(target, result.labels, like=img)
        written = [target]
        if args.attention:
            modules: dict[str, list[str]] = {}
            for name in result.attention:
                module, _, map_name = name.rpartition(" ")
                modules.setdefault(module, []).append(map_name)
            for module, map_names in modules.items():
                stack = np.stack([result.attention[f"{module} {m}"] for m in map_names])
                desc = json.dumps({"module": module, "maps": map_names})
                target = out / f"{img.stem}_attention_{_slug(module)}.tif"
                write_tiff(target, stack.astype(np.float32), description=desc)
                written.append(target)
        n = int(result.labels.max()) if result.instances else len(np.unique(result.labels)) - 1
        what = "objects" if result.instances else "classes present"
        print(f"{path.name}: {n} {what}, {result.seconds:.2f} s on {result.device} -> "
              + ", ".join(str(w) for w in written))
        for note in result.notes:
            print(f"  note: {note}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .engine.devices import resolve_device
    from .engine.errors import BadInputError
    from .engine.evaluation import evaluate

    device = resolve_device(args.device)
    if len(args.image) != len(args.labels):
        raise BadInputError(f"{len(args.image)} --image but {len(args.labels)} --labels")
    for p in args.image + args.labels:
        if not Path(p).is_file():
            raise BadInputError(f"{p}: no such file")
    result = evaluate(args.model, args.image, args.labels, device=device, tile=args.tile, axis=args.axis)
    print(json.dumps(result, indent=2))
    return 0


def cmd_train(args) -> int:
    import signal

    from .engine.devices import resolve_device
    from .engine.errors import BadInputError
    from .engine.imageio import read_image, read_labels
    from .engine.training import train

    resolve_device(args.device)
    if len(args.image) != len(args.labels):
        raise BadInputError(f"{len(args.image)} --image but {len(args.labels)} --labels")
    if args.mask and len(args.mask) != len(args.image):
        raise BadInputError(f"{len(args.mask)} --mask for {len(args.image)} --image")
    if not args.out.endswith(".safetensors"):
        raise BadInputError(f"--out must end in .safetensors: {args.out}")
    images = [read_image(p) for p in args.image]
    labels = [read_labels(p) for p in args.labels]
    masks = [read_labels(p) != 0 for p in args.mask] if args.mask else None
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None

    from tqdm import tqdm

    bar = tqdm(desc="train", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)

    def callback(info):
        bar.total = info["epochs"] * info["steps"]
        bar.n = (info["epoch"] - 1) * info["steps"] + info["step"]
        bar.set_postfix(loss=f"{info['loss']:.3f}", best=f"{info['best_dice']:.3f}")
        if info["val_dice"] is not None:
            loss = "-" if info["loss"] is None else f"{info['loss']:.4f}"
            print(f"epoch {info['epoch']} step {info['step']}/{info['steps']}: loss {loss}, "
                  f"validation Dice {info['val_dice']:.4f} (best {info['best_dice']:.4f})", file=sys.stderr)
        return not interrupted

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(args.start, images, labels, masks=masks, axis=args.axis, classes=classes,
                       out=args.out, epochs=args.epochs, max_seconds=args.max_seconds, lr=args.lr,
                       val_fraction=args.val_fraction, augment=not args.no_augment, seed=args.seed,
                       device=args.device, callback=callback)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    print(f"{result.path}: best validation Dice {result.best_dice:.4f} (epoch {result.best_epoch}, "
          f"step {result.best_step}; start model {result.start_dice:.4f}), "
          f"stopped by {result.stopped}, {result.seconds:.0f} s on {result.device}; "
          f"split {result.summary['split']}; head {result.model.provenance['training']['head']}")
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 130 if interrupted else 0


def cmd_models(args) -> int:
    from .engine.errors import BadInputError
    from .engine.models import PRESET_DIR, model_dir, read_metadata, saved_models
    from .engine.presets import PRESETS

    rows = []
    for name, spec in PRESETS.items():
        path = PRESET_DIR / f"{name}.safetensors"
        meta = read_metadata(path) if path.is_file() else None
        rows.append(("preset", name, path if meta else None, meta, spec["description"]))
    for path in saved_models():
        try:
            meta = read_metadata(path)
            rows.append(("saved", path.stem, path, meta, meta.get("description", "")))
        except BadInputError as exc:
            rows.append(("saved", path.stem, path, None, f"unreadable: {exc}"))
    if args.json:
        print(json.dumps([{"kind": k, "name": n, "path": str(p) if p else None, "metadata": m}
                          for k, n, p, m, _ in rows], indent=2))
        return 0
    print(f"model folder: {model_dir()}")
    for kind, name, path, meta, desc in rows:
        classes = ", ".join(meta["classes"]) if meta else "-"
        state = "" if meta or kind == "saved" else "  [no bundled weights]"
        print(f"{kind:6s} {name:20s} classes: {classes}{state}\n       {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    from .engine.errors import BadInputError, Cancelled

    try:
        return {"segment": cmd_segment, "evaluate": cmd_evaluate, "train": cmd_train,
                "models": cmd_models}[
            args.command
        ](args)
    except BadInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: not enough memory (try a smaller --tile)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
