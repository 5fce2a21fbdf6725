"""Bundle workflows of the lung U-Net on a tiny synthetic set (64 px, a few steps).

One module-scoped dataset and one short training serve every test here, to stay quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.handlers import from_engine

from cxr_io.manifest import load_manifest, write_manifest
from cxr_io.readers import load_mask

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CFG = str(ROOT / "configs" / "train_seg.json")
INFER_CFG = str(ROOT / "configs" / "infer_seg.json")
META = str(ROOT / "configs" / "metadata.json")
TINY = {"spatial_size": [64, 64], "batch_size": 4, "learning_rate": 0.01, "val_splits": ["test"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from synthetic import default_sites, make_dataset

    out = tmp_path_factory.mktemp("seg_data")
    sites = default_sites()[:2]
    return make_dataset(out, sites, n_per_site=8, size=64, seed=3, workers=1, progress=False)


def _train_workflow(dataset: Path, out: Path, epochs: int, **extra) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=TRAIN_CFG,
        meta_file=META,
        workflow_type="train",
        bundle_root=str(ROOT),
        dataset_dir=str(dataset.parent),
        output_dir=str(out),
        **{"train#trainer#max_epochs": epochs},
        **TINY,
        **extra,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict:
    """Train 4 epochs through the bundle; record the loss of every iteration."""
    out = tmp_path_factory.mktemp("seg_train")
    wf = _train_workflow(dataset, out, epochs=4)
    missing = wf.check_properties()
    losses: list[tuple[int, float]] = []
    trainer = wf.trainer

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(
            (engine.state.epoch, float(from_engine(["loss"], first=True)(engine.state.output)))
        )

    wf.run()
    wf.finalize()
    return {"out": out, "missing": missing, "losses": losses, "epoch": trainer.state.epoch}


def test_train_workflow_properties_and_loss_goes_down(trained):
    assert trained["missing"] == []
    assert trained["epoch"] == 4
    losses = trained["losses"]
    first = np.mean([v for e, v in losses if e == 1])
    last = np.mean([v for e, v in losses if e == 4])
    assert last < first, (first, last)
    models = trained["out"] / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    spec = json.loads((models / "model.json").read_text())
    assert spec["spatial_size"] == [64, 64]
    assert (models / "last.pt").is_file()


def _saved_epoch(path: Path) -> int:
    state = torch.load(path, weights_only=True)["trainer"]  # ignite: iteration, epoch_length
    return int(state["iteration"]) // int(state["epoch_length"])


def test_resume_continues_from_the_saved_epoch(dataset, tmp_path):
    wf = _train_workflow(dataset, tmp_path, epochs=1)
    wf.run()  # the "interrupted" run: one epoch, last.pt saved
    wf.finalize()
    assert _saved_epoch(tmp_path / "models" / "last.pt") == 1
    seen: list[int] = []
    wf2 = _train_workflow(dataset, tmp_path, epochs=2)
    trainer = wf2.trainer

    @trainer.on(__import__("ignite").engine.Events.EPOCH_STARTED)
    def _epochs(engine):
        seen.append(engine.state.epoch)

    resumer = next(
        h
        for h in wf2.parser.get_parsed_content("train#handlers")
        if type(h).__name__ == "ResumableCheckpoint"
    )
    wf2.run()
    wf2.finalize()
    assert resumer.resumed_from_epoch == 1
    assert seen == [2]  # epoch 1 is not trained again
    assert _saved_epoch(tmp_path / "models" / "last.pt") == 2
    # bit-identical to an uninterrupted 2-epoch run (every epoch's random streams are seeded
    # from (seed, epoch): cxr_io.determinism.EpochSeeder)
    whole = _train_workflow(dataset, tmp_path / "whole", epochs=2)
    whole.run()
    whole.finalize()
    a = torch.load(tmp_path / "models" / "last.pt", weights_only=True)["network"]
    b = torch.load(tmp_path / "whole" / "models" / "last.pt", weights_only=True)["network"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resume=False starts over
    wf3 = _train_workflow(dataset, tmp_path, epochs=1, resume=False)
    wf3.run()
    wf3.finalize()
    assert _saved_epoch(tmp_path / "models" / "last.pt") == 1


def test_train_with_mlflow_tracking_leaves_no_running_run(dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    for _ in range(2):
        wf = ConfigWorkflow(
            config_file=TRAIN_CFG,
            meta_file=META,
            workflow_type="train",
            bundle_root=str(ROOT),
            dataset_dir=str(dataset.parent),
            output_dir=str(tmp_path),
            tracking="mlflow",
            resume=False,
            **{"train#trainer#max_epochs": 1},
            **TINY,
        )
        wf.initialize()
        assert wf.check_properties() == []
        wf.run()
        wf.finalize()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("isnet_cxr_segmentation")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    assert len({r.info.run_name for r in runs}) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("val_mean_dice" in r.data.metrics for r in runs)


def test_infer_workflow_writes_masks_at_original_size(trained, dataset, tmp_path):
    out = tmp_path / "pred"
    wf = ConfigWorkflow(
        config_file=INFER_CFG,
        meta_file=META,
        workflow_type="infer",
        bundle_root=str(ROOT),
        dataset_dir=str(dataset.parent),
        output_dir=str(out),
        ckpt_path=str(trained["out"] / "models" / "model.pt"),
        mask_formats=["png", "nifti", "dicom_seg"],
        batch_size=4,
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    quality = pd.read_csv(out / "quality.csv", keep_default_na=False)
    df = load_manifest(dataset, check_mask_sizes=False)
    assert len(quality) == len(df)
    for row in quality.itertuples():
        mask = load_mask(row.mask_png)
        assert mask.shape == (64, 64)
        np.testing.assert_array_equal(load_mask(row.mask_nifti), mask)
        assert Path(row.dicom_seg).is_file() and Path(row.overlay).is_file()
        assert isinstance(row.ok, bool)


def test_predict_files_on_a_bigger_image_comes_back_at_its_size(trained, tmp_path):
    from segmentation.infer import predict_files
    from tests.dicom_factory import write_cxr_dicom

    pixels = np.random.default_rng(1).integers(0, 4000, (90, 70), dtype=np.uint16)
    src = write_cxr_dicom(tmp_path / "odd.dcm", pixels)
    (res,) = predict_files([src], trained["out"] / "models" / "model.pt")
    assert res.mask.shape == (90, 70) and res.prob.shape == (90, 70)
    assert res.image == str(src)
    assert set(res.quality.to_dict()) >= {"area_fraction", "n_components", "flags", "ok"}


def test_masks_step_fills_the_manifest(trained, dataset, tmp_path):
    from segmentation.masks_step import write_masks

    df = load_manifest(dataset, check_mask_sizes=False)
    keep = df["image"].iloc[0]
    df["mask"] = [m if img == keep else "" for img, m in zip(df["image"], df["mask"], strict=True)]
    given = write_manifest(df, tmp_path / "in" / "manifest.csv")
    out = write_masks(given, trained["out"] / "models" / "model.pt", tmp_path / "out")
    new = load_manifest(out)  # also checks every mask exists and has its image's size
    assert (new["mask"] != "").all()
    assert new.loc[new["image"] == keep, "mask_source"].item() == "given"
    assert (new["mask_source"] == "predicted").sum() == len(df) - 1
    assert set(new["seg_ok"]) <= {"True", "False", ""}
    assert new.loc[new["image"] == keep, "mask"].item() == df["mask"].iloc[0]
    predicted = new[new["mask_source"] == "predicted"]["mask"]
    assert all(Path(p).parent == (tmp_path / "out" / "masks").resolve() for p in predicted)
    again = write_masks(
        out, trained["out"] / "models" / "model.pt", tmp_path / "out2", overwrite=True
    )
    assert (load_manifest(again)["mask_source"] == "predicted").all()


def test_masks_step_in_worker_processes_writes_the_same_manifest(trained, dataset, tmp_path):
    """Segmenting in a pool of worker processes (one PyTorch thread each, as the study does)
    gives every row the mask, verdict and flags of the one-process path, in manifest order."""
    from segmentation.masks_step import write_masks
    from synthetic import render_pool

    ckpt = trained["out"] / "models" / "model.pt"
    here = load_manifest(write_masks(dataset, ckpt, tmp_path / "here", overwrite=True))
    with render_pool(2) as pool:
        there = load_manifest(
            write_masks(dataset, ckpt, tmp_path / "pool", overwrite=True, pool=pool)
        )
    cols = ["image", "label", "mask_source", "seg_ok", "seg_flags"]
    pd.testing.assert_frame_equal(here[cols], there[cols])
    assert [Path(m).name for m in here["mask"]] == [Path(m).name for m in there["mask"]]
    for a, b in zip(here["mask"], there["mask"], strict=True):
        same = np.mean(load_mask(a) == load_mask(b))
        assert same > 0.99, (a, same)  # one thread vs. several: rounding at the threshold


def test_masks_step_in_worker_processes_names_an_unreadable_file(trained, dataset, tmp_path):
    """A damaged image segmented in a worker process stops the step with the read error that
    names it (not a wrapping error that lost its cause crossing the process boundary)."""
    from cxr_io.readers import CXRReadError
    from segmentation.masks_step import write_masks
    from synthetic import render_pool

    df = load_manifest(dataset, check_mask_sizes=False)
    victim = tmp_path / "cut.dcm"
    good = Path(df["image"].iloc[0]).read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    df.loc[df.index[0], "image"] = str(victim)
    manifest = write_manifest(df, tmp_path / "in" / "manifest.csv")
    with render_pool(2) as pool, pytest.raises(CXRReadError, match="cut.dcm"):
        write_masks(
            manifest,
            trained["out"] / "models" / "model.pt",
            tmp_path / "o",
            overwrite=True,
            pool=pool,
        )


def test_cli_predict_and_masks(trained, dataset, tmp_path):
    from typer.testing import CliRunner

    from segmentation.cli import seg_app

    ckpt = str(trained["out"] / "models" / "model.pt")
    runner = CliRunner()
    r = runner.invoke(
        seg_app,
        ["predict", str(dataset), "--out", str(tmp_path / "p"), "--ckpt", ckpt, "--no-overlay"],
    )
    assert r.exit_code == 0, r.output
    assert "segmented" in r.output and (tmp_path / "p" / "quality.csv").is_file()
    r = runner.invoke(
        seg_app, ["masks", str(dataset), "--out", str(tmp_path / "m"), "--ckpt", ckpt]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "manifest.csv").is_file()
    r = runner.invoke(seg_app, ["predict", str(tmp_path / "nothing_here"), "--ckpt", ckpt])
    assert r.exit_code == 2 and "no images found" in r.output
