"""Does the classifier's mask resize keep the finding inside the lungs?

The study renders 256 px films, segments them at that size and trains the classifier at 64 px: the
image is area-resized (a border pixel that is partly lung gets part of the finding's density), the
mask used to be nearest-resized (that pixel could become background, so the ISNet was penalised
for looking at it and segment-then-classify zeroed it). This script renders each film with and
without its finding (same seed, so they differ only by the finding), area-resizes the finding's
added density to the classifier size and reports the fraction of it inside the mask resized
(1) by nearest neighbour and (2) by :func:`classification.inputs.resize_mask` ("any part is
lung"), for the ground-truth mask and for the committed U-Net's mask.

    .venv/bin/python benchmarks/mask_resize_coverage.py --n 40 --film-size 256 --size 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """The previous resize: nearest neighbour, ``[H, W]`` -> bool ``[S, S]``."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5


def main() -> None:
    from monai.data import MetaTensor

    from classification.inputs import resize_image, resize_mask
    from segmentation.segmenter import LungSegmenter
    from synthetic import default_sites, image_seed, portable_site, render_case

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="films (classes alternate pneumonia/covid)")
    ap.add_argument("--film-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="classifier input size")
    ap.add_argument(
        "--site", default="hospital-c", help="a default site or hospital-d (the portable site)"
    )
    ap.add_argument("--seed", type=int, default=1000, help="image seed (the study trains on 0)")
    ap.add_argument("--difficulty", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sites = {s.name: s for s in [*default_sites(), portable_site()]}
    if args.site not in sites:
        raise SystemExit(f"--site {args.site!r}: choose one of {', '.join(sites)}")
    site = sites[args.site]
    segmenter = LungSegmenter.load()
    cov: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i in range(args.n):
        label = ("pneumonia", "covid")[i % 2]
        ss = image_seed(args.seed, site, i)
        kw = {"size": args.film_size, "difficulty": args.difficulty}
        with_f = render_case(site, label, ss, **kw)
        without = render_case(site, label, ss, with_finding=False, **kw)
        added = with_f.display - without.display
        small = resize_image(torch.from_numpy(added)[None], args.size)[0].numpy().clip(0, None)
        if small.sum() < 1e-3:
            continue
        unet = segmenter([MetaTensor(torch.from_numpy(with_f.display)[None])])[0]["seg"]
        for source, mask in (("ground truth", with_f.mask), ("U-Net", unet)):
            for how, m in (
                ("nearest", nearest(mask, args.size)),
                ("any part is lung", resize_mask(mask, args.size)[0].numpy() > 0.5),
            ):
                cov.setdefault(f"{source}, {how}", []).append(
                    float((small * m).sum() / small.sum())
                )
    print(
        f"{args.site}, {args.n} films at {args.film_size} px, classifier {args.size} px, "
        f"difficulty {args.difficulty}, image seed {args.seed} ({time.perf_counter() - t0:.0f} s)"
    )
    print("| mask, resize | coverage mean | min | films < 0.95 |")
    print("|---|---|---|---|")
    for key, values in cov.items():
        v = np.asarray(values)
        print(f"| {key} | {v.mean():.3f} | {v.min():.3f} | {(v < 0.95).sum()} of {len(v)} |")


if __name__ == "__main__":
    main()
