"""The bundle commands of the README run as written: the classifier's inference bundle with no
overrides (the shipped default classifier on generated sample films), each network's own
metadata through `verify_net_in_out` / `verify_metadata`, the logging config, the evaluate.json
overlay, and the training bundles' MLflow runs (params, model artifact, dataset)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow

from classification.model_card import read_model_card
from tests.test_train import SIZE, make_tiny_manifest

ROOT = Path(__file__).resolve().parents[1]
MONAI_BUNDLE = [sys.executable, "-m", "monai.bundle"]


def _bundle_copy(tmp_path: Path) -> Path:
    """A folder laid out like the repository root (configs/ and models/), so commands run there
    exactly as the README writes them without writing into the checkout."""
    root = tmp_path / "bundle"
    root.mkdir()
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "models", root / "models")
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_default_classifier_ships_small_and_says_it_is_synthetic() -> None:
    weights = ROOT / "models" / "model.pt"
    assert weights.stat().st_size < 1_000_000
    card = read_model_card(weights)
    assert (card.backbone, card.size) == ("small_cnn", 64)
    assert "synthetic data only" in card.training["note"]
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [card.size, card.size]  # what the model runs at
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[str(i)] for i in range(card.num_classes)] == list(card.classes)
    seg_meta = json.loads((ROOT / "configs" / "metadata_seg.json").read_text())
    seg_spec = json.loads((ROOT / "models" / "seg_unet_synthetic.json").read_text())
    seg_in = seg_meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert seg_in == seg_spec["spatial_size"]
    train_seg = json.loads((ROOT / "configs" / "train_seg.json").read_text())
    assert train_seg["epochs"] == 40 and train_seg["train"]["trainer"]["max_epochs"] == "@epochs"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "models/model.pt"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 1  # committed, not ignored


@pytest.mark.slow
def test_readme_bundle_commands_run_as_written(tmp_path) -> None:
    root = _bundle_copy(tmp_path)
    res = _run([*MONAI_BUNDLE, "run", "--config_file", "configs/inference.json"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Setting logging properties based on config: configs/logging.conf" in res.stdout
    assert "logging.conf" not in res.stderr  # no warning that it is missing
    probs = pd.read_csv(root / "outputs" / "inference" / "probabilities.csv")
    assert len(probs) == 9 and {"prob_covid", "prob_normal", "prob_pneumonia"} <= set(probs)
    # the default classifier learned something: most of the generated sample films right
    truth = pd.read_csv(root / "outputs" / "inference" / "sample_data" / "manifest.csv")
    rel = truth.set_index("image")["label"]
    assert (probs["pred"].to_numpy() == rel[probs["rel_path"]].to_numpy()).mean() >= 0.5

    for meta, config in [
        ("configs/metadata.json", "configs/inference.json"),
        ("configs/metadata_seg.json", "configs/infer_seg.json"),
    ]:
        res = _run(
            [
                *MONAI_BUNDLE,
                "verify_net_in_out",
                "network",
                "--meta_file",
                meta,
                "--config_file",
                config,
            ],
            root,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "data shape of network is verified with no error" in res.stdout + res.stderr
        res = _run(
            [
                *MONAI_BUNDLE,
                "verify_metadata",
                "--meta_file",
                meta,
                "--filepath",
                "configs/metadata_schema.json",
            ],
            root,
        )
        assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_train_then_evaluate_overlay_and_mlflow_run_contents(tmp_path) -> None:
    from mlflow import MlflowClient

    make_tiny_manifest(tmp_path / "data", n=30)  # enough for test rows in every class
    out = tmp_path / "out"
    common = dict(
        bundle_root=str(ROOT),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(out),
        size=SIZE,
        epochs=1,
        batch_size=4,
        seed=1,
        method="segment_then_classify",
    )
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train.json"),
        workflow_type="train",
        tracking="mlflow",
        **common,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    run_name = wf.parser.get_parsed_content("run_name")
    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.info.run_name == run_name
    ]
    params = run.data.params
    assert params["method"] == "segment_then_classify" and params["size"] == str(SIZE)
    assert params["classes"] == '["covid", "normal", "pneumonia"]' and "lr" in params
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "model_artifact")}
    assert arts == {"model_artifact/model.pt", "model_artifact/model.json"}  # model-zoo names
    from pipeline import Predictor

    p = Predictor.load(
        f"runs:/{run.info.run_id}/model_artifact", tracking_uri=f"sqlite:///{out / 'mlruns.db'}"
    )
    assert p.card.method == "segment_then_classify"
    (inp,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert inp.dataset.name.startswith("train-")

    # model-zoo overlay: evaluate the trained model on the manifest's test rows
    ev = ConfigWorkflow(
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "evaluate.json")],
        workflow_type="train",
        **common,
    )
    ev.initialize()
    ev.run()
    ev.finalize()
    evaluator = ev.parser.get_parsed_content("validate#evaluator")
    n_test = len(pd.read_csv(tmp_path / "data" / "manifest.csv").query("split == 'test'"))
    assert evaluator.state.iteration >= 1 and n_test > 0
    assert 0.0 <= evaluator.state.metrics["val_acc"] <= 1.0
    saved = torch.load(out / "best_model.pt", weights_only=True)
    net = ev.parser.get_parsed_content("network")
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())  # loaded
    assert (out / "eval" / "val_acc_raw.csv").is_file() or list((out / "eval").glob("*.csv"))
