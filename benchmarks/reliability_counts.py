"""The counts of docs/reliability.md: the bad-input corpus, every pydicom / pydicom-data test
file and a seeded set of mutated valid DICOM files through the reader and batch runs, two
concurrent runs on one output folder, planted identifiers.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/reliability_counts.py

Three input sets: ``corpus`` (``tests/bad_inputs.py``), ``pydicom`` (every file shipped with
pydicom and pydicom-data) and ``mutated`` (``--mutated`` files, default 180: three valid 12-bit
chest CRs, plain, windowed + rescaled and RLE, each file with a new SOPInstanceUID and one
change drawn by ``tests.dicom_mutations.random_change`` with ``--seed``: flipped bytes, a cut
tail or changed header values).

Prints, per input set: files tried, classified, and the other files by kind and error type;
files that did not end as exactly one row (missing or repeated); whole-run failures (an
exception out of ``run_batch``), hangs (a run still going after ``--hang-s``; and, in the
reader pass, a file still being read after ``--file-s``); the reader pass (``load_cxr`` then
``check_radiograph`` on each regular file): exceptions that are not ``CXRReadError``
subclasses, ``UnexpectedReadError``, images returned that are not finite or not in [0, 1],
the slowest file; classified files whose reader image was not finite; non-radiographs
classified (a classified row whose Modality is not CR/DX or whose BodyPartExamined is not a
chest); planted identifiers found in stderr, log records, warnings or any output file; then
how many of two simultaneous runs on one ``--out`` were refused.
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
from typing import Any

import numpy as np
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


def make_mutated(folder: Path, n: int, seed: int) -> dict[str, tuple[str, Any]]:
    """Write ``n`` mutated chest CRs into ``folder``; returns ``{file name: change}``."""
    from tests.bad_inputs import PLANTED, PLANTED_UIDS, chest_like
    from tests.dicom_mutations import BASE_KINDS, base_dicom, mutate, random_change

    rng = np.random.default_rng(seed)
    pixels = chest_like(np.random.default_rng(seed), 64)
    folder.mkdir(parents=True)
    changes = {}
    for i in range(n):
        base = BASE_KINDS[i % len(BASE_KINDS)]
        change = random_change(rng)
        data = mutate(base_dicom(base, pixels, **PLANTED, **PLANTED_UIDS), change)
        name = f"{i:03d}_{base}_{change[0]}"
        (folder / name).write_bytes(data)
        changes[name] = change
    return changes


def _timed_out(signum, frame):
    raise TimeoutError


def read_one(path: Path, file_s: int) -> tuple[str, str, bool]:
    """``load_cxr`` then ``check_radiograph`` on one file within ``file_s`` seconds:
    ``(kind, error, image_ok)``; kind ``other`` for an exception that is not a
    ``CXRReadError``, ``hang`` for a timeout; ``image_ok`` whether a returned image was finite
    float32 in [0, 1]."""
    from cxr_io.readers import CXRReadError, RadiographPolicy, check_radiograph, load_cxr

    signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(file_s)
    try:
        image = load_cxr(path)
        px = image.pixels
        ok = bool(px.dtype == np.float32 and np.isfinite(px).all())
        ok = ok and px.size > 0 and float(px.min()) >= 0.0 and float(px.max()) <= 1.0
        flags = check_radiograph(path, px, image.meta, RadiographPolicy())
        return ("flagged" if flags else "predicted"), "", ok
    except CXRReadError as exc:
        return "read error", type(exc).__name__, True
    except TimeoutError:
        return "hang", "", True
    except Exception as exc:  # what this pass counts
        return "other", type(exc).__name__, True
    finally:
        signal.alarm(0)


def reader_pass(inputs, file_s: int) -> dict[str, Any]:
    """Every regular file of ``inputs`` through the reader and the radiograph gate."""
    from pipeline.batch import collect_inputs

    rows, slowest = {}, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in collect_inputs(inputs):
            if f.skip:  # not a regular file: never opened (a FIFO would block)
                continue
            t0 = time.perf_counter()
            rows[f.rel_path] = read_one(f.path, file_s)
            slowest = max(slowest, time.perf_counter() - t0)
    kinds = Counter(k for k, _, _ in rows.values())
    return {
        "rows": rows,
        "files": len(rows),
        "other": kinds["other"],
        "unexpected": sum(e == "UnexpectedReadError" for _, e, _ in rows.values()),
        "bad_images": sum(not ok for _, _, ok in rows.values()),
        "hangs": kinds["hang"],
        "slowest_s": slowest,
    }


def one_set(name: str, inputs, model: Path, work: Path, hang_s: int, file_s: int, planted) -> dict:
    from pipeline.batch import collect_inputs, run_batch

    reader = reader_pass(inputs, file_s)

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
    expected = {f.rel_path for f in collect_inputs(inputs, exclude=out)}
    seen = Counter([*preds["rel_path"], *errs["rel_path"]])
    bad_input = {r for r, (_, _, ok) in reader["rows"].items() if not ok}
    chest = preds["body_part"].str.upper().str.contains("CHEST|THORAX|LUNG")
    non_radiograph = int((~preds["modality"].isin(["CR", "DX"]) | ~chest).sum())
    blobs = [log.read_bytes().lower()] + [
        p.read_bytes().lower() for p in out.rglob("*") if p.is_file()
    ]
    found = sum(v.encode() in b for v in planted for b in blobs)
    return {
        "name": name,
        "files": len(preds) + len(errs),
        "expected": len(expected),
        "missing": len(expected - set(seen)),
        "repeated": sum(n - 1 for n in seen.values()) + len(set(seen) - expected),
        "reader": reader,
        "non_finite_classified": len(bad_input & set(preds["rel_path"])),
        "classified": len(preds),
        "kinds": Counter(errs["kind"]),
        "errors": Counter(zip(errs["kind"], errs["error"], strict=True)),
        "failure": failure or "none",
        "hang": hang,
        "non_radiographs_classified": non_radiograph,
        "planted_found": found,
        "seconds": seconds,
        "outcome": {
            **{r: "predicted" for r in preds["rel_path"]},
            **{r.rel_path: r.kind for r in errs.itertuples()},
        },
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
    ap.add_argument("--hang-s", type=int, default=900, help="bound on one batch run")
    ap.add_argument("--file-s", type=int, default=30, help="bound on reading one file")
    ap.add_argument("--mutated", type=int, default=180, help="mutated DICOM files")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mutations")
    ap.add_argument(
        "--sets", default="corpus,pydicom,mutated", help="input sets to run, comma-separated"
    )
    args = ap.parse_args()
    from tests.bad_inputs import PLANTED_STRINGS, make_corpus, pydicom_test_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expect = make_corpus(work / "corpus")
        changes = make_mutated(work / "mutated", args.mutated, args.seed)
        model = make_model(work / "model")
        files = pydicom_test_files()
        sets = {"corpus": work / "corpus", "pydicom": files, "mutated": work / "mutated"}
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
        bounds = (args.hang_s, args.file_s, PLANTED_STRINGS)
        results = [one_set(name, inp, model, work, *bounds) for name, inp in sets.items()]
        codes = concurrent(work / "corpus", model, work / "out_concurrent")
    print(
        f"corpus cases: {len(expect)}; pydicom + pydicom-data files: {len(files)}; "
        f"mutated files: {len(changes)} (seed {args.seed}: "
        f"{dict(Counter(c[0] for c in changes.values()))})"
    )
    for r in results:
        print(f"\n== {r['name']}: {r['files']} files tried, {r['classified']} classified")
        for kind, n in sorted(r["kinds"].items()):
            print(f"  {kind}: {n}")
        for (kind, error), n in sorted(r["errors"].items()):
            print(f"    {kind:10s} {error:24s} {n}")
        print(
            f"  files found {r['expected']}; without a row {r['missing']}; "
            f"rows repeated or unknown {r['repeated']}"
        )
        print(f"  whole-run failure: {r['failure']}; hang: {r['hang']}; {r['seconds']:.0f} s")
        rd = r["reader"]
        print(
            f"  reader pass: {rd['files']} files; not a CXRReadError: {rd['other']}; "
            f"UnexpectedReadError: {rd['unexpected']}; image not finite/in [0, 1]: "
            f"{rd['bad_images']}; hangs (> file bound): {rd['hangs']}; "
            f"slowest file {rd['slowest_s']:.2f} s"
        )
        print(f"  classified with a non-finite reader image: {r['non_finite_classified']}")
        print(f"  non-radiographs classified: {r['non_radiographs_classified']}")
        print(
            f"  planted identifiers found (stderr, logs, warnings, outputs): {r['planted_found']}"
        )
    mutated = results[-1]["outcome"] if "mutated" in sets else {}
    table = Counter((changes[r][0], kind) for r, kind in mutated.items() if r in changes)
    print("\nmutated files, change x outcome:")
    for (change, kind), n in sorted(table.items()):
        print(f"  {change:5s} {kind:10s} {n}")
    tags = Counter(
        "+".join(sorted({k for k, _ in changes[r][1]}))
        for r, kind in mutated.items()
        if kind == "predicted" and changes[r][0] == "tag"
    )
    print(f"changed tags of the classified files: {dict(sorted(tags.items()))}")
    total = sum(r["files"] for r in results)
    print(
        f"\nall sets: {total} files tried; whole-run failures "
        f"{sum(r['failure'] != 'none' for r in results)}; hangs "
        f"{sum(r['hang'] + r['reader']['hangs'] for r in results)}; files without exactly one "
        f"row {sum(r['missing'] + r['repeated'] for r in results)}; classified with a "
        f"non-finite image {sum(r['non_finite_classified'] for r in results)}; non-radiographs "
        f"classified {sum(r['non_radiographs_classified'] for r in results)}"
    )
    print(f"\ntwo simultaneous runs on one --out: exit codes {codes} (6 = refused, locked)")


if __name__ == "__main__":
    main()
