"""How much each attention module of the shipped presets changes their labels.

    python benchmarks/knockout.py [--json PATH]

For each preset, on its evaluation data (nuclei: the DSB2018 image of the
stardist wheel; brain-mri: the held-out axial slab of the nilearn template,
as ``scripts/train_presets.py`` holds it out), the labels with every
attention module on are compared with the labels with one module, and then
all of them, knocked out (``evaluate(..., knockout=True)``): the fraction of
pixels whose class changes and the Dice change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]


def nuclei() -> dict:
    import tifffile

    from napari_jointattn.engine.evaluation.evaluate import evaluate

    data = Path(importlib.util.find_spec("stardist").origin).parent / "data" / "images"
    image, labels = tifffile.imread(data / "img2d.tif"), tifffile.imread(data / "mask2d.tif")
    return evaluate("nuclei", [image], [labels], knockout=True, device="cpu")["knockout"]


def brain() -> dict:
    from train_presets import brain_data

    from napari_jointattn.engine.evaluation.evaluate import evaluate

    vol, lab, slab = brain_data()["nilearn"][:3]
    return evaluate("brain-mri", [vol[:, :, slab]], [lab[:, :, slab]], axis=2, knockout=True,
                    device="cpu")["knockout"]


def table(name: str, k: dict) -> str:
    rows = [f"| `{name}` (Dice {k['dice']:.4f}) | pixels that change | Dice change |", "| --- | --- | --- |"]
    for module, r in k["modules"].items():
        rows.append(f"| {module} knocked out | {100 * r['changed_fraction']:.3f} % | {r['dice_change']:+.5f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = {"nuclei": nuclei(), "brain-mri": brain()}
    for name, k in out.items():
        print(table(name, k), end="\n\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
