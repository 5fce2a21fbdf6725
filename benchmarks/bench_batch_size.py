"""How much results change with --batch-size (docs/reliability.md, "Results and batch size").

32 synthetic 128 x 128 films, three untrained ``small_cnn`` seeds, heatmaps on; batch sizes 1,
4 and 16; prints the largest difference of the probabilities, background share and lung area.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_batch_size.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.reliability_counts import make_model
from pipeline.batch import run_batch
from tests.bad_inputs import chest_like
from tests.dicom_factory import write_cxr_dicom


def main() -> None:
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rng = np.random.default_rng(0)
        (d / "t").mkdir()
        for i in range(32):
            write_cxr_dicom(d / "t" / f"IM{i:02d}", chest_like(rng, 128), BitsStored=12)
        for seed in (0, 1, 2):
            model = make_model(d / f"m{seed}", seed)
            tabs = {}
            for bs in (1, 4, 16):
                out = d / f"o{seed}_{bs}"
                run_batch(d / "t", model, out, batch_size=bs, progress=False)
                tabs[bs] = pd.read_csv(out / "predictions.csv").sort_values("rel_path")
            probs = [c for c in tabs[1].columns if c.startswith("prob_")]
            for bs in (4, 16):
                a, b = tabs[1], tabs[bs]

                def diff(cols: list[str], a=a, b=b) -> float:
                    return float(np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max())

                same = bool((a["pred"].to_numpy() == b["pred"].to_numpy()).all())
                print(
                    f"seed {seed}: batch 1 vs {bs}: probs {diff(probs):.1e}, background_share "
                    f"{diff(['background_share']):.1e}, lung area "
                    f"{diff(['lung_area_fraction']):.1e}, same classes {same}"
                )


if __name__ == "__main__":
    main()
