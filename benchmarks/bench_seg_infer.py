"""Segmentation inference throughput on this CPU.

Segments N synthetic 512x512 DICOM films with the full inference path (read + VOI, resize,
U-Net, sigmoid, resize back, post-processing, quality flags) at network sizes 256 and 512, with
data loading in the main process (``num_workers=0``) and overlapped with compute in DataLoader
worker processes. Prints images/s and the fraction of wall time spent inside the network, and
(with ``--write-docs``) replaces the "Segmentation inference" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_seg_infer.py --n 32 --write-docs
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Segmentation inference"


class TimedNet(torch.nn.Module):
    """Wraps a network and adds up the wall time of its forward passes."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        y = self.net(x)
        self.seconds += time.perf_counter() - t
        return y


def run_once(files: list[str], ckpt: Path, size: int, workers: int, batch: int) -> dict:
    from segmentation.infer import ResultCollector, build_infer_evaluator
    from segmentation.model import load_seg_model

    net, spec = load_seg_model(ckpt)
    spec = replace(spec, spatial_size=(size, size))
    timed = TimedNet(net).eval()
    collector = ResultCollector(sink=lambda r: None)
    ev = build_infer_evaluator(
        timed,
        [{"image": f, "source": f} for f in files],
        spec.spatial_size,
        batch_size=batch,
        num_workers=workers,
        handlers=[collector],
    )
    t = time.perf_counter()
    ev.run()
    wall = time.perf_counter() - t
    return {
        "size": size,
        "workers": workers,
        "wall": wall,
        "ips": len(files) / wall,
        "model_frac": timed.seconds / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the network")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--ckpt", type=Path, default=ROOT / "models" / "seg_unet_synthetic.pt")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cxr_io.manifest import load_manifest
    from synthetic import default_sites, make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_dataset(
            Path(tmp),
            default_sites()[2:],
            n_per_site=args.n,
            size=512,
            seed=0,
            workers=1,
            progress=False,
        )
        files = list(load_manifest(manifest, check_mask_sizes=False)["image"])
        run_once(files[:4], args.ckpt, args.sizes[0], 0, args.batch)  # warm-up
        rows = [
            run_once(files, args.ckpt, s, w, args.batch) for s in args.sizes for w in args.workers
        ]

    cpu = platform.processor() or platform.machine()
    head = (
        f"{args.n} synthetic 512x512 DICOM films, batch {args.batch}, torch threads "
        f"{args.threads}, {os.cpu_count()} logical CPUs ({cpu}, shared with other jobs), "
        f"torch {torch.__version__}"
    )
    lines = [
        head,
        "",
        "| network size | DataLoader workers | images/s | wall s | time in model |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}x{r['size']} | {r['workers']} | {r['ips']:.1f} | "
            f"{r['wall']:.2f} | {100 * r['model_frac']:.0f}% |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_section(table)


def write_section(table: str) -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    body = (
        f"{SECTION}\n\nMeasured by `.venv/bin/python benchmarks/bench_seg_infer.py --write-docs` "
        "(full path: DICOM read + VOI, resize, U-Net, resize back, post-processing, quality "
        "flags; `models/seg_unet_synthetic.pt`).\n\n" + table + "\n"
    )
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    text = (
        pattern.sub(body.rstrip("\n"), text)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + body)
    )
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text if text.endswith("\n") else text + "\n")
    print(f"updated {docs}")


if __name__ == "__main__":
    main()
