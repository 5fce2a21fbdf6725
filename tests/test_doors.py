"""Every door takes the same path from image to answer (the Predictor), and every training path
writes the same model artifact.

- the batch run, the MONAI inference bundle and the study's evaluation give the same
  probabilities and heatmaps for the same image and model;
- a classifier trained with ``monai.bundle run --config_file configs/train.json`` is used as it
  is by ``configs/inference.json``, ``batch run`` and ``Predictor.load``;
- the class order of the bundle metadata is the models' output order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow

from classification.model_card import read_model_card
from cxr_io.manifest import class_names, load_manifest
from cxr_io.readers import save_mask_png
from pipeline import Predictor
from pipeline.batch import run_batch
from pipeline.study import predict_records
from tests.dicom_factory import write_cxr_dicom
from tests.test_batch import CLASSES, chest_like, make_model
from tests.test_train import SIZE, make_tiny_manifest

ROOT = Path(__file__).resolve().parents[1]
N = 4


def _folder(root: Path) -> list[Path]:
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    return [write_cxr_dicom(root / f"img{i}.dcm", chest_like(rng), BitsStored=12) for i in range(N)]


def _bundle(config: str, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / config),
        workflow_type="infer" if config == "inference.json" else "train",
        bundle_root=str(ROOT),
        **overrides,
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


def _probs(frame: pd.DataFrame, classes) -> np.ndarray:
    return frame[[f"prob_{c}" for c in classes]].astype(float).to_numpy()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["isnet", "segment_then_classify"])
def test_batch_bundle_and_study_give_the_same_answer(tmp_path, method) -> None:
    files = _folder(tmp_path / "data")
    ckpt = make_model(tmp_path / "model", method, seed=5)
    predictor = Predictor.load(ckpt.parent)
    direct = predictor.predict_files(files)
    ref_probs = np.stack([p.probs for p in direct])
    ref_heat = np.stack([p.heatmap for p in direct])
    assert ref_heat.shape == (N, SIZE, SIZE) and np.abs(ref_heat).sum() > 0
    heat_tol = 1e-5 * np.abs(ref_heat).max()  # float32 sums in another batch size

    # door 1: batch run (same keyed ids as the bundle)
    run_batch(tmp_path / "data", ckpt.parent, tmp_path / "batch", batch_size=3, progress=False)
    batch = pd.read_csv(tmp_path / "batch" / "predictions.csv", dtype=str).sort_values("rel_path")
    np.testing.assert_allclose(_probs(batch, CLASSES), ref_probs, atol=1e-6)
    shares = [p.relevance["background_share"] for p in direct]
    np.testing.assert_allclose(batch["background_share"].astype(float), shares, atol=1e-6)

    # door 2: the MONAI inference bundle, with heatmaps
    _bundle(
        "inference.json",
        dataset_dir=str(tmp_path / "data"),
        ckpt_path=str(ckpt),
        output_dir=str(tmp_path / "bundle"),
        batch_size=3,
        save_heatmaps=True,
    )
    bundle = pd.read_csv(tmp_path / "bundle" / "probabilities.csv", dtype=str)
    bundle = bundle.sort_values("rel_path")
    np.testing.assert_allclose(_probs(bundle, CLASSES), ref_probs, atol=1e-6)
    assert list(bundle["pseudo_id"]) == list(batch["pseudo_id"])
    heat = np.stack(
        [np.load(tmp_path / "bundle" / "heatmaps" / f"{p}.npy") for p in bundle.pseudo_id]
    )
    np.testing.assert_allclose(heat, ref_heat, atol=heat_tol)

    # door 3: the study's evaluation, with the segmenter's masks in the manifest (as its masks
    # step writes them)
    records = []
    (tmp_path / "masks").mkdir()
    for i, (f, p) in enumerate(zip(files, direct, strict=True)):
        mask = save_mask_png(p.mask, tmp_path / "masks" / f"{i}.png")
        records.append({"image": str(f), "label": 0, "mask": str(mask)})
    study = predict_records(Predictor(predictor.classifier, predictor.card), records, N)
    np.testing.assert_allclose(study.probs, ref_probs, atol=1e-6)
    np.testing.assert_allclose(np.stack([e[2] for e in study.examples]), ref_heat, atol=heat_tol)
    # the study reads each set once at the network size and shares it between its models: the
    # same numbers, bit for bit, as predicting from the files with the same masks and batches
    files_masks = predictor.predict_files(files, [r["mask"] for r in records], batch_size=32)
    np.testing.assert_array_equal(study.probs, np.stack([p.probs for p in files_masks]))
    heat_files = np.stack([p.heatmap for p in files_masks])
    np.testing.assert_array_equal(np.stack([e[2] for e in study.examples]), heat_files)


def test_the_study_reads_an_evaluation_set_once_per_fold_within_its_memory_budget(tmp_path):
    from pipeline.study import EvalInputCache

    files = _folder(tmp_path / "data")
    records = [{"image": str(f), "label": 0} for f in files]
    predictor = Predictor.load(make_model(tmp_path / "model").parent)
    cache = EvalInputCache()
    first = cache.get("fold-a", "site-x", predictor, records)
    assert len(first.images) == N and first.images[0].shape == (1, SIZE, SIZE)
    assert first.masks is None  # records without masks
    assert cache.get("fold-a", "site-x", predictor, records) is first  # read once
    assert cache.get("fold-a", "site-y", predictor, records) is not first
    cache.get("fold-b", "site-x", predictor, records)  # another fold drops the previous sets
    again = cache.get("fold-a", "site-x", predictor, records)
    assert again is not first and all(map(torch.equal, again.images, first.images))
    # a set over the budget is read for each model, as without the cache
    small = EvalInputCache(max_bytes=first.nbytes - 1)
    assert small.get("f", "x", predictor, records) is not small.get("f", "x", predictor, records)


@pytest.mark.slow
def test_bundle_trained_classifier_is_used_as_it_is_everywhere(tmp_path) -> None:
    manifest = make_tiny_manifest(tmp_path / "data")
    out = tmp_path / "trained"
    _bundle(
        "train.json",
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(out),
        method="isnet",
        method_params={"variant": "selective"},
        size=SIZE,
        epochs=1,
        tune_epochs=1,
        batch_size=4,
    )
    card = read_model_card(out / "best_model.pt")
    assert list(card.classes) == class_names(load_manifest(manifest))  # output order
    constants = json.loads((out / "isnet_constants.json").read_text())
    assert card.method_params["C1"] == pytest.approx(constants["C1"])  # tuned constants kept
    assert card.training["n_train"] > 0 and card.training["sites"] == ["hospital-a"]

    images = sorted((tmp_path / "data" / "images").rglob("*.dcm"))[:3]
    predictor = Predictor.load(out)
    direct = np.stack([p.probs for p in predictor.predict_files(images, heatmaps=False)])

    (tmp_path / "some").mkdir()
    for f in images:
        (tmp_path / "some" / f.name).write_bytes(f.read_bytes())
    summary = run_batch(tmp_path / "some", out, tmp_path / "batch", heatmaps=False, progress=False)
    assert summary.predictions == 3
    batch = pd.read_csv(tmp_path / "batch" / "predictions.csv", dtype=str).sort_values("rel_path")
    np.testing.assert_allclose(_probs(batch, card.classes), direct, atol=1e-6)

    _bundle(
        "inference.json",
        dataset_dir=str(tmp_path / "some"),
        ckpt_path=str(out / "best_model.pt"),
        output_dir=str(tmp_path / "bundle"),
    )
    bundle = pd.read_csv(tmp_path / "bundle" / "probabilities.csv", dtype=str)
    np.testing.assert_allclose(
        _probs(bundle.sort_values("rel_path"), card.classes), direct, atol=1e-6
    )


def test_bundle_metadata_states_the_models_class_order() -> None:
    from synthetic import CLASSES as SYNTHETIC_CLASSES

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    stated = [channel_def[str(i)] for i in range(len(channel_def))]
    # a model's output order is the sorted label names of its training manifest
    assert stated == class_names(pd.DataFrame({"label": list(SYNTHETIC_CLASSES)}))


def test_predictor_refuses_what_it_cannot_use(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model weights"):
        Predictor.load(tmp_path)
    ckpt = make_model(tmp_path / "m", "segment_then_classify")
    p = Predictor.load(ckpt)
    with pytest.raises(ValueError, match=r"\[H, W\] or \[1, H, W\]"):
        p(np.zeros((2, 3, 8, 8), np.float32))
    one = p(np.random.default_rng(0).random((40, 36)).astype(np.float32))
    assert one.mask.shape == (40, 36) and one.label in CLASSES
    assert one.heatmap.shape == (SIZE, SIZE)
