"""Does it work? Standard vs ISNet vs segment-then-classify vs RRR vs the bias-free reference.

Trains every method on the same biased multi-site synthetic training set (same backbone, size, seed,
epochs) and reports, on the biased / unbiased / confounding test sets of one training site
(isnet-method.md section 7), macro AUROC, balanced accuracy, accuracy and the share of LRP
relevance outside the lungs, for the selected checkpoint (``--select``; ISNet: validation ISNet
loss) and for the last epoch's weights. The ``reference`` row is a standard classifier trained on
the same training patients re-rendered WITHOUT markers (:func:`synthetic.bias_free_sites`,
``DATA/train_clean``): the accuracy the lungs allow, the ceiling an ISNet should approach. Every
other method is compared with it, paired by seed, with a 95% bootstrap over test images.

    .venv/bin/python benchmarks/bias_experiment.py --data /tmp/r6/d64 --out outputs/bias_exp \
        --n-per-site 200 --size 64 --difficulty 0 --epochs 40 --lr 3e-3 --seeds 0,1,2 \
        --methods reference,standard,isnet --isnet-params '{"variant": "stochastic", "P": 0.7}'

``--data`` reuses one generated data set across invocations; ``--reference-from OUT/results.json``
compares this invocation's methods with a reference trained by an earlier one. Every run's
per-epoch history (train CE, heatmap loss and its background / foreground parts, P, validation
accuracy / AUROC / loss), the test confusion matrices and probabilities go to ``OUT/results.json``;
the table gives means over seeds.

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

from classification.data import (  # noqa: E402
    AUGMENT_POLICIES,
    GAMMA_SUFFIX,
    build_dataset,
    build_loader,
)
from classification.explain import explain  # noqa: E402
from classification.methods import build_method  # noqa: E402
from classification.metrics import relevance_metrics  # noqa: E402
from classification.models import build_backbone  # noqa: E402
from classification.train import (  # noqa: E402
    LR_SCHEDULES,
    SELECT_CRITERIA,
    TrainConfig,
    load_splits,
    resolve_augment,
    train,
)


def make_data(
    out: Path, n_per_site: int, size: int, corr: float, difficulty: float, clean: bool = False
) -> tuple[Path, Path, str]:
    """Write (once) the biased training set ``out/train``, the test sets ``out/test`` and, with
    ``clean``, the same training patients without markers ``out/train_clean`` (see
    :func:`synthetic.bias_free_sites`). Returns (train manifest, test manifest, base
    site name)."""
    from synthetic import bias_free_sites, default_sites, make_bias_test_sets, make_dataset

    sites = [s for s in default_sites() if s.marker_style != "none"][:2]
    sites = [replace(s, bias_correlation=corr) for s in sites]
    variants = [("train", sites)] + ([("train_clean", bias_free_sites(sites))] if clean else [])
    for folder, site_list in variants:
        if not (out / folder / "manifest.csv").is_file():
            make_dataset(
                out / folder,
                site_list,
                n_per_site=n_per_site,
                size=size,
                seed=0,
                workers=1,
                difficulty=difficulty,
                progress=False,
            )
    train_manifest = out / "train" / "manifest.csv"
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
    """Softmax probabilities ``[n, N]`` and labels ``[n]`` in loader order."""
    probs, labels = [], []
    for batch in loader:
        x = method.prepare_inputs(batch["image"], batch.get("mask"))
        probs.append(torch.softmax(model(x), dim=1))
        labels.append(batch["label"])
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest macro AUROC of scores ``[n, N]`` against labels ``[n]`` (Mann-Whitney form with
    average ranks for ties; equals scikit-learn's ``roc_auc_score(..., multi_class="ovr")``, and is
    fast enough for the paired bootstrap)."""
    from scipy.stats import rankdata

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    aucs = []
    for c in range(probs.shape[1]):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(probs[:, c])
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall of the arg-max prediction."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, probs.argmax(1)))


def evaluate(model, method, records, size: int, relevance: bool = True) -> dict:
    """Accuracy, balanced accuracy, macro AUROC, confusion matrix (rows true, columns predicted),
    the probabilities ``[n, N]`` (for paired comparisons) and, with ``relevance``, mean relevance
    metrics (explaining the predicted class) on ``records``."""
    model.eval()
    loader = build_loader(build_dataset(records, size, need_masks=True), 32, shuffle=False)
    probs, label = _predict(model, method, loader)
    pred = probs.argmax(1)
    n_classes = probs.shape[1]
    confusion = np.zeros((n_classes, n_classes), dtype=int)  # rows: true, columns: predicted
    np.add.at(confusion, (label, pred), 1)
    row = {
        "acc": float((pred == label).mean()),
        "bacc": balanced_accuracy(probs, label),
        "auroc": macro_auroc(probs, label),
        "confusion": confusion.tolist(),
        "probs": probs.round(5).tolist(),
        "labels": label.tolist(),
        "n": len(label),
    }
    if relevance:
        shares, ranks, chance = [], [], []
        for batch in loader:
            x = method.prepare_inputs(batch["image"], batch["mask"])
            R = explain(model, x, target="predicted")
            m = relevance_metrics(R, batch["mask"])
            shares.append(m["background_share"])
            ranks.append(m["rank_accuracy"])
            chance.append(m["chance"])
        row["bg_share"] = float(torch.nanmean(torch.cat(shares)))
        row["rank_acc"] = float(torch.nanmean(torch.cat(ranks)))
        row["chance"] = float(torch.cat(chance).mean())
    return row


#: the bias-free reference: a standard classifier trained on the training images re-rendered
#: without markers (``train_clean``, :func:`synthetic.bias_free_sites`)
REFERENCE = "reference"


def _train_method(name: str) -> str:
    return "standard" if name == REFERENCE else name


def _method_params(name: str, args: argparse.Namespace) -> dict:
    if name == "isnet":
        return json.loads(args.isnet_params)
    if name == "rrr":
        return {"lam": args.rrr_lam}
    return {}


def run_one(name: str, seed: int, args, splits, test_sets, out: Path) -> dict:
    """Train method ``name`` with ``seed``; evaluate its selected checkpoint (and the last
    epoch's weights, without relevance metrics, under ``last``)."""
    n_classes = len(splits["classes"])
    params = _method_params(name, args)
    if "teacher" in params:  # ISNet distillation: one teacher per seed, e.g. ".../run_..._s{seed}/"
        params["teacher"] = str(params["teacher"]).format(seed=seed)
    method_name = _train_method(name)
    cfg = TrainConfig(
        method=method_name,
        method_params=params,
        backbone=args.backbone,
        width=args.width,
        size=args.size,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        momentum=args.momentum,
        grad_clip=args.grad_clip,
        seed=seed,
        augment="none" if args.no_augment else args.augment,
        select=args.select,
        cache=True,
        tune_epochs=args.tune_epochs,
        init_from=args.init_from.format(seed=seed) if args.init_from else "",
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
    method = build_method(method_name, **params)

    def load(path: Path) -> torch.nn.Module:
        model = build_backbone(args.backbone, n_classes, dropout=cfg.dropout, width=args.width)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model

    model = load(res.best_model)
    row: dict = {k: evaluate(model, method, recs, args.size) for k, recs in test_sets.items()}
    last = load(res.last_model)
    row["last"] = {
        k: {m: v for m, v in evaluate(last, method, recs, args.size, relevance=False).items()}
        for k, recs in test_sets.items()
    }
    row["seed"] = seed
    row["train_seconds"] = seconds
    row["constants"] = res.constants
    row["select"] = res.select
    row["best_epoch"] = res.best_epoch
    row["best_value"] = res.best_metric
    row["augment"] = resolve_augment(cfg)
    row["history"] = res.history
    chance_acc = 1.0 / n_classes
    row["collapsed"] = all(row[k]["acc"] < chance_acc + 0.1 for k in test_sets)
    return row


def summarise(runs: list[dict], kinds: tuple[str, ...]) -> dict:
    """Mean and (population) standard deviation over seeds of every reported number."""
    out: dict = {}
    for k in kinds:
        for metric in ("acc", "bacc", "auroc", "bg_share", "rank_acc", "chance"):
            vals = np.array([r[k][metric] for r in runs], dtype=float)
            out[f"{k}_{metric}"] = (float(vals.mean()), float(vals.std()))
        for metric in ("acc", "bacc", "auroc"):
            vals = np.array([r["last"][k][metric] for r in runs], dtype=float)
            out[f"last_{k}_{metric}"] = (float(vals.mean()), float(vals.std()))
    gap = np.array([r["biased"]["auroc"] - r["confounding"]["auroc"] for r in runs])
    out["auroc_gap_biased_confounding"] = (float(gap.mean()), float(gap.std()))
    secs = np.array([r["train_seconds"] for r in runs])
    out["train_seconds"] = (float(secs.mean()), float(secs.std()))
    out["collapsed_runs"] = sum(bool(r["collapsed"]) for r in runs)
    return out


def paired_comparison(
    runs_a: list[dict],
    runs_b: list[dict],
    kinds: tuple[str, ...],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Method A minus method B on the same test images, paired by training seed.

    For each test set and metric (macro AUROC, balanced accuracy): the mean over the common
    seeds of ``metric(A) - metric(B)``, its spread over seeds, and a 95% paired bootstrap
    interval over test images (each resample draws one set of image indices and applies it to
    both methods' predictions of every seed, then averages the per-seed differences)."""
    by_seed_b = {r["seed"]: r for r in runs_b}
    pairs = [(a, by_seed_b[a["seed"]]) for a in runs_a if a["seed"] in by_seed_b]
    if not pairs:
        raise ValueError("no common seeds between the two methods' runs")
    rng = np.random.default_rng(seed)
    out: dict = {"seeds": [a["seed"] for a, _ in pairs]}
    metrics = {"auroc": macro_auroc, "bacc": balanced_accuracy}
    for k in kinds:
        labels = np.asarray(pairs[0][0][k]["labels"])
        pa = [np.asarray(a[k]["probs"]) for a, _ in pairs]
        pb = [np.asarray(b[k]["probs"]) for _, b in pairs]
        n = len(labels)
        idx = [rng.integers(0, n, n) for _ in range(n_boot)]
        for name, fn in metrics.items():
            per_seed = np.array(
                [fn(x, labels) - fn(y, labels) for x, y in zip(pa, pb, strict=True)]
            )
            boots = np.array(
                [
                    np.mean(
                        [
                            fn(x[i], labels[i]) - fn(y[i], labels[i])
                            for x, y in zip(pa, pb, strict=True)
                        ]
                    )
                    for i in idx
                ]
            )
            lo, hi = np.percentile(boots, [2.5, 97.5])
            out[f"{k}_{name}"] = {
                "diff": float(per_seed.mean()),
                "seed_std": float(per_seed.std()),
                "ci95": [float(lo), float(hi)],
            }
    return out


def _print_table(results: dict, kinds: tuple[str, ...], n_classes: int, seeds: list[int]) -> None:
    print(f"\nseeds {seeds}: mean +- std over seeds; chance accuracy {1 / n_classes:.3f}")
    print(
        f"{'method':22s} {'AUROC b/u/c':>20s} {'bacc b/u/c':>20s} {'acc b/u/c':>20s}"
        f"  {'bg share (b/u/c)':>16s}  {'gap b-c':>6s}  {'time':>5s}"
    )
    for name, res in results.items():
        sm = res["summary"]

        def trio(metric: str, sm=sm) -> str:
            return "/".join(f"{sm[f'{k}_{metric}'][0]:.3f}" for k in kinds)

        shares = "/".join(f"{sm[f'{k}_bg_share'][0]:.2f}" for k in kinds)
        flag = f"  COLLAPSED x{sm['collapsed_runs']}" if sm["collapsed_runs"] else ""
        print(
            f"{name:22s} {trio('auroc'):>20s} {trio('bacc'):>20s} {trio('acc'):>20s}  {shares:>16s}"
            f"  {sm['auroc_gap_biased_confounding'][0]:+.3f}  {sm['train_seconds'][0]:4.0f}s{flag}"
        )


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
    ap.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES))
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--momentum", type=float, default=0.99, help="SGD momentum")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="<= 0: no clipping")
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--backbone", default="small_cnn", help="small_cnn | resnet18 | densenet121")
    ap.add_argument(
        "--width", type=int, default=16, help="small_cnn base width (blocks w, 2w, 4w, 4w)"
    )
    ap.add_argument(
        "--augment",
        default="auto",
        choices=["auto", *AUGMENT_POLICIES, *(p + GAMMA_SUFFIX for p in AUGMENT_POLICIES)],
        help="augmentation policy (auto: the method's default, see classification.train); "
        f"{GAMMA_SUFFIX} adds a random contrast gamma",
    )
    ap.add_argument("--no-augment", action="store_true", help="same as --augment none")
    ap.add_argument(
        "--select",
        default="auto",
        choices=["auto", *SELECT_CRITERIA],
        help="model selection (auto: ISNet val_loss, others val_acc)",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument(
        "--methods",
        default="standard,isnet,segment_then_classify,rrr,reference",
        help="comma-separated; 'reference' = standard trained on the marker-free re-rendering",
    )
    ap.add_argument("--isnet-params", default='{"variant": "selective"}', help="JSON")
    ap.add_argument("--rrr-lam", type=float, default=10.0)
    ap.add_argument("--tune-epochs", type=int, default=3)
    ap.add_argument(
        "--init-from",
        default="",
        help="start every network from this state dict ({seed} is replaced by the seed), e.g. "
        "OUT/run_standard_s{seed}/best_model.pt of an earlier invocation (fine-tuning)",
    )
    ap.add_argument(
        "--reference-from",
        type=Path,
        default=None,
        help="results.json of an earlier invocation holding a 'reference' row: each method of "
        "this invocation is compared with it, paired by seed (same data folder required)",
    )
    ap.add_argument(
        "--clean-train",
        action="store_true",
        help="train every method of this invocation on the marker-free rendering (train_clean): "
        "a bias-free reference for a method that differs from the standard classifier (e.g. an "
        "ISNet with a teacher)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = args.data or args.out
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.methods.split(",")

    train_manifest, test_manifest, base = make_data(
        data,
        args.n_per_site,
        args.size,
        args.corr,
        args.difficulty,
        clean=REFERENCE in names or args.clean_train,
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
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        method_splits = splits
        if name == REFERENCE or args.clean_train:  # same patients and splits, no markers
            method_splits = load_splits(data / "train_clean" / "manifest.csv", seed=0)
        runs = []
        for seed in seeds:
            row = run_one(
                name, seed, args, method_splits, test_sets, args.out / f"run_{name}_s{seed}"
            )
            brief = {
                k: (
                    {m: x for m, x in v.items() if m not in ("probs", "labels")}
                    if k in kinds
                    else v
                )
                for k, v in row.items()
                if k not in ("history", "last")
            }
            print(json.dumps({name: brief}), flush=True)
            runs.append(row)
        results[name] = {"runs": runs, "summary": summarise(runs, kinds)}
        (args.out / "results.json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2, default=str)
        )

    reference = results.get(REFERENCE)
    if reference is None and args.reference_from is not None:
        reference = json.loads(args.reference_from.read_text())["results"][REFERENCE]
    paired: dict = {}
    if reference is not None:
        for name, res in results.items():
            if name != REFERENCE:
                paired[name] = paired_comparison(res["runs"], reference["runs"], kinds)
        (args.out / "results.json").write_text(
            json.dumps(
                {"args": vars(args), "results": results, "paired_vs_reference": paired},
                indent=2,
                default=str,
            )
        )
    _print_table(results, kinds, len(splits["classes"]), seeds)
    for name, cmp in paired.items():
        print(f"\n{name} - reference (paired by seed {cmp['seeds']}; 95% bootstrap over images):")
        for k in kinds:
            for metric in ("auroc", "bacc"):
                c = cmp[f"{k}_{metric}"]
                print(
                    f"  {k:12s} {metric:6s} {c['diff']:+.3f} (seed std {c['seed_std']:.3f}, "
                    f"CI {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f})"
                )


if __name__ == "__main__":
    main()
