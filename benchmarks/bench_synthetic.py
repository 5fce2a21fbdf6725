"""Time the default demo set: 3 sites x 300 images at 256 x 256 with 2 worker processes.

Run: ``.venv/bin/python benchmarks/bench_synthetic.py [--n-per-site N] [--workers W]``.
Prints wall seconds, images per second, the single-image render time (no file I/O) and the CPU
seconds of all processes (wall time on a shared machine depends on its load; CPU time does not).
Target: the default set in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    from synthetic import default_sites, image_seed, make_dataset, render_case

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-per-site", type=int, default=300)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    sites = default_sites()
    t0 = time.perf_counter()
    for k in range(20):
        render_case(sites[k % 3], "covid", image_seed(0, sites[k % 3], k), size=args.size)
    per_image = (time.perf_counter() - t0) / 20

    with tempfile.TemporaryDirectory() as tmp:
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        manifest = make_dataset(
            Path(tmp) / "demo",
            sites,
            n_per_site=args.n_per_site,
            size=args.size,
            seed=0,
            workers=args.workers,
            progress=False,
        )
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = sum(
            (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in ((c0, c1), (s0, s1))
        )
        n = len(manifest.read_text().splitlines()) - 1
        mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20

    print(f"cpu_count={os.cpu_count()} workers={args.workers} size={args.size}")
    print(f"render_case (1 process, no I/O): {per_image * 1000:.1f} ms/image")
    print(f"make_dataset: {n} images in {wall:.1f} s wall ({n / wall:.1f} img/s), {mb:.1f} MiB")
    print(
        f"make_dataset CPU time (all processes): {cpu:.1f} s "
        f"= {cpu / args.workers:.1f} s per worker (the wall time on {args.workers} idle cores); "
        f"load average at end {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
