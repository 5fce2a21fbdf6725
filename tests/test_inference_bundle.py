"""The classifier's inference bundle (configs/inference.json) runs through MONAI's ConfigWorkflow
and gives the same probabilities as the batch run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monai.bundle import ConfigWorkflow

from pipeline.batch import run_batch
from tests.dicom_factory import write_cxr_dicom
from tests.test_batch import CLASSES, chest_like, make_model, planted

pytestmark = pytest.mark.slow  # end to end through real engines

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference.json"


def make_folder(root: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(n):
        write_cxr_dicom(root / f"img{i}.dcm", chest_like(rng), BitsStored=12, **planted(i))
    return root


def workflow(data: Path, ckpt: Path, out: Path) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=str(CONFIG),
        workflow_type="infer",
        bundle_root=str(ROOT),
        dataset_dir=str(data),
        ckpt_path=str(ckpt),
        output_dir=str(out),
        batch_size=2,
    )


def test_bundle_runs_and_matches_the_batch_run(tmp_path) -> None:
    data = make_folder(tmp_path / "data")
    ckpt = make_model(tmp_path / "model", seed=2)
    wf = workflow(data, ckpt, tmp_path / "bundle_out")
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()

    got = pd.read_csv(tmp_path / "bundle_out" / "probabilities.csv", dtype=str)
    assert list(got.columns) == ["pseudo_id", "rel_path", "pred"] + [f"prob_{c}" for c in CLASSES]
    assert sorted(got["rel_path"]) == [f"img{i}.dcm" for i in range(5)]
    probs = got[[f"prob_{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    run_batch(data, ckpt, tmp_path / "batch_out", heatmaps=False, progress=False)
    ref = pd.read_csv(tmp_path / "batch_out" / "predictions.csv", dtype=str)
    merged = got.merge(ref, on="pseudo_id", suffixes=("", "_batch"))
    assert len(merged) == 5  # same keyed image ids
    for c in CLASSES:
        np.testing.assert_allclose(
            merged[f"prob_{c}"].astype(float), merged[f"prob_{c}_batch"].astype(float), atol=1e-5
        )

    text = (tmp_path / "bundle_out" / "probabilities.csv").read_text().lower()
    for i in range(5):
        for value in planted(i).values():
            assert value.lower() not in text
