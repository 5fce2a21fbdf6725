"""The counts of docs/reliability.md: the bad-input corpus and every pydicom / pydicom-data test
file through batch runs, two concurrent runs on one output folder, planted identifiers.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/reliability_counts.py

Prints, per input set: files tried, classified, and the other files by kind and error type;
whole-run failures (an exception out of ``run_batch``), hangs (a run still going after
``--hang-s``), non-radiographs classified (a classified row whose Modality is not CR/DX or whose
BodyPartExamined is not a chest), planted identifiers found in stderr, log records, warnings
or any output file; then how many of two simultaneous runs on one ``--out`` were refused.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd


def make_model(folder: Path, seed: int = 0) -> Path:
    import torch

    from classification.model_card import write_model_card
    from classification.models import build_backbone

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "best_model.pt"
    torch.save(build_backbone("small_cnn", 3, in_channels=1).state_dict(), ckpt)
    write_model_card(
        ckpt, backbone="small_cnn", size=64, classes=["a", "b", "c"], method="standard"
    )
    return ckpt


@contextlib.contextmanager
def captured(path: Path):
    """Send fd 2, sys.stderr, every log record (DEBUG and up) and every warning to ``path``."""
    fh = open(path, "w", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    saved_fd, saved_err = os.dup(2), sys.stderr
    os.dup2(fh.fileno(), 2)
    sys.stderr = fh
    handler = logging.StreamHandler(fh)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            fh.write(f"WARNING {w.message}\n")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        sys.stderr = saved_err
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        fh.close()


def one_set(name: str, inputs, model: Path, work: Path, hang_s: int, planted) -> dict:
    from pipeline.batch import run_batch

    out = work / f"out_{name}"
    log = work / f"stderr_{name}.txt"
    failure, hang = "", False

    def alarm(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(hang_s)
    t0 = time.perf_counter()
    try:
        with captured(log):
            run_batch(inputs, model, out, batch_size=8, heatmaps=True, progress=True)
    except TimeoutError:
        hang = True
    except Exception as exc:  # a whole-run failure: what this script counts
        failure = type(exc).__name__
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - t0
    preds = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    errs = pd.read_csv(out / "errors.csv", dtype=str, keep_default_na=False)
    chest = preds["body_part"].str.upper().str.contains("CHEST|THORAX|LUNG")
    non_radiograph = int((~preds["modality"].isin(["CR", "DX"]) | ~chest).sum())
    blobs = [log.read_bytes().lower()] + [
        p.read_bytes().lower() for p in out.rglob("*") if p.is_file()
    ]
    found = sum(v.encode() in b for v in planted for b in blobs)
    return {
        "name": name,
        "files": len(preds) + len(errs),
        "classified": len(preds),
        "kinds": Counter(errs["kind"]),
        "errors": Counter(zip(errs["kind"], errs["error"], strict=True)),
        "failure": failure or "none",
        "hang": hang,
        "non_radiographs_classified": non_radiograph,
        "planted_found": found,
        "seconds": seconds,
    }


def concurrent(inputs: Path, model: Path, out: Path) -> list[int]:
    """Start two CLI runs on one --out at the same moment; their exit codes."""
    code = "from pipeline.batch_cli import batch_app; batch_app()"
    args = ["run", str(inputs), "--model", str(model), "--out", str(out), "--no-progress"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    return sorted(p.wait() for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hang-s", type=int, default=900)
    args = ap.parse_args()
    from tests.bad_inputs import PLANTED_STRINGS, make_corpus, pydicom_test_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expect = make_corpus(work / "corpus")
        model = make_model(work / "model")
        files = pydicom_test_files()
        results = [
            one_set("corpus", work / "corpus", model, work, args.hang_s, PLANTED_STRINGS),
            one_set("pydicom", files, model, work, args.hang_s, PLANTED_STRINGS),
        ]
        codes = concurrent(work / "corpus", model, work / "out_concurrent")
    print(f"corpus cases: {len(expect)}; pydicom + pydicom-data files: {len(files)}")
    for r in results:
        print(f"\n== {r['name']}: {r['files']} files tried, {r['classified']} classified")
        for kind, n in sorted(r["kinds"].items()):
            print(f"  {kind}: {n}")
        for (kind, error), n in sorted(r["errors"].items()):
            print(f"    {kind:10s} {error:24s} {n}")
        print(f"  whole-run failure: {r['failure']}; hang: {r['hang']}; {r['seconds']:.0f} s")
        print(f"  non-radiographs classified: {r['non_radiographs_classified']}")
        print(
            f"  planted identifiers found (stderr, logs, warnings, outputs): {r['planted_found']}"
        )
    print(f"\ntwo simultaneous runs on one --out: exit codes {codes} (6 = refused, locked)")


if __name__ == "__main__":
    main()
