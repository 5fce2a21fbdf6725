"""How often the segmenter's quality flags fire on synthetic films (the study's data should pass).

Generates a synthetic set like the study's (phantom anatomy, sites hospital-a/b/c plus the portable
hospital-d, given size and difficulty; cached under ``--out``), segments every image with the
committed U-Net (full inference path, so every flag is computed as in ``seg predict`` and the
study's ``masks`` step) and prints the flag counts per site, with the two lung-field flags
(``lung_base_high``, ``lung_field_mismatch``) apart.

    .venv/bin/python benchmarks/seg_flag_rate.py --out outputs/seg_flag_rate --n-per-site 60 \
        --size 256 --difficulty 0 [--mode ct]

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NEW_FLAGS = ("lung_base_high", "lung_field_mismatch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "seg_flag_rate")
    ap.add_argument("--ckpt", type=Path, default=ROOT / "models" / "seg_unet_synthetic.pt")
    ap.add_argument("--n-per-site", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--difficulty", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="phantom", choices=["phantom", "ct"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cxr_io.manifest import load_manifest
    from segmentation.infer import predict_files
    from synthetic import default_sites, make_dataset, portable_site

    name = f"{args.mode}_{args.size}px_d{args.difficulty:g}_n{args.n_per_site}_s{args.seed}"
    data_dir = args.out / name
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        make_dataset(
            data_dir,
            sites=[*default_sites(), portable_site()],
            n_per_site=args.n_per_site,
            size=args.size,
            seed=args.seed,
            difficulty=args.difficulty,
            workers=1,
            mode=args.mode,
        )
    df = load_manifest(manifest, check_mask_sizes=False)
    t0 = time.perf_counter()
    results = predict_files(list(df["image"]), args.ckpt, batch_size=4)
    dt = time.perf_counter() - t0
    print(f"{name}: {len(results)} films segmented in {dt:.1f} s ({args.ckpt.name})")
    per_site: dict[str, Counter] = {}
    for site, r in zip(df["site"], results, strict=True):
        c = per_site.setdefault(site, Counter())
        c["films"] += 1
        c["flagged"] += int(not r.quality.ok)
        c["flagged_new"] += int(any(f in NEW_FLAGS for f in r.quality.flags))
        c["flagged_old"] += int(any(f not in NEW_FLAGS for f in r.quality.flags))
        for f in r.quality.flags:
            c[f"flag:{f}"] += 1
    cov = np.array([r.quality.field_coverage for r in results])
    gap = np.array([r.quality.base_gap_ratio for r in results])
    out = np.array([r.quality.outside_body for r in results])

    def stat(values: np.ndarray, fn) -> str:
        """``fn`` over the defined values, 'n/a' when none is."""
        ok = values[~np.isnan(values)]
        return f"{fn(ok):.2f}" if ok.size else "n/a"

    print(
        f"  lung-field measures: coverage min {stat(cov, np.min)} (median "
        f"{stat(cov, np.median)}, {int(np.isnan(cov).sum())} films without a credible estimate),"
        f" base-gap ratio max {stat(gap, np.max)}, outside-body max {stat(out, np.max)}"
    )
    total = sum(per_site.values(), Counter())
    for site, c in [*sorted(per_site.items()), ("all", total)]:
        flags = ", ".join(f"{k[5:]} {v}" for k, v in sorted(c.items()) if k.startswith("flag:"))
        print(
            f"  {site:12s} films {c['films']:4d}  flagged {c['flagged']:3d} "
            f"(lung-field flags {c['flagged_new']}, other flags {c['flagged_old']})"
            f"{'  [' + flags + ']' if flags else ''}"
        )


if __name__ == "__main__":
    main()
