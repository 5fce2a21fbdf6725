"""The bias-free reference of a study: the standard classifier trained on the same patients
re-rendered without background markers, tested on the same sets as every method."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_io.manifest import load_manifest
from cxr_io.readers import load_cxr
from pipeline.study import (
    NO_MARKERS,
    MethodSpec,
    StudyConfig,
    _no_markers_need_masks,
    ensure_masks,
    plan_folds,
    prepare_data,
    run_study,
    synthetic_layout,
)

REFERENCE = {"name": "standard", "label": "reference-no-markers", "train_data": "no_markers"}
TINY = {"n_per_site": 21, "size": 64, "seed": 0, "difficulty": 0.0, "bias_test_n": 6}


def _cfg(**kw) -> StudyConfig:
    raw = {"synthetic": TINY, "bias_sets": False, "methods": ["standard", REFERENCE], **kw}
    cfg = StudyConfig.from_dict(raw)
    return replace(cfg, **synthetic_layout(cfg.synthetic))


def test_no_marker_rendering_keeps_patients_labels_splits_and_lungs(tmp_path) -> None:
    cfg = _cfg()
    paths = prepare_data(cfg, tmp_path, log=lambda _: None)
    assert [p.parent.name for p in paths] == ["sites", "no_markers"]
    sites, free = (load_manifest(p) for p in paths)
    for site in cfg.train_sites:
        a = sites[sites.site == site].reset_index(drop=True)
        b = free[free.site == site + NO_MARKERS].reset_index(drop=True)
        assert len(a) == len(b) == TINY["n_per_site"]
        for col in ("patient_id", "label", "split"):
            assert list(a[col]) == list(b[col])
        assert (a["bias"] != "").any() and (b["bias"] == "").all()
        for i in range(len(a)):
            assert np.array_equal(
                np.asarray(Image.open(a["mask"][i])), np.asarray(Image.open(b["mask"][i]))
            )
        # only pixels outside the lungs change (the marker); the lungs are the same
        img_a, img_b = load_cxr(a["image"][0]).pixels, load_cxr(b["image"][0]).pixels
        lungs = np.asarray(Image.open(a["mask"][0])) > 0
        if a["bias"][0]:
            assert not np.allclose(img_a, img_b)
        np.testing.assert_allclose(img_a[lungs], img_b[lungs], atol=0.02)


def test_folds_give_the_reference_the_same_patients_without_markers(tmp_path) -> None:
    cfg = _cfg()
    df = pd.concat([load_manifest(p) for p in prepare_data(cfg, tmp_path, lambda _: None)])
    (fold,) = plan_folds(cfg, df)
    assert {e.name for e in fold.evals} == {"internal-test", "hospital-c"}  # not a test site
    std, ref = cfg.methods
    train, val = fold.training_rows(std)
    ref_train, ref_val = fold.training_rows(ref)
    assert train is fold.train and set(ref_train.site) == {s + NO_MARKERS for s in cfg.train_sites}
    assert sorted(ref_train.patient_id) == sorted(train.patient_id)
    assert sorted(ref_val.patient_id) == sorted(val.patient_id)


def test_reference_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="train_data must be one of"):
        MethodSpec("standard", train_data="clean")
    with pytest.raises(ValueError, match="needs the embedded synthetic data"):
        StudyConfig.from_dict({"manifests": ["m.csv"], "methods": [REFERENCE]})


@pytest.mark.slow
def test_study_reports_the_reference_and_pairs_isnet_with_it(tmp_path) -> None:
    """Each ISNet is paired with the reference, and with the ISNets listed after it (an
    ablation such as P 0 against P 0.5 is a paired comparison too)."""
    ablation = {"name": "isnet", "label": "isnet-P0", "params": {"variant": "selective", "P": 0.0}}
    cfg = _cfg(
        methods=[REFERENCE, {"name": "isnet", "params": {"variant": "selective"}}, ablation],
        train={"size": 32, "epochs": 1, "batch_size": 8, "tune_epochs": 1, "augment": False},
        n_boot=10,
        heatmap_examples=1,
    )
    res = run_study(cfg, tmp_path / "out", log=lambda _: None)
    assert set(res.results["method"]) == {"reference-no-markers", "isnet-selective", "isnet-P0"}
    pairs = set(zip(res.paired["isnet"], res.paired["comparator"], strict=True))
    assert pairs == {
        ("isnet-selective", "reference-no-markers"),
        ("isnet-selective", "isnet-P0"),
        ("isnet-P0", "reference-no-markers"),
    }
    # the same pair, from each model's own metrics
    one = res.paired[res.paired["comparator"] == "isnet-P0"].iloc[0]
    by = res.results.set_index(["method", "dataset"])["auroc_macro"]
    assert one["auroc_isnet"] == pytest.approx(by["isnet-selective", one["dataset"]])
    assert one["auroc_comparator"] == pytest.approx(by["isnet-P0", one["dataset"]])


def test_portable_site_is_an_external_site_without_markers() -> None:
    cfg = _cfg(synthetic={**TINY, "portable_site": True})
    assert cfg.external_sites == ("hospital-c", "hospital-d")
    assert cfg.train_sites == ("hospital-a", "hospital-b")
    site = cfg.synthetic.sites()[-1]
    assert site.name == "hospital-d" and site.marker_style == "none"


def test_blind_site_is_an_external_site_after_the_portable_one() -> None:
    cfg = _cfg(synthetic={**TINY, "portable_site": True, "blind_site": True})
    assert cfg.external_sites == ("hospital-c", "hospital-d", "hospital-e")
    assert cfg.train_sites == ("hospital-a", "hospital-b")
    site = cfg.synthetic.sites()[-1]
    assert (site.name, site.bias_correlation, site.photometric) == (
        "hospital-e",
        0.0,
        "MONOCHROME1",
    )
    alone = _cfg(synthetic={**TINY, "blind_site": True})
    assert alone.external_sites == ("hospital-c", "hospital-e")


def test_marker_free_rendering_is_segmented_only_when_a_method_reads_its_masks(tmp_path) -> None:
    """The reference (a standard classifier) never reads lung masks: segmenting its training
    images would cost minutes of the demo for nothing; a mask-reading method on it gets them."""
    assert not _no_markers_need_masks(_cfg())
    stc_free = {"name": "segment_then_classify", "label": "stc-free", "train_data": "no_markers"}
    assert _no_markers_need_masks(_cfg(methods=["segment_then_classify", stc_free]))

    cfg = _cfg(masks="segmenter")
    sites, free = prepare_data(cfg, tmp_path, log=lambda _: None)
    lines: list[str] = []
    out = ensure_masks(cfg, [sites, free], tmp_path, lines.append, unread=[free])
    assert out[1] == free  # returned as generated, nothing segmented
    assert out[0] != sites and (load_manifest(out[0])["mask_source"] == "predicted").all()
    assert [line for line in lines if "not segmenting" in line] == [
        f"masks: not segmenting {free} (no method reads its masks)"
    ]
