"""How much faster does a study train with ``workers=2`` (two processes, one thread each) than
serially (one process, PyTorch's default threads)? Measured side by side in one run.

Generates a small embedded data set (``--n-per-site`` images per site, 256 px, ground-truth
masks), then trains the five models of ``configs/study.json`` (standard, segment-then-classify,
RRR, ISNet, the bias-free reference) for ``--epochs`` epochs at 64 px: once through the study's
serial path, once with ``workers=2`` and ``threads=1``. Prints the wall time of each training
phase and the ratio; evaluation and reporting are the same in both and left out.

    PYTHONPATH=$PWD python benchmarks/bench_study_workers.py --n-per-site 100 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from classification.train import TrainConfig
from cxr_io.manifest import class_names, load_manifest
from pipeline.study import (
    StudyConfig,
    plan_folds,
    prepare_data,
    synthetic_layout,
    train_models,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-site", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()

    raw = json.loads((ROOT / "configs" / "study.json").read_text())["study_def"]
    raw["synthetic"] = {**raw["synthetic"], "n_per_site": args.n_per_site, "bias_test_n": 10}
    raw["masks"] = "manifest"  # ground-truth masks: no segmentation in the timing
    cfg = StudyConfig.from_dict(raw)
    cfg = replace(cfg, **synthetic_layout(cfg.synthetic))
    quiet = lambda _line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        manifests = prepare_data(cfg, out, quiet)
        df = pd.concat([load_manifest(m) for m in manifests], ignore_index=True)
        classes = class_names(df)
        folds = plan_folds(cfg, df)
        times = {}
        for label, workers, threads in (("serial", 1, 0), ("parallel", 2, 1)):
            train_cfg = {**cfg.train, "epochs": args.epochs, "threads": threads}
            run_cfg = replace(cfg, train=train_cfg, workers=workers)
            base = TrainConfig(**train_cfg)
            t0 = time.perf_counter()
            train_models(run_cfg, folds, base, out / label, classes, quiet)
            times[label] = time.perf_counter() - t0
            print(
                f"{label}: {workers} worker(s), threads {threads or torch.get_num_threads()}"
                f" -> {times[label]:.1f} s",
                flush=True,
            )
    print(
        f"{len(cfg.methods)} study models x {args.epochs} epochs, {args.n_per_site} images/site, "
        f"{os.cpu_count()} cores: serial {times['serial']:.1f} s, parallel "
        f"{times['parallel']:.1f} s, speed-up x{times['serial'] / times['parallel']:.2f}"
    )


if __name__ == "__main__":
    main()
