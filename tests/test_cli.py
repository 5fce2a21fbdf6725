"""The `isnet-cxr data ...` commands: real files in, clear messages and exit codes out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from evaluation.figures import OUTLINE_RGB
from pipeline.cli import app
from tests.dicom_factory import write_cxr_dicom

runner = CliRunner()


def test_synth_check_and_show(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    res = runner.invoke(
        app,
        ["data", "synth", "--out", str(out), "--n-per-site", "6", "--size", "64", "--workers", "1"],
    )
    assert res.exit_code == 0, res.output
    manifest = out / "manifest.csv"
    assert "18 images" in res.output and "hospital-c" in res.output

    res = runner.invoke(app, ["data", "check", str(manifest)])
    assert res.exit_code == 0 and "manifest OK" in res.output

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    image, mask = out / df.loc[0, "image"], out / df.loc[0, "mask"]
    preview = tmp_path / "preview.png"
    res = runner.invoke(
        app, ["data", "show", str(image), "--out", str(preview), "--mask", str(mask)]
    )
    assert res.exit_code == 0, res.output
    rgb = np.asarray(Image.open(preview))
    assert rgb.shape == (64, 64, 3)
    outline = np.all(rgb == OUTLINE_RGB, axis=-1)
    assert 20 < outline.sum() < 64 * 64 // 4  # the lung outline is drawn, not the whole image
    assert "anon-" in res.output  # pseudonymous id, never the header's PatientID
    assert "PatientID" not in res.output


def test_check_reports_problems_with_exit_code(tmp_path: Path) -> None:
    pd.DataFrame(
        [
            {"image": "missing.dcm", "label": "normal", "site": "a"},
            {"image": "", "label": "", "site": "a"},
        ]
    ).to_csv(tmp_path / "bad.csv", index=False)
    res = runner.invoke(app, ["data", "check", str(tmp_path / "bad.csv")])
    assert res.exit_code == 2
    assert "row 2: image file not found" in res.output
    assert "row 3: empty image path" in res.output and "row 3: empty label" in res.output


def test_show_names_the_broken_file(tmp_path: Path) -> None:
    good = write_cxr_dicom(tmp_path / "ok.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:-40])
    res = runner.invoke(app, ["data", "show", str(broken), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert "broken.dcm" in res.output and "error:" in res.output
    assert not (tmp_path / "x.png").exists()
