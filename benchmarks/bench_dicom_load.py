"""Time ``load_cxr`` against pydicom's bare ``dcmread(...).pixel_array`` on the same real CR.

Interleaved repetitions in one run (A, B, A, B, ...) so that machine load hits both alike;
prints both medians and the ratio. Target: ratio <= 1.5.

    .venv/bin/python benchmarks/bench_dicom_load.py [--reps 41] [--file RG1_UNCR.dcm]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from cxr_io.readers import load_cxr
from cxr_io.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--file", default="RG1_UNCR.dcm", help="a pydicom-data file name")
    args = parser.parse_args()

    path = get_testdata_file(args.file, download=False)
    if path is None:
        raise SystemExit(f"{args.file} not found: install pydicom-data (the dev extra)")
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="bench_dicom_")))

    def bare() -> object:
        return pydicom.dcmread(path).pixel_array

    def ours() -> object:
        return load_cxr(path, settings=settings).pixels

    for _ in range(3):  # warm-up: imports, page cache, plugin discovery
        bare()
        ours()
    times: dict[str, list[float]] = {"pydicom": [], "load_cxr": []}
    for _ in range(args.reps):
        for name, func in (("pydicom", bare), ("load_cxr", ours)):
            start = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    shape = load_cxr(path, settings=settings).pixels.shape
    print(f"file: {args.file} {shape[0]}x{shape[1]}, {args.reps} interleaved repetitions")
    print(f"python {platform.python_version()}, pydicom {pydicom.__version__}")
    print(f"pydicom dcmread().pixel_array median: {med['pydicom']:.2f} ms")
    print(f"load_cxr (float32 [0,1], VOI, inverted) median: {med['load_cxr']:.2f} ms")
    print(f"ratio load_cxr / pydicom: {med['load_cxr'] / med['pydicom']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
