"""A controlled non-local task: does attention carry evidence from far away, and does its map show it?

    python benchmarks/nonlocal_task.py [--seeds 3] [--steps 600] [--json PATH]

Generated 128 x 128 images. Every image has identical bright disks (the
objects) on its right side (x >= 80) and one marker on its left side
(x <= 26): a filled square or a hollow one. The objects' class is the
marker's: 1 when the square is filled, 2 when hollow. Marker and objects are
at least 54 px apart, beyond the receptive field of the convolutions of the
network used here (a two-block DenseUNet, strides 4 and 8; measured with
input gradients: about +-33 px around a pixel), and BatchNorm (its running
statistics at test time) carries nothing across the image. So a network
without global context must guess an object's class (chance: 0.5 of the
objects), and one whose self-attention reads the marker can be right.

Variants differ only in the attention module at 1/8 (``none``,
``pointwise``, ``self``, ``joint``); same data, same seeds, same steps.
Reported per variant: object class accuracy (majority of the object's
predicted foreground pixels) on 64 test images, mean foreground Dice, and
for the modules with a global part the *faithfulness*: the share of the
attention row of each object's centre pixel that falls on the marker's
cells (the marker covers 2-4 of the 256 cells: uniform attention would put
about 1 % there).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src")]

SIZE = 128
STRIDE = 8  # the attention module's feature stride
VARIANTS = ("none", "pointwise", "self", "joint")


def make_image(rng: np.random.Generator, cls: int | None = None):
    """One image: (image float32, labels int64 with 0 / 1 / 2, marker box (y0, x0, y1, x1), object centres)."""
    cls = int(rng.integers(1, 3)) if cls is None else cls
    img = rng.normal(0.1, 0.04, (SIZE, SIZE)).astype(np.float32)
    lab = np.zeros((SIZE, SIZE), np.int64)
    my, mx = int(rng.integers(8, SIZE - 20)), int(rng.integers(4, 15))
    img[my:my + 12, mx:mx + 12] = 0.9
    if cls == 2:  # hollow: a 3 px frame
        img[my + 3:my + 9, mx + 3:mx + 9] = rng.normal(0.1, 0.04, (6, 6))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    centres: list[tuple[int, int]] = []
    wanted = int(rng.integers(3, 6))
    for _ in range(200):
        if len(centres) == wanted:
            break
        cy, cx = int(rng.integers(10, SIZE - 10)), int(rng.integers(88, SIZE - 10))
        if all((cy - a) ** 2 + (cx - b) ** 2 > 18 ** 2 for a, b in centres):
            centres.append((cy, cx))
    for cy, cx in centres:
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 6 ** 2
        img[disk] = 0.8 + rng.normal(0, 0.04, int(disk.sum()))
        lab[disk] = cls
    return img, lab, (my, mx, my + 12, mx + 12), centres


def dataset(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [make_image(rng, cls=1 + i % 2) for i in range(n)]


def config(variant: str):
    from napari_jointattn.model.denseunet import DenseUNetConfig

    return DenseUNetConfig(in_channels=1, num_classes=3, stem_channels=16, growth=8, block_layers=(2, 2),
                           decoder_channels=(32, 32, 32), head_channels=8, attention=variant,
                           attention_levels=(1,) if variant != "none" else (), attention_dim=16,
                           dropout=0.0, norm="batch")


def train_variant(variant: str, seed: int, steps: int, data, lr: float = 2e-3, batch: int = 8):
    from napari_jointattn.engine.training.loss import masked_loss
    from napari_jointattn.model.denseunet import DenseUNet

    torch.manual_seed(seed)
    net = DenseUNet(config(variant))
    # no weight decay on gamma: a decayed gamma pulls the module back towards the identity
    decay = [p for n, p in net.named_parameters() if not n.endswith("gamma")]
    keep = [p for n, p in net.named_parameters() if n.endswith("gamma")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": keep, "weight_decay": 0.0}],
                            lr=lr)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(np.stack([d[0] for d in data]))[:, None]
    t_all = torch.from_numpy(np.stack([d[1] for d in data]))
    net.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.from_numpy(rng.choice(len(data), batch, replace=False))
        x, t = x_all[idx], t_all[idx]
        loss = masked_loss(net(x), t, torch.ones_like(t, dtype=torch.bool), torch.ones(t.shape), 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def evaluate_variant(net, data) -> dict:
    """Object class accuracy, mean foreground Dice, and the faithfulness of the attention rows."""
    correct = total = 0
    inter = np.zeros(3)
    sums = np.zeros(3)
    shares = []
    share_class = []  # the object's class (1: filled marker, 2: hollow) for each share
    module = next(iter(net.attention.values()), None)
    with torch.no_grad():
        for img, lab, (y0, x0, y1, x1), centres in data:
            x = torch.from_numpy(img)[None, None]
            pred = net(x)[0].argmax(0).numpy()
            for c in (1, 2):
                inter[c] += ((pred == c) & (lab == c)).sum()
                sums[c] += (pred == c).sum() + (lab == c).sum()
            cls = int(lab[lab > 0][0])
            for cy, cx in centres:
                yy, xx = np.mgrid[:SIZE, :SIZE]
                disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
                votes = np.bincount(pred[disk], minlength=3)[1:]
                correct += int(votes.argmax() + 1 == cls and votes.sum() > 0)
                total += 1
            if module is not None and module.has_global_row:
                feats = {}
                handle = module.register_forward_pre_hook(lambda _m, a: feats.__setitem__("f", a[0]))
                net(x)
                handle.remove()
                f = feats["f"]
                w = f.shape[-1]
                cells = np.zeros(f.shape[-2:], bool)
                cells[y0 // STRIDE:(y1 - 1) // STRIDE + 1, x0 // STRIDE:(x1 - 1) // STRIDE + 1] = True
                for cy, cx in centres:
                    row = module.attention_row(f, (cy // STRIDE) * w + cx // STRIDE)[0].numpy()
                    shares.append(float(row[cells].sum()))
                    share_class.append(cls)
    dice = [2 * inter[c] / max(sums[c], 1) for c in (1, 2)]
    out = {"object_accuracy": correct / max(total, 1), "mean_dice": float(np.mean(dice)), "objects": total}
    if shares:
        out["marker_share_median"] = float(np.median(shares))
        out["marker_share_mean"] = float(np.mean(shares))
        out["rows_mostly_on_marker"] = float(np.mean(np.array(shares) > 0.5))
        by = np.array(share_class)
        out["rows_mostly_on_marker_by_class"] = {
            str(c): float(np.mean(np.array(shares)[by == c] > 0.5)) for c in (1, 2) if (by == c).any()}
    if module is not None:
        out["gamma"] = float(module.gamma.detach().reshape(-1)[0])
    return out


def paired_comparisons(results: list[dict], variants) -> list[dict]:
    """Object accuracy of variant a minus variant b, seed by seed (the same data and seeds),
    with a paired t-test (scipy), for every pair that has at least 2 common seeds."""
    from scipy.stats import ttest_rel

    acc = {(r["variant"], r["seed"]): r["object_accuracy"] for r in results}
    out = []
    order = [v for v in ("joint", "self", "pointwise", "none") if v in variants]
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            seeds = sorted(s for (v, s) in acc if v == a and (b, s) in acc)
            if len(seeds) < 2:
                continue
            x = np.array([acc[(a, s)] for s in seeds])
            y = np.array([acc[(b, s)] for s in seeds])
            d = x - y
            p = float(ttest_rel(x, y).pvalue) if np.any(d != d[0]) else None  # no spread: no t-test
            out.append({"a": a, "b": b, "seeds": seeds, "mean_difference": float(d.mean()),
                        "won": int((d > 0).sum()), "tied": int((d == 0).sum()), "lost": int((d < 0).sum()),
                        "p_ttest": p})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_data = dataset(1000, args.train_images)
    test_data = dataset(2000, 64)
    results = []
    for seed in range(args.seeds):
        for variant in args.variants:
            t0 = time.perf_counter()
            net = train_variant(variant, seed, args.steps, train_data)
            r = {"variant": variant, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                 **evaluate_variant(net, test_data)}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| variant | object class accuracy (chance 0.5) | mean foreground Dice | "
          "attention row share on the marker (median) | rows with > half on the marker |")
    print("| --- | --- | --- | --- | --- |")
    for v in args.variants:
        rs = [r for r in results if r["variant"] == v]
        acc = [r["object_accuracy"] for r in rs]
        dice = [r["mean_dice"] for r in rs]
        share = [r["marker_share_median"] for r in rs if "marker_share_median" in r]
        most = [r["rows_mostly_on_marker"] for r in rs if "rows_mostly_on_marker" in r]
        fmt = lambda a: f"{np.mean(a):.3f} ± {np.std(a):.3f}" if a else "–"  # noqa: E731
        print(f"| {v} | {fmt(acc)} | {fmt(dice)} | {fmt(share)} | {fmt(most)} |")
    paired = paired_comparisons(results, args.variants)
    if paired:
        print("\n| paired (same seeds, same data) | mean accuracy difference | seeds won / tied / lost | "
              "paired t-test p |")
        print("| --- | --- | --- | --- |")
        for row in paired:
            print(f"| {row['a']} − {row['b']} | {row['mean_difference']:+.3f} | {row['won']} / {row['tied']} / "
                  f"{row['lost']} | {'–' if row['p_ttest'] is None else format(row['p_ttest'], '.2g')} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "results": results, "paired": paired}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
