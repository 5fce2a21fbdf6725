"""Does it work? Standard vs ISNet vs segment-then-classify vs RRR under synthetic background bias.

Trains every method on the same biased multi-site synthetic training set (same backbone, size, seed,
epochs) and reports, on the biased / unbiased / confounding test sets of one training site
(isnet-method.md section 7), the accuracy and the share of LRP relevance outside the lungs.

    .venv/bin/python benchmarks/bias_experiment.py --out outputs/bias_exp --n-per-site 200 \
        --size 64 --difficulty 0 --epochs 40 --seeds 0,1 \
        --isnet-params '{"variant": "stochastic", "P": 0.7}'

``--data`` reuses one generated data set across invocations; every run's per-epoch history
(train CE, heatmap loss, P, validation accuracy) and the test confusion matrices go to
``OUT/results.json``; the table gives mean +- std over seeds.

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
    from synthetic import default_sites, make_bias_test_sets, make_dataset

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
    """Accuracy, confusion matrix (rows true, columns predicted) and mean relevance metrics
    (explaining the predicted class) on ``records``."""
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
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    confusion = np.zeros((n_classes, n_classes), dtype=int)  # rows: true, columns: predicted
    np.add.at(confusion, (label, pred), 1)
    return {
        "acc": float((pred == label).mean()),
        "confusion": confusion.tolist(),
        "bg_share": float(torch.nanmean(torch.cat(shares))),
        "rank_acc": float(torch.nanmean(torch.cat(ranks))),
        "chance": float(torch.cat(chance).mean()),
        "n": len(label),
    }


def _method_params(name: str, args: argparse.Namespace) -> dict:
    if name == "isnet":
        return json.loads(args.isnet_params)
    if name == "rrr":
        return {"lam": args.rrr_lam}
    return {}


def run_one(name: str, seed: int, args, splits, test_sets, out: Path) -> dict:
    """Train method ``name`` with ``seed``; evaluate its best-validation checkpoint."""
    n_classes = len(splits["classes"])
    params = _method_params(name, args)
    cfg = TrainConfig(
        method=name,
        method_params=params,
        backbone="small_cnn",
        width=args.width,
        size=args.size,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        grad_clip=args.grad_clip,
        seed=seed,
        augment=not args.no_augment,
        cache=True,
        tune_epochs=args.tune_epochs,
    )
    t0 = time.perf_counter()
    res = train(
        splits["train"],
        splits["val"],
        cfg,
        out,
        num_classes=n_classes,
        progress=lambda s, n=name: print(f"[{n} seed {seed}] {s}", flush=True),
    )
    seconds = time.perf_counter() - t0
    model = build_backbone("small_cnn", n_classes, dropout=cfg.dropout, width=args.width)
    model.load_state_dict(torch.load(res.best_model, weights_only=True))
    method = build_method(name, **params)
    row: dict = {k: evaluate(model, method, recs, args.size) for k, recs in test_sets.items()}
    row["train_seconds"] = seconds
    row["constants"] = res.constants
    row["best_val_acc"] = res.best_metric
    row["history"] = res.history
    chance_acc = 1.0 / n_classes
    row["collapsed"] = all(row[k]["acc"] < chance_acc + 0.1 for k in test_sets)
    return row


def summarise(runs: list[dict], kinds: tuple[str, ...]) -> dict:
    """Mean and (population) standard deviation over seeds of every reported number."""
    out: dict = {}
    for k in kinds:
        for metric in ("acc", "bg_share", "rank_acc", "chance"):
            vals = np.array([r[k][metric] for r in runs], dtype=float)
            out[f"{k}_{metric}"] = (float(vals.mean()), float(vals.std()))
    secs = np.array([r["train_seconds"] for r in runs])
    out["train_seconds"] = (float(secs.mean()), float(secs.std()))
    out["collapsed_runs"] = sum(bool(r["collapsed"]) for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bias_experiment")
    ap.add_argument(
        "--data", type=Path, default=None, help="data folder (default: OUT; reused if present)"
    )
    ap.add_argument("--n-per-site", type=int, default=150)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--corr", type=float, default=0.95, help="training bias correlation")
    ap.add_argument("--difficulty", type=float, default=0.5, help="0 obvious .. 1 subtle")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--momentum", type=float, default=0.99, help="SGD momentum")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="<= 0: no clipping")
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument(
        "--width", type=int, default=16, help="small_cnn base width (blocks w, 2w, 4w, 4w)"
    )
    ap.add_argument("--no-augment", action="store_true", help="train without augmentation")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--methods", default="standard,isnet,segment_then_classify,rrr")
    ap.add_argument("--isnet-params", default='{"variant": "selective"}', help="JSON")
    ap.add_argument("--rrr-lam", type=float, default=10.0)
    ap.add_argument("--tune-epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = args.data or args.out
    seeds = [int(s) for s in args.seeds.split(",")]

    train_manifest, test_manifest, base = make_data(
        data, args.n_per_site, args.size, args.corr, args.difficulty
    )
    # the train/val split is fixed by the data (manifest ``split`` column); seeds vary training
    splits = load_splits(train_manifest, seed=0)
    from cxr_io.manifest import load_manifest, to_records

    tdf = load_manifest(test_manifest)
    kinds = ("biased", "unbiased", "confounding")
    test_sets = {
        kind: to_records(tdf[tdf["site"] == f"{base}-{kind}"], splits["classes"]) for kind in kinds
    }
    results: dict = {}
    for name in args.methods.split(","):
        runs = []
        for seed in seeds:
            row = run_one(name, seed, args, splits, test_sets, args.out / f"run_{name}_s{seed}")
            brief = {k: v for k, v in row.items() if k != "history"}
            print(json.dumps({name: brief}), flush=True)
            runs.append(row)
        results[name] = {"runs": runs, "summary": summarise(runs, kinds)}
        (args.out / "results.json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2, default=str)
        )

    print(
        f"\nseeds {seeds}: mean +- std over seeds; chance accuracy {1 / len(splits['classes']):.3f}"
    )
    print(
        f"{'method':22s} {'biased':>13s} {'unbiased':>13s} {'confounding':>13s}  "
        f"{'bg share (b/u/c)':>16s}  {'rank acc (u)':>12s}  {'chance':>6s}  {'time':>5s}"
    )
    for name, res in results.items():
        sm = res["summary"]
        accs = "".join(f" {sm[f'{k}_acc'][0]:6.3f}+-{sm[f'{k}_acc'][1]:.3f}" for k in kinds)
        shares = "/".join(f"{sm[f'{k}_bg_share'][0]:.2f}" for k in kinds)
        rank = f"{sm['unbiased_rank_acc'][0]:.3f}+-{sm['unbiased_rank_acc'][1]:.3f}"
        flag = f"  COLLAPSED x{sm['collapsed_runs']}" if sm["collapsed_runs"] else ""
        print(
            f"{name:22s}{accs}  {shares:>16s}  {rank:>12s}  "
            f"{sm['unbiased_chance'][0]:6.3f}  {sm['train_seconds'][0]:4.0f}s{flag}"
        )


if __name__ == "__main__":
    main()
