"""Manifest loading, validation (all problems at once, with row numbers), writing and building."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_io.manifest import (
    ManifestError,
    build_from_folders,
    class_names,
    load_manifest,
    select,
    to_records,
    write_manifest,
)


def _png(path: Path, h: int = 16, w: int = 16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w), np.uint8)).save(path)
    return path.name if path.parent.name == "" else str(path)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_valid_manifest_resolves_relative_paths(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    _png(tmp_path / "masks" / "a.png")
    csv = _write_csv(
        tmp_path / "m.csv",
        [
            {"image": "img/a.png", "label": "normal", "site": "s1", "mask": "masks/a.png"},
            {"image": "img/b.png", "label": "covid", "site": "s1", "mask": ""},
        ],
    )
    df = load_manifest(csv, labels=["normal", "covid"])
    assert df.loc[0, "image"] == str((tmp_path / "img" / "a.png").resolve())
    assert df.loc[0, "mask"] == str((tmp_path / "masks" / "a.png").resolve())
    assert df.loc[1, "mask"] == ""
    assert list(df["split"]) == ["", ""]
    assert class_names(df) == ["covid", "normal"]
    recs = to_records(df)
    assert recs[0]["label"] == 1 and recs[1]["label"] == 0
    assert "mask" in recs[0] and "mask" not in recs[1]


def test_every_problem_reported_with_row_numbers(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 16, 16)
    _png(tmp_path / "b.png", 16, 16)
    _png(tmp_path / "c.png", 16, 16)
    _png(tmp_path / "small_mask.png", 8, 8)
    csv = _write_csv(
        tmp_path / "m.csv",
        [
            # row 2: fine
            {
                "image": "a.png",
                "label": "normal",
                "site": "s",
                "patient_id": "p1",
                "split": "train",
            },
            # row 3: missing file
            {"image": "missing.png", "label": "normal", "site": "s", "patient_id": "", "split": ""},
            # row 4: unknown label
            {"image": "b.png", "label": "flu", "site": "s", "patient_id": "", "split": ""},
            # row 5: duplicate of row 2, patient p1 in another split
            {"image": "a.png", "label": "normal", "site": "s", "patient_id": "p1", "split": "test"},
            # row 6: mask size differs
            {"image": "c.png", "label": "normal", "site": "s", "mask": "small_mask.png"},
        ],
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(csv, labels=["normal", "covid"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "row 3: image file not found" in text
    assert "row 4: unknown label 'flu'" in text
    assert "rows 2, 5: the same image appears more than once" in text
    assert "patient 'p1' is in more than one split (test, train)" in text
    assert "row 6: mask size 8x8 differs from image size 16x16" in text
    assert str(csv) in str(info.value)


def test_missing_columns_and_missing_file(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "m.csv", [{"path": "a.png", "label": "x"}])
    with pytest.raises(ManifestError, match="missing column.*image.*site"):
        load_manifest(csv)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")


def test_write_is_relative_and_round_trips(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "x.png")
    df = pd.DataFrame(
        [
            {
                "image": str(tmp_path / "data" / "x.png"),
                "label": "normal",
                "site": "s",
                "bias": "covid",
            }
        ]
    )
    out = write_manifest(df, tmp_path / "out" / "manifest.csv")
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert raw.loc[0, "image"] == "../data/x.png"
    back = load_manifest(out)
    assert back.loc[0, "image"] == str((tmp_path / "data" / "x.png").resolve())
    assert back.loc[0, "bias"] == "covid"  # extra columns survive
    assert not list(out.parent.glob(".*tmp*"))


def test_build_from_folders(tmp_path: Path) -> None:
    for label, n in (("normal", 2), ("pneumonia", 3)):
        for i in range(n):
            _png(tmp_path / "root" / label / f"{i}.png")
    (tmp_path / "root" / "normal" / "notes.txt").write_text("not an image")
    out = build_from_folders(tmp_path / "root", tmp_path / "m.csv", site="hospital_a", split="test")
    df = load_manifest(out)
    assert len(df) == 5
    assert sorted(df["label"].value_counts().items()) == [("normal", 2), ("pneumonia", 3)]
    assert set(df["site"]) == {"hospital_a"} and set(df["split"]) == {"test"}
    assert len(select(df, sites=["hospital_a"], splits=["train"])) == 0
    with pytest.raises(ManifestError, match="no images found"):
        build_from_folders(_empty(tmp_path), tmp_path / "e.csv", site="s")


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty" / "cls"
    d.mkdir(parents=True)
    return d.parent
