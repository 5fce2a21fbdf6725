"""Is the ISNet's balanced-accuracy gap a threshold (calibration) problem?

For every model of a finished study (the models in ``OUT/models``, keyed by their training
config, as :func:`pipeline.study.planned_runs` names them), fits bias-corrected temperature
scaling (BCTS: one temperature ``T`` and one bias per class, ``softmax(log p / T + b)``, by
maximum likelihood; Alexandari, Kundaje & Shrikumar, "Maximum likelihood with bias-corrected
calibration is hard-to-beat at label shift adaptation", ICML 2020) on the fold's VALIDATION
rows (the split the study selects models on; never a test set), then reports macro AUROC,
balanced accuracy and ECE on every evaluation set, without and with it, as mean over seeds.

    PYTHONPATH=$PWD python benchmarks/calibration_check.py configs/study.json outputs/study3 \
        --set 'study_def#seeds=[0,1,2]' --csv docs/study/calibration.csv

It trains nothing: a model the study has not trained is reported missing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from classification.model_card import load_model
from classification.train import TrainConfig
from cxr_io.manifest import class_names, load_manifest, to_records
from evaluation.metrics import evaluate
from pipeline.cli import apply_overrides
from pipeline.predictor import Predictor
from pipeline.study import (
    ensure_masks,
    plan_folds,
    planned_runs,
    predict_records,
    prepare_data,
    synthetic_layout,
)


def fit_bcts(probs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """``(T, b)`` minimising the cross-entropy of ``softmax(log probs / T + b)`` on ``labels``.

    probs: ``[N, K]`` softmax outputs; labels: ``[N]`` class indices."""
    z = torch.tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp() + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp()), b.detach().numpy()


def apply_bcts(probs: np.ndarray, T: float, b: np.ndarray) -> np.ndarray:
    """``[N, K]`` probabilities after the fitted temperature and biases."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) / T + b
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", help="the study's bundle config, e.g. configs/study.json")
    ap.add_argument("out", type=Path, help="the study's --out folder (its models are reused)")
    ap.add_argument("--set", action="append", default=[], help="as in 'isnet-cxr study run'")
    ap.add_argument("--csv", type=Path, help="write the per-model rows here")
    args = ap.parse_args(argv)

    parser = ConfigParser()
    parser.read_config(args.config)
    apply_overrides(parser, args.set)
    cfg = parser.get_parsed_content("study")
    if not (cfg.manifests or cfg.train_sites or cfg.external_sites or cfg.leave_one_site_out):
        cfg = replace(cfg, **synthetic_layout(cfg.synthetic))
    quiet = lambda _line: None  # noqa: E731
    data = prepare_data(cfg, args.out, quiet)
    df = pd.concat([load_manifest(m) for m in ensure_masks(cfg, data, args.out, quiet)])
    classes = class_names(df)
    base = TrainConfig(**cfg.train)
    rows = []
    for fold in plan_folds(cfg, df.reset_index(drop=True)):
        for spec, seed, _tcfg, run_dir in planned_runs(cfg, fold, base, args.out):
            if not (run_dir / "done.json").is_file():
                print(f"missing (not trained by the study): {run_dir}", file=sys.stderr)
                continue
            predictor = Predictor(*load_model(run_dir / "best_model.pt"))
            val = predict_records(predictor, to_records(fold.training_rows(spec)[1], classes))
            T, b = fit_bcts(val.probs, val.labels)
            print(f"{spec.display} seed {seed}: T={T:.3f} b={np.round(b, 2).tolist()}", flush=True)
            for ev in fold.evals:
                pred = predict_records(predictor, to_records(ev.frame, classes))
                for mode, probs in (("none", pred.probs), ("bcts", apply_bcts(pred.probs, T, b))):
                    m = evaluate(probs, pred.labels, None, classes, n_boot=1, seed=0).as_dict()
                    rows.append(
                        {
                            "fold": fold.name,
                            "method": spec.display,
                            "seed": seed,
                            "dataset": ev.name,
                            "calibration": mode,
                            "T": T,
                            "auroc_macro": m["auroc_macro"],
                            "balanced_accuracy": m["balanced_accuracy"],
                            "ece": m["ece"],
                        }
                    )
    res = pd.DataFrame(rows)
    if args.csv:
        res.to_csv(args.csv, index=False)
    table = res.groupby(["method", "dataset", "calibration"])[
        ["auroc_macro", "balanced_accuracy", "ece"]
    ].mean()
    print(table.unstack("calibration").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
