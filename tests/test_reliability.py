"""Reliability and privacy of batch runs (issue 11) and the batch door's refusals (issue 10).

The bad-input corpus (:mod:`tests.bad_inputs`) and every pydicom / pydicom-data test file go
through the reader and through ``run_batch``: each file ends as exactly one of predicted,
refused (its own ``CXRReadError`` subclass), flagged (not classified), unreadable or skipped;
no whole-run failure, no hang (an alarm turns a hang into a failure), no planted identifier in
stderr, logs or any output file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from classification.model_card import write_model_card
from classification.models import build_backbone
from cxr_io.readers import (
    CXRReadError,
    RadiographPolicy,
    UnexpectedReadError,
    check_radiograph,
    load_cxr,
)
from pipeline.batch import (
    BatchLockedError,
    BatchOutputMismatchError,
    collect_inputs,
    run_batch,
    working_copy,
)
from tests.bad_inputs import PLANTED_STRINGS, chest_like, make_corpus, pydicom_test_files
from tests.dicom_factory import write_cxr_dicom

SIZE = 32
CLASSES = ["normal", "pneumonia", "covid"]
HANG_LIMIT_S = 600  # a run that takes longer than this is a hang (SIGALRM fails the test)


@contextlib.contextmanager
def no_hang(seconds: int = HANG_LIMIT_S):
    """Fail (instead of blocking the suite) if the body runs longer than ``seconds``."""

    def _raise(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_model(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_backbone("small_cnn", len(CLASSES), in_channels=1)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "best_model.pt"
    torch.save(net.state_dict(), ckpt)
    write_model_card(ckpt, backbone="small_cnn", size=SIZE, classes=CLASSES, method="standard")
    return ckpt


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype=str, keep_default_na=False, encoding="utf-8")


def outcome(path: Path) -> tuple[str, str | None]:
    """What the reader and the gate make of one file: (kind, error class name)."""
    try:
        image = load_cxr(path)
    except CXRReadError as exc:
        return "unreadable", type(exc).__name__
    assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
    assert image.pixels.min() >= 0 and image.pixels.max() <= 1
    try:
        flags = check_radiograph(path, image.pixels, image.meta, RadiographPolicy())
    except CXRReadError as exc:
        return "refused", type(exc).__name__
    return ("flagged", "NotClassified") if flags else ("predicted", None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus") / "export"
    return {"root": root, "expect": make_corpus(root), "model": make_model(root.parent / "m")}


@pytest.fixture(scope="module")
def corpus_run(corpus, tmp_path_factory) -> dict:
    """One batch run over the corpus, with stderr and every log record captured."""
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("out")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, root_logger = Keep(level=logging.DEBUG), logging.getLogger()
    root_logger.addHandler(handler)
    old_level = root_logger.level
    root_logger.setLevel(logging.DEBUG)
    mp = pytest.MonkeyPatch()
    mp.setenv("ISNET_CXR_HOME", str(home))
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    os.dup2(write_fd, 2)  # the process's stderr (C libraries) and sys.stderr (tqdm, warnings)
    stream = os.fdopen(os.dup(write_fd), "w", encoding="utf-8", errors="backslashreplace")
    mp.setattr(sys, "stderr", stream)
    stderr = b""
    try:
        with no_hang(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_batch(corpus["root"], corpus["model"], out, batch_size=4, progress=True)
    finally:
        stream.flush()
        stream.close()
        os.dup2(saved, 2)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as fh:
            stderr = fh.read()
        os.close(saved)
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
        mp.undo()
    logs = "\n".join(r.getMessage() for r in records)
    logs += "\n".join(str(w.message) for w in caught)  # warnings count as logs
    return {"out": out, "summary": summary, "stderr": stderr, "logs": logs, "home": home}


def test_corpus_through_the_reader(corpus) -> None:
    """Every regular file of the corpus: the expected outcome and error subclass, no other
    exception type."""
    files = {f.rel_path: f.path for f in collect_inputs(corpus["root"])}
    for rel, want in corpus["expect"].items():
        if want.kind == "skipped":
            continue
        if want.error == "NoLungsFound":  # reader and header accept it; the segmenter flags it
            assert outcome(files[rel]) == ("predicted", None), rel
        else:
            assert outcome(files[rel]) == (want.kind, want.error), rel


def test_corpus_through_a_batch_run(corpus, corpus_run) -> None:
    out, s, expect = corpus_run["out"], corpus_run["summary"], corpus["expect"]
    preds, errs = read(out, "predictions.csv"), read(out, "errors.csv")
    # every file exactly once, in one table
    seen = list(preds["rel_path"]) + list(errs["rel_path"])
    assert sorted(seen) == sorted(expect), set(seen) ^ set(expect)
    got = {r: ("predicted", None) for r in preds["rel_path"]}
    got.update({r.rel_path: (r.kind, r.error) for r in errs.itertuples()})
    assert got == {rel: (e.kind, e.error) for rel, e in expect.items()}
    assert (errs["reason"].str.len() > 10).all()
    # nothing but chest radiographs got a class
    assert set(preds["modality"]) <= {"CR", "DX"} and set(preds["body_part"]) == {"CHEST"}
    assert s.non_chest == 0 and "failed" not in s.errors_by_kind
    assert s.refused_by_error["NotRadiographError"] == 9
    # a file named with bytes that are not UTF-8 is listed with \xNN escapes
    assert "fs/name_\\xff\\xfe.dcm" in set(preds["rel_path"])
    # masks at the original size, overlays, the html overview
    for pid in preds["pseudo_id"]:
        assert Image.open(out / "masks" / f"{pid}.png").size == (64, 64)
        assert (out / "overlays" / f"{pid}.png").is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "NotChestError" in page and "KNEE" in page and "overlays/" in page
    assert page.count("<figure>") == len(preds) and "for</span>" in page


def test_corpus_run_resumes_without_work(corpus, corpus_run, monkeypatch) -> None:
    monkeypatch.setenv("ISNET_CXR_HOME", str(corpus_run["home"]))
    with no_hang():
        again = run_batch(corpus["root"], corpus["model"], corpus_run["out"], progress=False)
    assert again.processed_now == 0 and again.already_done == len(corpus["expect"])


def test_no_planted_identifier_in_stderr_logs_or_outputs(corpus_run) -> None:
    stderr = corpus_run["stderr"].lower()
    assert b"batch" in stderr  # the progress bar was captured: the capture works
    logs = corpus_run["logs"].lower()
    files = [p for p in corpus_run["out"].rglob("*") if p.is_file()]
    assert len(files) > 10
    for value in PLANTED_STRINGS:
        assert value.encode() not in stderr, f"{value} in stderr"
        assert value not in logs, f"{value} in a log record"
        for path in files:
            assert value.encode() not in path.read_bytes().lower(), f"{value} in {path.name}"


def test_every_pydicom_test_file(tmp_path, caplog) -> None:
    """pydicom's and pydicom-data's own test files: reader, then one batch run over all."""
    caplog.set_level(logging.DEBUG)
    files = pydicom_test_files()
    assert len(files) > 200  # both packages are installed
    kinds = {}
    with no_hang():
        for path in files:
            kinds[path.name] = outcome(path)
    assert not [n for n, k in kinds.items() if k[1] == UnexpectedReadError.__name__]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # kept quiet
    predicted = sorted(n for n, k in kinds.items() if k[0] == "predicted")
    assert predicted == ["RG1_J2KI.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "RG1_UNCR.dcm"]
    assert kinds["SC_ybr_full_422_uncompressed.dcm"][1] == "NotRadiographError"  # readable
    assert kinds["rtplan_truncated.dcm"] == ("unreadable", "TruncatedFileError")
    assert kinds["MR_truncated.dcm"] == ("unreadable", "TruncatedFileError")
    # a batch run over every file: one row each, no failure; only the chest CRs classified
    model = make_model(tmp_path / "m")
    with no_hang():
        s = run_batch(files, model, tmp_path / "out", heatmaps=False, masks=False, progress=False)
    preds, errs = read(tmp_path / "out", "predictions.csv"), read(tmp_path / "out", "errors.csv")
    assert len(preds) + len(errs) == s.files_found == len(files)
    assert "failed" not in s.errors_by_kind
    batch_predicted = {Path(r).name for r in preds["rel_path"]}
    duplicates = {Path(r).name for r in errs.loc[errs["kind"] == "duplicate", "rel_path"]}
    assert batch_predicted <= set(predicted) and set(predicted) - batch_predicted <= duplicates


def test_ybr_full_422_is_read(tmp_path) -> None:
    from pydicom.data import get_testdata_file

    image = load_cxr(get_testdata_file("SC_ybr_full_422_uncompressed.dcm", download=False))
    assert image.pixels.shape == (100, 100) and image.meta["converted_from"] == "YBR_FULL_422"


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that takes the run lock of ``out`` and keeps it."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.batch.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(
    corpus, tmp_path
) -> None:
    from typer.testing import CliRunner

    from pipeline.batch_cli import EXIT_LOCKED, batch_app

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "IM1").write_bytes((corpus["root"] / "good" / "IM0001").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        with pytest.raises(BatchLockedError, match=f"pid {holder.pid}"):
            run_batch(tree, corpus["model"], out, progress=False)
        args = ["run", str(tree), "--model", str(corpus["model"]), "--out", str(out)]
        res = CliRunner().invoke(batch_app, [*args, "--no-progress"])
        assert res.exit_code == EXIT_LOCKED and "another batch run" in res.output
        assert not (out / "predictions.csv").exists()  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: the lock file still names it
        holder.wait()
    s = run_batch(tree, corpus["model"], out, heatmaps=False, progress=False)
    assert s.predictions == 1
    assert any("took over the lock" in n and str(holder.pid) in n for n in s.notes)
    assert (out / ".batch.lock").read_text() == ""  # released at the end


def test_another_model_into_the_same_out_is_refused_unless_restart(corpus, tmp_path) -> None:
    from typer.testing import CliRunner

    from pipeline.batch_cli import EXIT_BAD_INPUT, batch_app

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "IM1").write_bytes((corpus["root"] / "good" / "IM0001").read_bytes())
    model_b = make_model(tmp_path / "b", seed=7)  # same classes and card, other weights
    out = str(tmp_path / "out")
    runner = CliRunner()
    base = ["run", str(tree), "--out", out, "--no-heatmaps", "--no-progress"]
    assert runner.invoke(batch_app, [*base, "--model", str(corpus["model"])]).exit_code == 0
    res = runner.invoke(batch_app, [*base, "--model", str(model_b)])
    assert res.exit_code == EXIT_BAD_INPUT and "another model" in res.output
    assert "model_sha256" in res.output and "--restart" in res.output
    res = runner.invoke(batch_app, [*base, "--model", str(model_b), "--restart"])
    assert res.exit_code == 0 and "1 file(s) processed now, 0 already done" in res.output
    with pytest.raises(BatchOutputMismatchError, match="heatmaps"):  # other settings too
        run_batch(tree, model_b, out, heatmaps=True, progress=False)


def test_batch_size_changes_results_only_within_tolerance(corpus, tmp_path) -> None:
    """Batched float32 convolutions sum in another order: between batch sizes, probabilities
    may differ by one unit of the 6th (last written) decimal and the LRP background share by up
    to 1e-4 (measured 2.3e-5, docs/reliability.md); masks and predicted classes not at all."""
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        write_cxr_dicom(tree / f"IM{i}", chest_like(rng), BitsStored=12)
    tables = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        run_batch(tree, corpus["model"], out, batch_size=bs, progress=False)
        tables.append(read(out, "predictions.csv").sort_values("rel_path"))

    def col(t: pd.DataFrame, names: list[str]) -> np.ndarray:
        return t[names].astype(float).to_numpy()

    probs = [f"prob_{c}" for c in CLASSES]
    assert np.abs(col(tables[0], probs) - col(tables[1], probs)).max() <= 2e-6
    share = ["background_share"]
    assert np.abs(col(tables[0], share) - col(tables[1], share)).max() <= 1e-4
    area = ["lung_area_fraction"]
    np.testing.assert_array_equal(col(tables[0], area), col(tables[1], area))
    assert (tables[0]["pred"].to_numpy() == tables[1]["pred"].to_numpy()).all()


def test_large_images_are_shrunk_to_the_working_side(corpus, tmp_path) -> None:
    """The chunk keeps a copy whose long side is at most ``work_side``; masks come out at the
    original size."""
    image = torch.rand(1, 300, 120)
    from monai.data import MetaTensor

    small = working_copy(MetaTensor(image, meta={"modality": "CR"}), 100)
    assert tuple(small.shape) == (1, 100, 40) and small.meta["modality"] == "CR"
    assert working_copy(MetaTensor(image), 300).shape == image.shape
    tree = tmp_path / "tree"
    tree.mkdir()
    write_cxr_dicom(tree / "big", chest_like(np.random.default_rng(0), 96), BitsStored=12)
    out = tmp_path / "out"
    s = run_batch(tree, corpus["model"], out, work_side=48, progress=False, dicom_seg=True)
    assert s.predictions == 1
    pid = read(out, "predictions.csv")["pseudo_id"][0]
    assert Image.open(out / "masks" / f"{pid}.png").size == (96, 96)
    import pydicom

    seg = pydicom.dcmread(out / "dicom_seg" / f"{pid}.dcm")
    assert seg.Modality == "SEG" and (int(seg.Rows), int(seg.Columns)) == (96, 96)


def test_walk_never_blocks_on_special_files(tmp_path) -> None:
    """A FIFO given directly as an input is listed, not opened (opening it would block)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with no_hang(60):
        (item,) = collect_inputs(fifo)
    assert "FIFO" in item.skip
    assert time.monotonic() - t0 < 60


def test_seg_predict_goes_on_after_a_bad_file_and_finds_extensionless_dicom(
    corpus, tmp_path
) -> None:
    from typer.testing import CliRunner

    from segmentation.cli import seg_app

    tree = tmp_path / "tree"
    tree.mkdir()
    good = (corpus["root"] / "good" / "IM0001").read_bytes()
    (tree / "a_first.dcm").write_bytes((corpus["root"] / "good" / "IM0002.dcm").read_bytes())
    (tree / "b_truncated.dcm").write_bytes(good[:-700])  # sorted between two good files
    (tree / "c_no_extension").write_bytes(good)
    (tree / "d_notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        seg_app, ["predict", str(tree), "--out", str(out), "--no-overlay", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    quality = read(out, "quality.csv")
    assert sorted(Path(p).name for p in quality["image"]) == ["a_first.dcm", "c_no_extension"]
    errors = read(out, "errors.csv")
    assert [Path(p).name for p in errors["image"]] == ["b_truncated.dcm"]
    assert errors["error"][0] == "TruncatedFileError" and "bytes" in errors["reason"][0]
    assert "1 file(s) not segmented" in res.output


def test_wrong_rows_is_refused_but_zero_padding_is_read(tmp_path) -> None:
    """Rows one short leaves excess pixel data that is not padding: refused, not read skewed;
    pydicom's MR_small_padded.dcm (128 zero bytes after its pixels) reads."""
    from pydicom.data import get_testdata_file

    from cxr_io.readers import CorruptPixelDataError

    pixels = chest_like(np.random.default_rng(1))
    path = write_cxr_dicom(tmp_path / "rows63", pixels, BitsStored=12, Rows=63)
    with pytest.raises(CorruptPixelDataError, match="more than"):
        load_cxr(path)
    padded = load_cxr(get_testdata_file("MR_small_padded.dcm", download=False))
    assert padded.pixels.shape == (64, 64)


def test_resumed_run_finds_copies_of_flagged_images(corpus, tmp_path, monkeypatch) -> None:
    """Copies of a flagged image (lateral view; no lungs found) are duplicates in one run and
    in a run interrupted before them and resumed (before the fix: flagged again, since
    errors.csv keeps no pseudo_id)."""
    monkeypatch.setenv("ISNET_CXR_HOME", str(tmp_path / "home"))
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = np.random.default_rng(5)
    write_cxr_dicom(tree / "a_lateral", chest_like(rng), BitsStored=12, ViewPosition="LL")
    bars = ((np.arange(128) * 8 // 128) % 2 * 3000 + 500).astype(np.uint16)
    write_cxr_dicom(tree / "b_bars", np.tile(bars, (128, 1)), BitsStored=12)
    write_cxr_dicom(tree / "c_good", chest_like(rng), BitsStored=12)
    for name in ("a_lateral", "b_bars", "c_good"):
        (tree / f"d_copy_of_{name}").write_bytes((tree / name).read_bytes())
    args = {"batch_size": 2, "heatmaps": False, "progress": False}
    run_batch(tree, corpus["model"], tmp_path / "one", **args)
    first = run_batch(tree, corpus["model"], tmp_path / "two", max_files=3, **args)
    assert first.processed_now == 3 and not first.complete
    run_batch(tree, corpus["model"], tmp_path / "two", **args)
    one, two = read(tmp_path / "one", "errors.csv"), read(tmp_path / "two", "errors.csv")
    copies = one[one["rel_path"].str.startswith("d_copy")]
    assert list(copies["kind"]) == ["duplicate"] * 3, one
    assert list(one[one["rel_path"] == "b_bars"]["error"]) == ["NoLungsFound"]
    pd.testing.assert_frame_equal(one, two)
    same_preds = read(tmp_path / "one", "predictions.csv")
    pd.testing.assert_frame_equal(same_preds, read(tmp_path / "two", "predictions.csv"))


def _rows_on_disk(out: Path) -> int:
    paths = [out / "predictions.csv", out / "errors.csv"]
    return sum(max(0, p.read_bytes().count(b"\n") - 1) for p in paths if p.is_file())


def test_a_sigkilled_cli_run_resumes_to_the_uninterrupted_tables(corpus, tmp_path) -> None:
    """A real ``isnet-cxr batch run`` process is SIGKILLed once it has written rows, a second
    one is interrupted with SIGINT (exit 130, a message saying how to resume); the same run
    resumed gives the tables of an uninterrupted run (benchmarks/batch_kill_resume.py does
    this at many random points)."""
    home = tmp_path / "home"
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = np.random.default_rng(8)
    for i in range(16):
        write_cxr_dicom(tree / f"IM{i:02d}", chest_like(rng), BitsStored=12)
    write_cxr_dicom(tree / "IM_lateral", chest_like(rng), BitsStored=12, ViewPosition="LL")
    (tree / "zz_copy_of_lateral").write_bytes((tree / "IM_lateral").read_bytes())
    out = tmp_path / "killed"
    env = {**os.environ, "ISNET_CXR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    # the batch command's own typer app (``isnet-cxr batch`` mounts it): fewer imports
    code = "from pipeline.batch_cli import batch_app; batch_app()"
    cmd = [sys.executable, "-c", code, "run", str(tree)]
    cmd += ["--model", str(corpus["model"]), "--out", str(out), "--batch-size", "2"]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with no_hang(300):
        while proc.poll() is None and _rows_on_disk(out) == 0:
            time.sleep(0.005)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    killed_rows = _rows_on_disk(out)
    assert 0 < killed_rows < 18
    # Ctrl-C: exit 130, the rows are kept, the message says how to resume (SIGINT restored to
    # its default: a background shell starts children with SIGINT ignored)
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    with no_hang(300):
        while proc.poll() is None and _rows_on_disk(out) <= killed_rows:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    if proc.returncode != 0:  # 0: it finished before the signal arrived
        assert proc.returncode == 130, err
        assert "interrupted" in err and "run the same command again" in err
        assert "Traceback" not in err
    mp = pytest.MonkeyPatch()
    mp.setenv("ISNET_CXR_HOME", str(home))  # the same pseudonym secret as the killed run
    try:
        with no_hang():
            resumed = run_batch(tree, corpus["model"], out, batch_size=2, progress=False)
            run_batch(tree, corpus["model"], tmp_path / "one", batch_size=2, progress=False)
    finally:
        mp.undo()
    assert resumed.complete and resumed.already_done > 0
    # the SIGINT run took over the killed run's lock and released its own on the way out
    assert not any("took over the lock" in n for n in resumed.notes)
    pd.testing.assert_frame_equal(read(out, "errors.csv"), read(tmp_path / "one", "errors.csv"))
    assert read(out, "errors.csv")["kind"].tolist() == ["flagged", "duplicate"]
    got, want = read(out, "predictions.csv"), read(tmp_path / "one", "predictions.csv")
    assert list(got["rel_path"]) == list(want["rel_path"])  # each file once, in order
    floats = {f"prob_{c}": 2e-6 for c in CLASSES} | {"background_share": 1e-4}
    exact = [c for c in got.columns if c not in floats]  # pseudo id, class, lung area, ...
    pd.testing.assert_frame_equal(got[exact], want[exact])
    for col, tol in floats.items():  # another process: float sums may differ in order
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), atol=tol)
