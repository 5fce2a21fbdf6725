"""Cross-site lung segmentation: train on two synthetic sites, test on the held-out third.

Generates the synthetic set (synthetic), trains the U-Net through the bundle config
``configs/train_seg.json`` (CPU, small), segments every image of the held-out site with the full
inference path (resize, threshold, post-processing) and prints Dice / IoU / HD95. Then segments the
real radiographs shipped with pydicom-data (RG1: adult chest CR; RG3: knee CR) and writes overlay
previews to docs/images/, printing the quality flags.

    .venv/bin/python benchmarks/seg_cross_site.py --out outputs/seg_cross_site \
        --size 128 --n-per-site 100 --epochs 30 --save-model models/seg_unet_synthetic.pt

Prints numbers; asserts nothing. Keep the defaults modest: the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "seg_cross_site")
    ap.add_argument("--size", type=int, default=128, help="synthetic image side and network size")
    ap.add_argument("--n-per-site", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-site", default="hospital-c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-model", type=Path, default=None, help="copy the best checkpoint here")
    ap.add_argument("--max-model-mb", type=float, default=5.0)
    ap.add_argument("--images-dir", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--skip-train", action="store_true", help="reuse <out>/run/models/model.pt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cxr_io.manifest import load_manifest
    from segmentation.metrics import score_mask, summarise
    from segmentation.train import train_seg
    from synthetic import default_sites, make_dataset

    data_dir = args.out / "data"
    manifest = data_dir / "manifest.csv"
    t0 = time.perf_counter()
    if not manifest.is_file():
        make_dataset(
            data_dir,
            default_sites(),
            n_per_site=args.n_per_site,
            size=args.size,
            seed=args.seed,
            workers=args.threads,
            progress=False,
        )
    print(f"data: {manifest} ({time.perf_counter() - t0:.1f} s)")
    df = load_manifest(manifest, check_mask_sizes=False)
    sites = sorted(set(df["site"]))
    train_sites = [s for s in sites if s != args.test_site]
    print(f"train sites: {train_sites}   held-out test site: {args.test_site}")

    run_dir = args.out / "run"
    ckpt = run_dir / "models" / "model.pt"
    if not args.skip_train:
        shutil.rmtree(run_dir, ignore_errors=True)
        t1 = time.perf_counter()
        ckpt = train_seg(
            data_dir,
            run_dir,
            spatial_size=[args.size, args.size],
            train_sites=train_sites,
            val_sites=train_sites,
            seed=args.seed,
            batch_size=args.batch_size,
            patience=max(5, args.epochs // 4),
            **{"train#trainer#max_epochs": args.epochs},
        )
        print(f"training: {time.perf_counter() - t1:.1f} s -> {ckpt}")
    best = json.loads((ckpt.with_suffix(".json")).read_text())
    print(f"model spec: {best}")

    from cxr_io.readers import load_mask
    from segmentation.infer import predict_files

    test = df[df["site"] == args.test_site].reset_index(drop=True)
    t2 = time.perf_counter()
    results = predict_files(list(test["image"]), ckpt, batch_size=8)
    dt = time.perf_counter() - t2
    scores = [score_mask(r.mask, load_mask(m)) for r, m in zip(results, test["mask"], strict=True)]
    summary = summarise(scores)
    flagged = sum(1 for r in results if not r.quality.ok)
    print(f"held-out site {args.test_site}: {len(results)} images, inference {dt:.1f} s")
    print(
        f"  Dice mean {summary['dice_mean']:.4f} (median {summary['dice_median']:.4f}, "
        f"min {summary['dice_min']:.4f})  IoU mean {summary['iou_mean']:.4f}  "
        f"HD95 mean {summary['hd95_mean']:.2f} px (max {summary['hd95_max']:.2f}, "
        f"undefined {int(summary['hd95_undefined'])})  flagged {flagged}/{len(results)}"
    )
    for site in train_sites:  # in-distribution reference: the training sites' test split
        part = df[(df["site"] == site) & (df["split"] == "test")]
        res = predict_files(list(part["image"]), ckpt, batch_size=8)
        s = summarise(
            [score_mask(r.mask, load_mask(m)) for r, m in zip(res, part["mask"], strict=True)]
        )
        print(
            f"  (train site {site}, test split: Dice {s['dice_mean']:.4f}, "
            f"HD95 {s['hd95_mean']:.2f} px)"
        )

    size_mb = ckpt.stat().st_size / 1e6
    print(f"checkpoint size: {size_mb:.2f} MB")
    if args.save_model:
        if size_mb < args.max_model_mb:
            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, args.save_model)
            shutil.copyfile(ckpt.with_suffix(".json"), args.save_model.with_suffix(".json"))
            print(f"saved {args.save_model}")
        else:
            print(f"NOT saved: {size_mb:.2f} MB >= {args.max_model_mb} MB")

    real_films(ckpt, args.images_dir)


def real_films(ckpt: Path, images_dir: Path) -> None:
    """Segment pydicom-data's RG1 (chest CR) and RG3 (knee CR); write overlays; print flags."""
    try:
        from pydicom.data import get_testdata_file

        files = {
            "rg1_chest": get_testdata_file("RG1_UNCR.dcm", download=False),
            "rg3_knee": get_testdata_file("RG3_UNCR.dcm", download=False),
        }
    except Exception as exc:  # pydicom-data not installed
        print(f"real films skipped: {exc}")
        return
    from cxr_io.readers import load_cxr
    from evaluation.figures import save_overlay
    from segmentation.infer import predict_files

    names = [n for n, f in files.items() if f]
    results = predict_files([files[n] for n in names], ckpt, batch_size=1)
    for name, r in zip(names, results, strict=True):
        q = r.quality
        caption = "OK" if q.ok else "FLAGGED: " + ", ".join(q.flags)
        out = save_overlay(
            load_cxr(files[name]).pixels,
            r.mask,
            images_dir / f"seg_{name}.png",
            max_size=512,
            caption=caption,
        )
        print(
            f"{name}: area {q.area_fraction:.3f}, components {q.n_components} "
            f"(raw {q.n_raw_components}), balance {q.lr_balance:.2f}, confidence "
            f"{q.mean_confidence:.3f}, flags {q.flags or 'none'} -> {out}"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
