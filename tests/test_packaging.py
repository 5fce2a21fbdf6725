"""The installed package works outside the source checkout: the default segmenter and the configs
ship inside it (cxr_io.resources), so `isnet-cxr seg predict` runs from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dicom_factory import write_cxr_dicom
from tests.test_batch import chest_like

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import pipeline, cxr_io.resources as r
print("PKG", pipeline.__file__)
print("SEG", r.default_segmenter())
print("CFG", r.bundle_file("configs", "study.json"))
from pipeline.cli import app
sys.argv = ["isnet-cxr", "seg", "predict", sys.argv[1], "--out", sys.argv[2]]
app()
"""


def install_outside(tmp_path: Path) -> Path:
    """Install the package (no dependencies) into ``tmp_path/site`` and return that folder.

    Built from a copy of the source: pip builds in the source tree, which must stay untouched.
    """
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "outputs", "data", "*.egg-info", "docs", "tests")
    shutil.copytree(ROOT, src, ignore=skip)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True)
    return site


@pytest.mark.slow
def test_installed_package_runs_seg_predict_outside_the_checkout(tmp_path) -> None:
    site = install_outside(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    image = write_cxr_dicom(work / "film.dcm", chest_like(np.random.default_rng(0)), BitsStored=12)
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(image), str(work / "out")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = dict(
        line.split(" ", 1) for line in res.stdout.splitlines() if line[:3] in {"PKG", "SEG", "CFG"}
    )
    for key in ("PKG", "SEG", "CFG"):
        assert lines[key].startswith(str(site)), (key, lines[key])  # not the checkout
    assert (work / "out" / "quality.csv").is_file()
    assert (work / "out" / "masks" / "film.png").is_file()
