"""Peak memory of a batch run over very large radiographs (issue 11, finding 7).

Writes ``--files`` DICOMs of about ``--megapixels`` each (a chest-like 12-bit film, CR, CHEST),
then runs ``run_batch`` over them in a child process and prints the child's peak resident set
size (``ru_maxrss``), next to the same run over small (64 x 64) films, which shows the cost of
the libraries and the two networks alone.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_batch_memory.py \\
        --megapixels 99.8 --files 3 --batch-size 16

``--code DIR`` runs the child with another checkout on its PYTHONPATH (e.g. the code before the
fix, extracted with ``git archive``), for a before/after comparison.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
from pipeline.batch import run_batch
t0 = time.perf_counter()
s = run_batch(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=int(sys.argv[4]), progress=False)
print(f"predictions={s.predictions} errors={s.errors_by_kind} seconds={time.perf_counter()-t0:.1f}")
"""


def chest_film(side_rows: int, side_cols: int, seed: int) -> np.ndarray:
    """A chest-like uint16 film ``[rows, cols]``: a 256 x 256 phantom blown up by repetition
    (cheap to make at 100 megapixels), plus a little noise so it is not piecewise constant."""
    from tests.bad_inputs import chest_like

    small = chest_like(np.random.default_rng(seed), 256)
    rows = (np.arange(side_rows) * 256 // side_rows).astype(np.intp)
    cols = (np.arange(side_cols) * 256 // side_cols).astype(np.intp)
    film = small[rows[:, None], cols[None, :]]
    film += np.random.default_rng(seed).integers(0, 8, film.shape, dtype=np.uint16)
    return film


def make_inputs(folder: Path, n: int, rows: int, cols: int) -> None:
    from tests.dicom_factory import write_cxr_dicom

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        film = chest_film(rows, cols, i)
        write_cxr_dicom(folder / f"IM{i:04d}", film, BitsStored=12, InstanceNumber=i + 1)
        del film


def make_model(folder: Path) -> Path:
    import torch

    from classification.model_card import write_model_card
    from classification.models import build_backbone

    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3, in_channels=1)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "best_model.pt"
    torch.save(net.state_dict(), ckpt)
    write_model_card(
        ckpt, backbone="small_cnn", size=224, classes=["a", "b", "c"], method="standard"
    )
    return ckpt


def peak_rss_of_run(
    inputs: Path, model: Path, out: Path, batch_size: int, code: Path
) -> tuple[float, str]:
    """Run the batch in a child; its peak RSS in GiB and its one-line result."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(inputs), str(model), str(out), str(batch_size)],
        env=env,
        capture_output=True,
        text=True,
        cwd=code,
    )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        return float("nan"), proc.stderr.strip().splitlines()[-1]
    # ru_maxrss of children is the largest of any child so far: run the big case last
    return max(peak_kib, before) / 2**20, proc.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", type=float, default=99.8)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--code", type=Path, default=Path.cwd())
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    args = ap.parse_args()
    side = int(round((args.megapixels * 1e6) ** 0.5))
    rows, cols = side, int(round(args.megapixels * 1e6 / side))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        t0 = time.perf_counter()
        make_inputs(tmp / "small", args.files, 64, 64)
        make_inputs(tmp / "large", args.files, rows, cols)
        print(f"inputs written in {time.perf_counter() - t0:.1f} s: {args.files} x {rows} x {cols}")
        print(f"code: {args.code}")
        for name in ("small", "large"):  # small first: ru_maxrss only grows
            gib, line = peak_rss_of_run(
                tmp / name, model, tmp / f"out_{name}", args.batch_size, args.code
            )
            print(f"{name:5s} films: peak RSS {gib:.2f} GiB  ({line})")


if __name__ == "__main__":
    main()
