"""Pool the runs of one method from several ``bias_experiment.py`` result files and pair them
with another pooled method (seeds paired, 1000 bootstrap resamples of the test images).

``bias_experiment.py`` is often run in pieces (a method's seeds split over two processes, the
reference trained once and reused); this puts the pieces back together:

    python benchmarks/bias_pool.py isnet OUT_A/results.json,OUT_B/results.json \
        reference OUT_REF/results.json

Prints, for each side, macro AUROC and balanced accuracy (mean +- SD over seeds) on the biased /
unbiased / confounding sets, the biased - confounding gap and the background share; then the
paired differences A - B with their 95% CIs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bias_experiment import paired_comparison, summarise  # noqa: E402

KINDS = ("biased", "unbiased", "confounding")


def pool(method: str, files: str) -> list[dict]:
    """Every run of ``method`` in the comma-separated result files."""
    runs: list[dict] = []
    for path in files.split(","):
        runs += json.loads(Path(path).read_text())["results"][method]["runs"]
    return runs


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = pool(argv[0], argv[1]), pool(argv[2], argv[3])
    for name, runs in ((argv[0], a), (argv[2], b)):
        sm = summarise(runs, KINDS)
        seeds = [r["seed"] for r in runs]
        print(f"{name}: seeds {seeds}, selected epochs {[r['best_epoch'] for r in runs]}")
        for m in ("auroc", "bacc"):
            cells = [f"{sm[f'{k}_{m}'][0]:.3f} +- {sm[f'{k}_{m}'][1]:.3f}" for k in KINDS]
            print(f"  {m} b / u / c: " + " / ".join(cells))
        gap = sm["auroc_gap_biased_confounding"]
        bg = sm["unbiased_bg_share"][0]
        print(f"  gap b - c {gap[0]:+.3f} +- {gap[1]:.3f}; bg share (u) {bg:.2f}")
    cmp = paired_comparison(a, b, KINDS, n_boot=1000)
    print(f"{argv[0]} - {argv[2]}, paired seeds {cmp['seeds']}:")
    for key, v in cmp.items():
        if key != "seeds":
            lo, hi = v["ci95"]
            print(f"  {key:22s} {v['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
