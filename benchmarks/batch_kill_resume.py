"""SIGKILL (and one SIGINT) at random points of ``isnet-cxr batch run``, then resume: are the
final tables those of an uninterrupted run?

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/batch_kill_resume.py

Makes a folder of ``--films`` synthetic chest films (``synthetic.render_case``, 12-bit CR
DICOM) plus 9 odd files that end in ``errors.csv`` (a knee, a lateral view, a blank body part,
a truncated file, an image without lungs; copies of a classified film, of the lateral, of the
image without lungs and of the knee), runs ``python -m pipeline.cli batch run DIR --model M
--out OUT`` once without interruption (the reference), then starts the same command on a fresh
``--out`` as a subprocess and interrupts it (SIGKILL; the very last interruption is a SIGINT,
Ctrl-C) at random points (seeded by ``--seed``), restarting it each time, until the run's share
of ``--kills`` has landed on a running process; then resumes it until it exits 0. At least
``--runs`` runs; a run that finishes before its kills hands them on to the next.

A fifth of the interruptions land in start-up (a delay uniform in 0..the reference's time to
its first row on disk); the others are spread over the run: each waits for a row count drawn
at random (sorted, so each start gets further), then a random part of one chunk's time, so
kills land in reading, inference and writing.

Prints each start (signal, phase, seconds after the start, rows on disk before and at the
signal, exit code), then per run, against the reference: rows lost, rows duplicated (a file
with more than one row in ``predictions.csv`` + ``errors.csv``), rows added (files the
reference has no row for), rows differing (another table, kind, error, reason, class, pseudo
id, lung area, flags; a probability more than ``--tol`` = 2e-6 apart, the documented
batch-size tolerance; a ``background_share`` more than 1e-4 apart), classified images
without their mask or overlay, and temporary files left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BS_TOL = 1e-4  # background_share between batch compositions (docs/reliability.md)


def make_folder(folder: Path, films: int, size: int, seed: int) -> int:
    """``films`` synthetic chest CRs and 9 odd files; returns the number of files."""
    from synthetic import CLASSES, default_sites, image_seed, render_case
    from tests.bad_inputs import chest_like
    from tests.dicom_factory import write_cxr_dicom

    folder.mkdir(parents=True)
    site = default_sites()[0]
    for i in range(films):
        case = render_case(site, CLASSES[i % 3], image_seed(seed, site, i), size=size)
        stored = np.round(case.display * 4095).astype(np.uint16)
        write_cxr_dicom(folder / f"film_{i:03d}", stored, BitsStored=12)
    rng = np.random.default_rng(seed)
    odd = folder / "a_odd"  # sorted first, their copies ("zz_") last: a kill in between
    odd.mkdir()  # leaves the originals in errors.csv and their copies to a resumed run
    write_cxr_dicom(odd / "knee", chest_like(rng), BitsStored=12, BodyPartExamined="KNEE")
    write_cxr_dicom(odd / "lateral", chest_like(rng), BitsStored=12, ViewPosition="LL")
    write_cxr_dicom(odd / "no_body_part", chest_like(rng), BitsStored=12, BodyPartExamined="")
    bars = ((np.arange(128) * 8 // 128) % 2 * 3000 + 500).astype(np.uint16)
    write_cxr_dicom(odd / "bars", np.tile(bars, (128, 1)), BitsStored=12)
    good = (folder / "film_000").read_bytes()
    (odd / "truncated").write_bytes(good[:-300])
    # copies (same SOPInstanceUID): duplicates, listed last
    shutil.copy(folder / "film_001", folder / "zz_copy_of_film_001")
    shutil.copy(odd / "lateral", folder / "zz_copy_of_lateral")
    shutil.copy(odd / "bars", folder / "zz_copy_of_bars")
    shutil.copy(odd / "knee", folder / "zz_copy_of_knee")
    return films + 9


def rows_on_disk(out: Path) -> int:
    """Complete rows in predictions.csv + errors.csv (header lines not counted)."""
    n = 0
    for name in ("predictions.csv", "errors.csv"):
        path = out / name
        if path.is_file():
            n += max(0, path.read_bytes().count(b"\n") - 1)
    return n


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A job started in the background
    by a non-interactive shell (``cmd &``, ``nohup``) inherits SIGINT *ignored*, and Python then
    installs no KeyboardInterrupt handler: the SIGINT would be a no-op, not an interruption."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Runner:
    """Starts the CLI on one input folder and model; every run writes to its own ``--out``."""

    def __init__(self, folder: Path, model: Path, batch_size: int, env: dict[str, str]) -> None:
        self.folder, self.model, self.batch_size, self.env = folder, model, batch_size, env

    def command(self, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline.cli",
            "batch",
            "run",
            str(self.folder),
            "--model",
            str(self.model),
            "--out",
            str(out),
            "--batch-size",
            str(self.batch_size),
            "--no-progress",
        ]

    def start(self, out: Path, log: Path) -> subprocess.Popen:
        with log.open("ab") as fh:
            return subprocess.Popen(
                self.command(out),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                preexec_fn=_default_sigint,
            )

    def reference(self, out: Path, log: Path) -> tuple[float, float]:
        """One uninterrupted run: (seconds to its first row on disk, seconds in all)."""
        t0 = time.monotonic()
        proc = self.start(out, log)
        first = None
        while proc.poll() is None:
            if first is None and rows_on_disk(out) > 0:
                first = time.monotonic() - t0
            time.sleep(0.05)
        total = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed ({proc.returncode}), see {log}")
        return (first if first is not None else total), total


def wait_for_rows(proc: subprocess.Popen, out: Path, more_than: int) -> float:
    """Wait until ``out`` holds more than ``more_than`` rows or ``proc`` ends; seconds waited."""
    t0 = time.monotonic()
    while proc.poll() is None and rows_on_disk(out) <= more_than:
        time.sleep(0.02)
    return time.monotonic() - t0


def interrupted_run(
    runner: Runner,
    out: Path,
    log: Path,
    kills: int,
    sigint_last: bool,
    timing: tuple[float, float, int],
    rng: np.random.Generator,
) -> list[dict]:
    """Interrupt the CLI ``kills`` times (SIGKILL; the last one SIGINT if ``sigint_last``),
    restarting it each time, then resume until it exits 0. One record per start.

    A fifth of the interruptions land in start-up (a delay uniform in 0..the reference's
    start-up time: imports, lock, reading the tables). The others are spread over the run:
    ``kills`` row counts drawn uniformly in 1..rows-1 and sorted; the i-th waits until that
    many rows are on disk (at least one more than at this start), then a further delay uniform
    in 0..the reference's time for one chunk (reading, networks, writing rows, masks, overlays).
    """
    startup, total_s, n_rows = timing
    chunk_s = (total_s - startup) * runner.batch_size / n_rows
    targets = sorted(int(t) for t in rng.integers(1, n_rows, size=kills))
    events: list[dict] = []
    landed = 0
    while True:
        before = rows_on_disk(out)
        t0 = time.monotonic()
        proc = runner.start(out, log)
        if landed == kills:  # resume to the end
            code = proc.wait(timeout=1800)
            events.append({"signal": "none", "rows_before": before, "exit": code})
            if code == 0:
                return events
            continue
        if before >= n_rows or rng.random() < 0.2:
            phase, delay = "start-up", float(rng.uniform(0, startup))
            delay = max(0.0, t0 + delay - time.monotonic())
        else:
            wait_for_rows(proc, out, max(targets[landed], before + 1) - 1)
            phase, delay = "processing", float(rng.uniform(0, chunk_s))
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            sig = signal.SIGINT if sigint_last and landed == kills - 1 else signal.SIGKILL
            at_kill = rows_on_disk(out)
            proc.send_signal(sig)
            code = proc.wait(timeout=300)
            landed += 1
            events.append(
                {
                    "signal": sig.name,
                    "phase": phase,
                    "after_s": round(time.monotonic() - t0, 2),
                    "rows_before": before,
                    "rows_at_kill": at_kill,
                    "rows_after": rows_on_disk(out),
                    "exit": code,
                }
            )
            continue
        events.append({"signal": "finished first", "rows_before": before, "exit": proc.returncode})
        if proc.returncode == 0:
            return events  # it finished before the kill: this run is done


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype=str, keep_default_na=False)


def _floats(table: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """``[rows, len(cols)]`` floats, NaN for empty cells (error rows, no heatmap)."""
    return table[cols].replace("", "nan").astype(float).to_numpy()


def compare(ref: Path, out: Path, tol: float) -> dict[str, int]:
    """Counts of what differs between the tables of ``out`` and of the reference."""
    tables = {}
    for where in (ref, out):
        preds, errs = read(where, "predictions.csv"), read(where, "errors.csv")
        preds["table"], errs["table"] = "predictions", "errors"
        tables[where] = pd.concat([preds, errs], ignore_index=True).fillna("")
    r, o = tables[ref], tables[out]
    counts = Counter(o["rel_path"])
    duplicated = sum(n - 1 for n in counts.values())
    lost = len(set(r["rel_path"]) - set(o["rel_path"]))
    added = len(set(o["rel_path"]) - set(r["rel_path"]))
    r = r.drop_duplicates("rel_path").set_index("rel_path")
    o = o.drop_duplicates("rel_path").set_index("rel_path")
    common = r.index.intersection(o.index)
    r, o = r.loc[common], o.loc[common]
    probs = [c for c in r.columns if c.startswith("prob_")]
    exact = [c for c in r.columns if c not in (*probs, "background_share")]
    differ = (r[exact] != o[exact]).any(axis=1)
    gaps = {}
    for cols, limit in ((probs, tol), (["background_share"], BS_TOL)):
        a, b = _floats(r, cols), _floats(o, cols)
        gaps[cols[0]] = np.abs(a - b)
        far = (gaps[cols[0]] > limit) | (np.isnan(a) != np.isnan(b))
        differ |= far.any(axis=1)
    max_prob = float(np.nanmax(gaps[probs[0]], initial=0.0)) if len(common) else 0.0
    pids = o.loc[o["table"] == "predictions", "pseudo_id"]
    no_files = sum(
        not (out / "masks" / f"{p}.png").is_file() or not (out / "overlays" / f"{p}.png").is_file()
        for p in pids
    )
    stray = [p.name for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
    return {
        "rows": len(o),
        "lost": lost,
        "duplicated": duplicated,
        "added": added,
        "differing": int(differ.sum()),
        "max_prob_diff": max_prob,
        "classified_without_mask_or_overlay": no_files,
        "temporary_files_left": len(stray),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=96)
    ap.add_argument("--size", type=int, default=128, help="film side in pixels")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.pt")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--kills", type=int, default=10, help="interruptions in all")
    ap.add_argument("--runs", type=int, default=2, help="interrupted runs (fresh --out each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=2e-6, help="probability tolerance")
    ap.add_argument("--keep", type=Path, default=None, help="copy the work folder here")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_files = make_folder(work / "films", args.films, args.size, args.seed)
        env = {**os.environ, "ISNET_CXR_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(":")
        runner = Runner(work / "films", args.model, args.batch_size, env)
        startup, total_s = runner.reference(work / "ref", work / "ref.log")
        ref_rows = rows_on_disk(work / "ref")
        print(
            f"{n_files} files ({args.films} films of {args.size} px + 9 odd files), "
            f"model {args.model}, batch size {args.batch_size}; reference run: {ref_rows} rows, "
            f"first row after {startup:.1f} s, done after {total_s:.1f} s"
        )
        totals: Counter = Counter()
        signals: Counter = Counter()
        remaining, i = args.kills, 0
        while remaining > 0 or i < args.runs:  # a run that ends early hands its kills on
            kills = -(-remaining // max(1, args.runs - i))
            out, log = work / f"run{i}", work / f"run{i}.log"
            events = interrupted_run(
                runner, out, log, kills, kills == remaining, (startup, total_s, ref_rows), rng
            )
            print(f"\n== run {i}: {kills} interruptions planned")
            for e in events:
                print("  " + ", ".join(f"{k} {v}" for k, v in e.items()))
            signals.update(e["signal"] for e in events)
            remaining -= sum(e["signal"] in ("SIGKILL", "SIGINT") for e in events)
            i += 1
            result = compare(work / "ref", out, args.tol)
            print("  vs reference: " + ", ".join(f"{k} {v}" for k, v in result.items()))
            totals.update({k: v for k, v in result.items() if k != "max_prob_diff"})
            totals["max_prob_diff_e7"] = max(
                totals["max_prob_diff_e7"], round(result["max_prob_diff"] * 1e7)
            )
        if args.keep:
            shutil.copytree(work, args.keep, symlinks=True, dirs_exist_ok=True)
    landed = signals["SIGKILL"] + signals["SIGINT"]
    print(
        f"\nkill points survived: {landed} (SIGKILL {signals['SIGKILL']}, SIGINT "
        f"{signals['SIGINT']}) over {i} runs; lost {totals['lost']}, "
        f"duplicated {totals['duplicated']}, added "
        f"{totals['added']}, differing {totals['differing']} (max probability difference "
        f"{totals['max_prob_diff_e7'] / 1e7:.1e}); classified without mask/overlay "
        f"{totals['classified_without_mask_or_overlay']}; temporary files left "
        f"{totals['temporary_files_left']}"
    )


if __name__ == "__main__":
    main()
