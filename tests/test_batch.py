"""Batch runs over a messy DICOM folder tree: rows, errors, resume, duplicates, privacy, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from classification.model_card import (
    ModelCardError,
    card_path,
    read_model_card,
    write_model_card,
)
from classification.models import build_backbone
from pipeline.batch import ERROR_COLUMNS, prediction_columns, run_batch
from tests.dicom_factory import chest_like, write_cxr_dicom

SIZE = 32
CLASSES = ["normal", "pneumonia", "covid"]
GOOD = [
    "patient_a/IM0001",
    "patient_a/IM0002.dcm",
    "patient_b/IM0003",
    "patient_b/IM0004_mono1",
    "patient_b/knee/IM0005",
    "patient_c/IM0006",
    "patient_c/IM0007",
]
KNEE = "patient_b/knee/IM0005"
CLASSIFIED = [g for g in GOOD if g != KNEE]  # the knee is refused (BodyPartExamined)
FLOAT_COLS = ["prob_normal", "prob_pneumonia", "prob_covid", "lung_area_fraction"]


def planted(i: int) -> dict[str, str]:
    """Distinctive fake identifiers for file ``i`` (none may reach an output)."""
    return {
        "PatientName": f"Quixotic^Zebulon{i}",
        "PatientID": f"PIDZQ{i}X7731",
        "PatientBirthDate": f"1899041{i}",
        "AccessionNumber": f"ACCQZ{i}Y5519",
    }


def make_tree(root: Path, seed: int = 0) -> Path:
    """The messy export: 7 readable images (one MONOCHROME1, one knee), a byte copy of the
    first (duplicate SOPInstanceUID), a truncated file, a text file and a DICOMDIR."""
    rng = np.random.default_rng(seed)
    for i, rel in enumerate(GOOD):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = chest_like(rng)
        tags: dict = {**planted(i), "BitsStored": 12}
        if rel.endswith("mono1"):
            tags["PhotometricInterpretation"] = "MONOCHROME1"
            pixels = (4095 - pixels).astype(np.uint16)
        if "knee" in rel:
            tags["BodyPartExamined"] = "KNEE"
        write_cxr_dicom(path, pixels, **tags)
    (root / "patient_c" / "copy_of_IM0001").write_bytes((root / GOOD[0]).read_bytes())
    broken = root / "broken"
    broken.mkdir()
    full = write_cxr_dicom(broken / "full", chest_like(rng), **planted(8)).read_bytes()
    (broken / "IM_truncated").write_bytes(full[: len(full) - 3000])
    (broken / "full").unlink()
    (root / "notes.txt").write_text("exported by PACS for Quixotic^Zebulon0\n")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    return root


def make_model(folder: Path, method: str = "standard", seed: int = 0) -> Path:
    """An untrained small_cnn saved as a plain state dict with its model card."""
    torch.manual_seed(seed)
    net = build_backbone("small_cnn", len(CLASSES), in_channels=1)
    ckpt = folder / "best_model.pt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ckpt)
    write_model_card(ckpt, backbone="small_cnn", size=SIZE, classes=CLASSES, method=method)
    return ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("batch")
    return {"tree": make_tree(base / "export"), "model": make_model(base / "model")}


@pytest.fixture(scope="module")
def one_shot(setup, tmp_path_factory) -> dict:
    # the module-scoped run needs a fixed secret (the autouse home is per test)
    secret_home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("ISNET_CXR_HOME", str(secret_home))
    try:
        out = tmp_path_factory.mktemp("one_shot")
        summary = run_batch(setup["tree"], setup["model"], out, batch_size=3, progress=False)
    finally:
        mp.undo()
    return {"out": out, "summary": summary, "home": secret_home}


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype=str, keep_default_na=False)


def same_table(a: pd.DataFrame, b: pd.DataFrame, key: str = "rel_path") -> None:
    assert list(a.columns) == list(b.columns)
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)
    floats = [c for c in FLOAT_COLS + ["background_share"] if c in a.columns]
    text = [c for c in a.columns if c not in floats and c not in ("file_mtime_ns",)]
    pd.testing.assert_frame_equal(a[text], b[text])
    np.testing.assert_allclose(
        a[floats].astype(float).to_numpy(), b[floats].astype(float).to_numpy(), atol=1e-5
    )


def test_every_good_file_has_a_row_and_errors_are_named(one_shot) -> None:
    out, s = one_shot["out"], one_shot["summary"]
    preds, errs = read(out, "predictions.csv"), read(out, "errors.csv")
    assert list(preds.columns) == prediction_columns(CLASSES)
    assert list(errs.columns) == list(ERROR_COLUMNS)
    assert sorted(preds["rel_path"]) == sorted(CLASSIFIED)
    assert (
        preds["pseudo_id"].is_unique and preds["pseudo_id"].str.match(r"^img-[0-9a-f]{16}$").all()
    )
    probs = preds[[f"prob_{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (preds["pred"] == [CLASSES[i] for i in probs.argmax(axis=1)]).all()
    assert set(preds["seg_ok"]) <= {"True", "False"}
    area = preds["lung_area_fraction"].astype(float)
    assert ((area >= 0) & (area <= 1)).all()
    share = preds["background_share"].astype(float)
    assert share.notna().all() and ((share >= 0) & (share <= 1)).all()
    # one overlay per prediction, named by the pseudonymous id
    overlays = sorted(p.stem for p in (out / "overlays").glob("*.png"))
    assert overlays == sorted(preds["pseudo_id"])

    by_path = errs.set_index("rel_path")
    trunc = by_path.loc["broken/IM_truncated"]
    assert trunc["kind"] == "unreadable" and trunc["error"] == "TruncatedFileError"
    assert "pixel data has" in trunc["reason"] and "bytes" in trunc["reason"]
    assert by_path.loc["notes.txt", "error"] == "NotDicomError"
    assert by_path.loc["DICOMDIR", "kind"] == "skipped"
    dup = by_path.loc["patient_c/copy_of_IM0001"]
    assert dup["kind"] == "duplicate" and "patient_a/IM0001" in dup["reason"]
    knee = by_path.loc[KNEE]
    assert knee["kind"] == "refused" and knee["error"] == "NotChestError"
    assert "KNEE" in knee["reason"]
    assert len(errs) == 5

    assert s.predictions == len(CLASSIFIED) and s.errors == 5 and s.complete
    assert s.errors_by_kind == {"duplicate": 1, "refused": 1, "skipped": 1, "unreadable": 2}
    assert s.refused_by_error == {"NotChestError": 1}
    assert s.non_chest == 0  # never classified
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["per_class"].values()) == len(CLASSIFIED)
    assert summary["seg_flagged"] == int((preds["seg_ok"] == "False").sum())
    assert summary["model"]["classes"] == CLASSES


def test_monochrome1_and_body_part(one_shot) -> None:
    preds = read(one_shot["out"], "predictions.csv").set_index("rel_path")
    mono1 = preds.loc["patient_b/IM0004_mono1"]
    assert mono1["photometric"] == "MONOCHROME1"
    assert KNEE not in preds.index
    assert set(preds["modality"]) == {"CR"}


def test_monochrome1_is_read_as_displayed(setup, tmp_path) -> None:
    """The same film stored as MONOCHROME2 and inverted as MONOCHROME1 gives the same result."""
    rng = np.random.default_rng(5)
    pixels = chest_like(rng)
    tree = tmp_path / "pair"
    tree.mkdir()
    write_cxr_dicom(tree / "m2", pixels, BitsStored=12)
    write_cxr_dicom(
        tree / "m1",
        (4095 - pixels).astype(np.uint16),
        BitsStored=12,
        PhotometricInterpretation="MONOCHROME1",
    )
    s = run_batch(tree, setup["model"], tmp_path / "out", heatmaps=False, progress=False)
    assert s.predictions == 2
    preds = read(tmp_path / "out", "predictions.csv").set_index("rel_path")
    cols = FLOAT_COLS
    np.testing.assert_allclose(
        preds.loc["m1", cols].astype(float), preds.loc["m2", cols].astype(float), atol=1e-6
    )
    assert preds.loc["m1", "seg_flags"] == preds.loc["m2", "seg_flags"]
    assert set(preds["background_share"]) == {""}  # no heatmaps asked
    assert not (tmp_path / "out" / "overlays").exists()


def test_resume_after_interruption_equals_one_shot(setup, one_shot, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ISNET_CXR_HOME", str(one_shot["home"]))  # same secret, same ids
    out = tmp_path / "resumed"
    first = run_batch(setup["tree"], setup["model"], out, batch_size=3, max_files=5, progress=False)
    assert not first.complete and first.processed_now == 5
    n_rows = len(read(out, "predictions.csv")) + len(read(out, "errors.csv"))
    assert n_rows == 5
    # the process died inside the next write: a torn last line
    with (out / "predictions.csv").open("a") as fh:
        fh.write("img-0123456789abcdef,patient_c/IM00")
    second = run_batch(setup["tree"], setup["model"], out, batch_size=3, progress=False)
    total = len(GOOD) + 4  # the knee is in errors.csv
    assert second.complete and second.already_done == 5
    assert second.processed_now == total - 5
    same_table(read(out, "predictions.csv"), read(one_shot["out"], "predictions.csv"))
    same_table(read(out, "errors.csv"), read(one_shot["out"], "errors.csv"))
    # a third run has nothing left to do
    third = run_batch(setup["tree"], setup["model"], out, progress=False)
    assert third.processed_now == 0 and third.predictions == len(CLASSIFIED)
    assert len(read(out, "predictions.csv")) == len(CLASSIFIED)


def test_changed_file_is_processed_again_and_no_resume_starts_over(setup, tmp_path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(setup["tree"] / "patient_a", tree)
    out = tmp_path / "out"
    run_batch(tree, setup["model"], out, heatmaps=False, progress=False)
    before = read(out, "predictions.csv").set_index("rel_path")
    # the researcher replaces one file by another image under the same name
    rng = np.random.default_rng(9)
    write_cxr_dicom(tree / "IM0001", chest_like(rng), BitsStored=12, InstanceNumber=2)
    s = run_batch(tree, setup["model"], out, heatmaps=False, progress=False)
    assert s.changed_files == 1 and s.processed_now == 1 and s.already_done == 1
    after = read(out, "predictions.csv").set_index("rel_path")
    assert sorted(after.index) == ["IM0001", "IM0002.dcm"]  # the stale row is gone
    assert after.loc["IM0001", "pseudo_id"] != before.loc["IM0001", "pseudo_id"]
    assert after.loc["IM0002.dcm", "pseudo_id"] == before.loc["IM0002.dcm", "pseudo_id"]

    s = run_batch(tree, setup["model"], out, heatmaps=False, progress=False, resume=False)
    assert s.processed_now == 2 and s.already_done == 0
    assert len(read(out, "predictions.csv")) == 2


def test_no_identifier_in_any_output(one_shot) -> None:
    values = [v.lower() for i in range(9) for v in planted(i).values()]
    values += ["quixotic", "zebulon"]
    outputs = [p for p in one_shot["out"].rglob("*") if p.is_file()]
    assert len(outputs) >= 2 * len(CLASSIFIED) + 4  # overlays, masks, tables, html
    for path in outputs:
        data = path.read_bytes().lower()
        for v in values:
            assert v.encode() not in data, f"{v} found in {path.name}"


def test_identifier_in_a_path_is_counted(setup, tmp_path) -> None:
    tree = tmp_path / "tree"
    (tree / "PIDZQ0X7731").mkdir(parents=True)
    shutil.copy(setup["tree"] / GOOD[0], tree / "PIDZQ0X7731" / "IM1")
    s = run_batch(tree, setup["model"], tmp_path / "out", heatmaps=False, progress=False)
    assert s.paths_with_identifiers == 1 and "rel_path" in s.notes[0]


def test_segment_then_classify_gets_the_masked_image(setup, tmp_path) -> None:
    """Same weights, two cards: the masked input changes the probabilities."""
    std = make_model(tmp_path / "std", "standard", seed=1)
    stc = make_model(tmp_path / "stc", "segment_then_classify", seed=1)
    tree = tmp_path / "tree"
    shutil.copytree(setup["tree"] / "patient_a", tree)
    run_batch(tree, std, tmp_path / "o1", heatmaps=False, progress=False)
    run_batch(tree, stc, tmp_path / "o2", heatmaps=False, progress=False)
    p1 = read(tmp_path / "o1", "predictions.csv")[FLOAT_COLS[:3]].astype(float).to_numpy()
    p2 = read(tmp_path / "o2", "predictions.csv")[FLOAT_COLS[:3]].astype(float).to_numpy()
    assert np.abs(p1 - p2).max() > 1e-4


def test_model_card_roundtrip_and_errors(tmp_path) -> None:
    ckpt = tmp_path / "m" / "best_model.pt"
    path = write_model_card(
        ckpt,
        backbone="small_cnn",
        size=64,
        classes=("a", "b"),
        method="isnet",
        method_params={"variant": "selective", "C1": 1.5},
    )
    assert path == card_path(ckpt) == tmp_path / "m" / "model.json"
    card = read_model_card(ckpt)
    assert card.classes == ("a", "b") and card.size == 64 and card.in_channels == 1
    assert card.method_params == {"variant": "selective", "C1": 1.5}
    with pytest.raises(ModelCardError, match="no model card"):
        read_model_card(tmp_path / "other" / "best_model.pt")
    path.write_text(json.dumps({"backbone": "small_cnn", "size": 64}))
    with pytest.raises(ModelCardError, match="missing field"):
        read_model_card(ckpt)
    with pytest.raises(ModelCardError, match="method must be one of"):
        write_model_card(ckpt, backbone="small_cnn", size=64, classes=["a", "b"], method="gradcam")


def test_cli_errors_and_run(setup, tmp_path) -> None:
    from typer.testing import CliRunner

    from pipeline.batch_cli import EXIT_BAD_INPUT, EXIT_NO_CARD, EXIT_NO_MODEL, batch_app

    runner = CliRunner()
    tree = tmp_path / "tree"
    shutil.copytree(setup["tree"] / "patient_a", tree)
    out = str(tmp_path / "out")

    res = runner.invoke(
        batch_app, ["run", str(tree), "--model", str(tmp_path / "no.pt"), "--out", out]
    )
    assert res.exit_code == EXIT_NO_MODEL and "not found" in res.output
    bare = tmp_path / "bare" / "best_model.pt"
    bare.parent.mkdir()
    shutil.copy(setup["model"], bare)
    res = runner.invoke(batch_app, ["run", str(tree), "--model", str(bare), "--out", out])
    assert res.exit_code == EXIT_NO_CARD and "model.json" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(
        batch_app, ["run", str(empty), "--model", str(setup["model"]), "--out", out]
    )
    assert res.exit_code == EXIT_BAD_INPUT and "no files found" in res.output

    args = ["run", str(tree), "--model", str(setup["model"]), "--out", out, "--no-heatmaps"]
    res = runner.invoke(batch_app, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 file(s) processed now" in res.output
    res = runner.invoke(batch_app, [*args, "--no-progress"])
    assert res.exit_code == 0 and "0 file(s) processed now, 2 already done" in res.output
    # another model (other classes) into the same --out: refused, not mixed
    other = tmp_path / "other" / "best_model.pt"
    other.parent.mkdir()
    torch.save(build_backbone("small_cnn", 2).state_dict(), other)
    write_model_card(other, backbone="small_cnn", size=SIZE, classes=["a", "b"], method="standard")
    res = runner.invoke(batch_app, ["run", str(tree), "--model", str(other), "--out", out])
    assert res.exit_code == EXIT_BAD_INPUT and "another model" in res.output


def test_train_cli_writes_the_model_card(tmp_path) -> None:
    from typer.testing import CliRunner

    from classification.cli import train_app
    from synthetic import default_sites, make_dataset

    manifest = make_dataset(
        tmp_path / "data",
        default_sites()[:1],
        n_per_site=8,
        size=SIZE,
        seed=0,
        workers=1,
        progress=False,
    )
    out = tmp_path / "run"
    args = ["--manifest", str(manifest), "--size", str(SIZE), "--epochs", "1"]
    args += ["--batch-size", "4", "--no-augment", "--out", str(out)]
    res = CliRunner().invoke(train_app, args)
    assert res.exit_code == 0, res.output
    card = read_model_card(out / "best_model.pt")
    assert card.backbone == "small_cnn" and card.size == SIZE and card.method == "standard"
    # classes in output order: the sorted labels of the manifest (one source: the card)
    assert list(card.classes) == sorted(set(pd.read_csv(manifest)["label"]))
    # the trained model runs in a batch over the synthetic DICOMs
    s = run_batch(manifest, out / "best_model.pt", tmp_path / "b", progress=False)
    assert s.predictions >= 8
