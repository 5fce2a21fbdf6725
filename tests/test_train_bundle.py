"""The classifier training bundle (configs/train.json) through monai.bundle.ConfigWorkflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from classification.models import build_backbone
from tests.test_train import SIZE, make_tiny_manifest

pytestmark = pytest.mark.slow  # end to end through real engines

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "train.json")


def _workflow(dataset_dir: Path, out: Path, tracking: str | None = None, **kw) -> ConfigWorkflow:
    overrides = dict(
        bundle_root=str(ROOT),
        dataset_dir=str(dataset_dir),
        output_dir=str(out),
        size=SIZE,
        epochs=2,
        batch_size=4,
        seed=1,
    )
    overrides.update(kw)
    return ConfigWorkflow(config_file=CONFIG, workflow_type="train", tracking=tracking, **overrides)


def test_bundle_trains_standard(tmp_path) -> None:
    make_tiny_manifest(tmp_path / "data")
    out = tmp_path / "out"
    wf = _workflow(tmp_path / "data", out)
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    assert wf.trainer.state.epoch == 2
    assert "val_acc" in wf.evaluator.state.metrics
    state = torch.load(out / "best_model.pt", weights_only=True)
    build_backbone("small_cnn", 3).load_state_dict(state)
    assert (out / "last_model.pt").is_file()
    assert (out / "checkpoints" / "resume_checkpoint_epoch=2.pt").is_file()
    assert json.loads((out / "best_metric.json").read_text())["metric"] == "val_acc"


def test_bundle_isnet_with_mlflow_tracking(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    make_tiny_manifest(tmp_path / "data")
    out = tmp_path / "out"
    names = []
    for _ in range(2):
        wf = _workflow(
            tmp_path / "data",
            out,
            tracking="mlflow",
            method="isnet",
            method_params={"variant": "selective"},
            tune_epochs=1,
            epochs=1,
        )
        wf.initialize()
        assert not wf.check_properties()
        wf.run()
        wf.finalize()
        names.append(wf.parser.get_parsed_content("run_name"))
    constants = json.loads((out / "isnet_constants.json").read_text())
    assert 0 < constants["C1"] <= constants["C2"]
    # as in `isnet-cxr train`: the ISNet is selected on its validation loss (CE + heatmap loss)
    assert json.loads((out / "best_metric.json").read_text())["metric"] == "val_loss"

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("isnet_cxr_train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and len(set(names)) == 2
    assert {r.info.run_name for r in runs} == set(names)
    assert all(r.info.status == "FINISHED" for r in runs)  # no run left RUNNING
    for r in runs:
        assert {"train_loss", "val_acc", "train_heatmap"} <= set(r.data.metrics)
