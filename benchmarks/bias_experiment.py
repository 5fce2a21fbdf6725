"""Does it work? Standard vs ISNet vs segment-then-classify vs RRR under synthetic background bias.

Trains every method on the same biased multi-site synthetic training set (same backbone, size, seed,
epochs) and reports, on the biased / unbiased / confounding test sets of one training site
(isnet-method.md section 7), the accuracy and the share of LRP relevance outside the lungs.

    .venv/bin/python benchmarks/bias_experiment.py --out outputs/bias_exp --n-per-site 150 \
        --size 64 --epochs 12

A model that learned the shortcut is good on biased, worse on unbiased and bad on confounding; a
model that ignores the background scores the same on all three. An ISNet whose accuracy stays near
chance everywhere is reported as COLLAPSED (section 8), not as a success.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classification.data import build_dataset, build_loader  # noqa: E402
from classification.explain import explain  # noqa: E402
from classification.methods import build_method  # noqa: E402
from classification.metrics import relevance_metrics  # noqa: E402
from classification.models import build_backbone  # noqa: E402
from classification.train import TrainConfig, load_splits, train  # noqa: E402


def make_data(
    out: Path, n_per_site: int, size: int, corr: float, difficulty: float
) -> tuple[Path, Path, str]:
    from pipeline.synthetic import default_sites, make_bias_test_sets, make_dataset

    sites = [s for s in default_sites() if s.marker_style != "none"][:2]
    sites = [replace(s, bias_correlation=corr) for s in sites]
    train_manifest = out / "train" / "manifest.csv"
    if not train_manifest.is_file():
        make_dataset(
            out / "train",
            sites,
            n_per_site=n_per_site,
            size=size,
            seed=0,
            workers=1,
            difficulty=difficulty,
            progress=False,
        )
    test_manifest = out / "test" / "manifest.csv"
    if not test_manifest.is_file():
        make_bias_test_sets(
            out / "test",
            sites[0],
            n=n_per_site // 2,
            size=size,
            seed=1,
            workers=1,
            difficulty=difficulty,
            progress=False,
        )
    return train_manifest, test_manifest, sites[0].name


@torch.no_grad()
def _predict(model: torch.nn.Module, method, loader) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for batch in loader:
        x = method.prepare_inputs(batch["image"], batch.get("mask"))
        preds.append(model(x).argmax(1))
        labels.append(batch["label"])
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def evaluate(model, method, records, size: int) -> dict[str, float]:
    """Accuracy and mean relevance metrics (explaining the predicted class) on ``records``."""
    model.eval()
    loader = build_loader(build_dataset(records, size, need_masks=True), 32, shuffle=False)
    pred, label = _predict(model, method, loader)
    shares, ranks, chance = [], [], []
    for batch in loader:
        x = method.prepare_inputs(batch["image"], batch["mask"])
        R = explain(model, x, target="predicted")
        m = relevance_metrics(R, batch["mask"])
        shares.append(m["background_share"])
        ranks.append(m["rank_accuracy"])
        chance.append(m["chance"])
    return {
        "acc": float((pred == label).mean()),
        "bg_share": float(torch.nanmean(torch.cat(shares))),
        "rank_acc": float(torch.nanmean(torch.cat(ranks))),
        "chance": float(torch.cat(chance).mean()),
        "n": len(label),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bias_experiment")
    ap.add_argument("--n-per-site", type=int, default=150)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--corr", type=float, default=0.95, help="training bias correlation")
    ap.add_argument("--difficulty", type=float, default=0.5, help="0 obvious .. 1 subtle")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="standard,isnet,segment_then_classify,rrr")
    ap.add_argument("--isnet-params", default='{"variant": "selective"}', help="JSON")
    ap.add_argument("--rrr-lam", type=float, default=10.0)
    ap.add_argument("--tune-epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    train_manifest, test_manifest, base = make_data(
        args.out, args.n_per_site, args.size, args.corr, args.difficulty
    )
    splits = load_splits(train_manifest, seed=args.seed)
    from pipeline.manifest import load_manifest, to_records

    tdf = load_manifest(test_manifest)
    test_sets = {
        kind: to_records(tdf[tdf["site"] == f"{base}-{kind}"], splits["classes"])
        for kind in ("biased", "unbiased", "confounding")
    }
    n_classes = len(splits["classes"])
    results = {}
    for name in args.methods.split(","):
        params = json.loads(args.isnet_params) if name == "isnet" else {}
        if name == "rrr":
            params = {"lam": args.rrr_lam}
        cfg = TrainConfig(
            method=name,
            method_params=params,
            backbone="small_cnn",
            size=args.size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            cache=True,
            tune_epochs=args.tune_epochs,
        )
        t0 = time.perf_counter()
        res = train(
            splits["train"],
            splits["val"],
            cfg,
            args.out / f"run_{name}",
            num_classes=n_classes,
            progress=lambda s, n=name: print(f"[{n}] {s}", flush=True),
        )
        seconds = time.perf_counter() - t0
        model = build_backbone("small_cnn", n_classes, dropout=cfg.dropout)
        model.load_state_dict(torch.load(res.best_model, weights_only=True))
        method = build_method(name, **params)
        row = {k: evaluate(model, method, recs, args.size) for k, recs in test_sets.items()}
        row["train_seconds"] = seconds
        row["constants"] = res.constants
        row["best_val_acc"] = res.best_metric
        chance_acc = 1.0 / n_classes
        row["collapsed"] = all(row[k]["acc"] < chance_acc + 0.1 for k in test_sets)
        results[name] = row
        print(json.dumps({name: row}), flush=True)

    print(
        f"\n{'method':24s} {'biased':>7s} {'unbias':>7s} {'confnd':>7s}  "
        f"{'bg share (b/u/c)':>20s}  {'rank acc':>8s}  {'chance':>6s}  {'time':>6s}"
    )
    for name, r in results.items():
        shares = "/".join(f"{r[k]['bg_share']:.2f}" for k in test_sets)
        flag = "  COLLAPSED" if r["collapsed"] else ""
        print(
            f"{name:24s} {r['biased']['acc']:7.3f} {r['unbiased']['acc']:7.3f} "
            f"{r['confounding']['acc']:7.3f}  {shares:>20s}  {r['unbiased']['rank_acc']:8.3f}  "
            f"{r['unbiased']['chance']:6.3f}  {r['train_seconds']:5.0f}s{flag}"
        )
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
