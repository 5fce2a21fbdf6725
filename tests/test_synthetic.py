"""Tests of the phantom-mode synthetic chest X-ray generator (tiny images, few cases)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from synthetic import (
    CLASSES,
    CR_STORAGE,
    DX_STORAGE,
    MANIFEST_COLUMNS,
    SiteConfig,
    assign_bias,
    default_sites,
    expected_agreement,
    image_seed,
    make_bias_test_sets,
    make_dataset,
    render_case,
    render_previews,
    window_tags,
)

SIZE = 64


def _sites() -> list[SiteConfig]:
    return default_sites()


def _read_manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_default_sites_shape():
    sites = default_sites()
    assert len(sites) == 3
    corr = sorted(s.bias_correlation for s in sites)
    assert corr[0] == 0.0 and 0.9 <= corr[1] <= 0.95 and 0.9 <= corr[2] <= 0.95
    assert {s.photometric for s in sites} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({s.name for s in sites}) == 3


def test_same_seed_same_pixels_whatever_workers(tmp_path):
    sites = _sites()[:2]
    m1 = make_dataset(
        tmp_path / "a", sites, n_per_site=4, size=48, seed=3, workers=1, progress=False
    )
    m2 = make_dataset(
        tmp_path / "b", sites, n_per_site=4, size=48, seed=3, workers=2, progress=False
    )
    m3 = make_dataset(
        tmp_path / "c", sites, n_per_site=4, size=48, seed=4, workers=1, progress=False
    )
    d1, d2, d3 = (_read_manifest(m) for m in (m1, m2, m3))
    pd.testing.assert_frame_equal(d1, d2)
    same_as_other_seed = 0
    for r1, r3 in zip(d1.itertuples(), d3.itertuples(), strict=True):
        p1 = pydicom.dcmread(m1.parent / r1.image).PixelData
        p2 = pydicom.dcmread(m2.parent / r1.image).PixelData
        assert p1 == p2
        assert (m1.parent / r1.mask).read_bytes() == (m2.parent / r1.mask).read_bytes()
        same_as_other_seed += p1 == pydicom.dcmread(m3.parent / r3.image).PixelData
    assert same_as_other_seed == 0


def test_manifest_columns_splits_and_ids(tmp_path):
    site = replace(_sites()[1], name="s1")
    m = make_dataset(tmp_path, [site], n_per_site=60, size=32, seed=0, workers=1, progress=False)
    assert m == tmp_path / "manifest.csv"
    df = _read_manifest(m)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert set(df["label"]) == set(CLASSES)
    assert df["label"].value_counts().tolist() == [20, 20, 20]
    assert set(df["site"]) == {"s1"}
    for cls in CLASSES:
        counts = df[df["label"] == cls]["split"].value_counts()
        assert counts["train"] == 14 and counts["val"] == 3 and counts["test"] == 3
    assert df["patient_id"].is_unique
    assert not Path(df["image"].iloc[0]).is_absolute()
    headers = [pydicom.dcmread(m.parent / p, stop_before_pixels=True) for p in df["image"]]
    header_ids = {str(h.PatientID) for h in headers}
    assert not header_ids & set(df["patient_id"])
    assert set(df["bias"]) <= {"", *CLASSES}
    from cxr_io.manifest import load_manifest

    loaded = load_manifest(m, labels=CLASSES)
    assert len(loaded) == 60 and Path(loaded["image"].iloc[0]).is_file()


def test_masks_binary_same_size_inside_body(tmp_path):
    m = make_dataset(tmp_path, _sites(), n_per_site=3, size=SIZE, seed=1, workers=1, progress=False)
    df = _read_manifest(m)
    for row in df.itertuples():
        mask = np.asarray(Image.open(m.parent / row.mask))
        assert mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.1 < (mask > 0).mean() < 0.6
    for site in _sites():
        for k, cls in enumerate(CLASSES):
            case = render_case(site, cls, image_seed(1, site, k), size=SIZE)
            assert case.mask.any()
            assert not (case.mask & ~case.body).any()


def test_markers_never_overlap_lungs_and_match_bias():
    styles = ["letter", "text", "shape", "border"]
    seen = 0
    for j, style in enumerate(styles):
        for corner in ("top-left", "bottom-right"):
            site = SiteConfig(
                name=f"m{j}",
                marker_style=style,
                marker_corner=corner,
                collimation=0.05,
                bias_correlation=1.0,
            )
            for k in range(6):
                cls = CLASSES[k % 3]
                case = render_case(site, cls, image_seed(k, site, k), size=SIZE)
                assert not (case.marker & case.mask).any()
                assert case.marker.any() == (case.bias != "")
                seen += case.bias == cls
    assert seen >= 40  # markers fit almost always at 64 px


def test_bias_assignment_rates():
    rng = np.random.default_rng(0)
    n = 6000
    labels = [CLASSES[i % 3] for i in range(n)]
    for p in (0.0, 0.5, 0.95):
        site = SiteConfig(name="b", bias_correlation=p)
        got = [assign_bias(site, lab, rng) for lab in labels]
        agree = np.mean([g == lab for g, lab in zip(got, labels, strict=True)])
        expected = expected_agreement(site)
        assert abs(agree - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9
        # markers outside the correlated share are independent of the class
        none_rate = np.mean([g == "" for g in got])
        assert abs(none_rate - (1 - p) / 4) < 0.02
    conf = SiteConfig(name="c", confounding=True, bias_correlation=0.9)
    got = [assign_bias(conf, lab, rng) for lab in labels]
    assert all(g and g != lab for g, lab in zip(got, labels, strict=True))
    assert {g for g in got} == set(CLASSES)
    none = SiteConfig(name="n", marker_style="none", bias_correlation=1.0)
    assert {assign_bias(none, lab, rng) for lab in labels} == {""}


def test_generated_bias_column_matches_config(tmp_path):
    site = SiteConfig(name="hi", bias_correlation=0.9, marker_style="shape")
    m = make_dataset(tmp_path, [site], n_per_site=60, size=48, seed=2, workers=1, progress=False)
    df = _read_manifest(m)
    agree = (df["bias"] == df["label"]).mean()
    expected = expected_agreement(site)  # 0.925
    assert abs(agree - expected) < 4 * np.sqrt(expected * (1 - expected) / len(df))
    # the bias column describes what is burned into the pixels
    first = df.iloc[0]
    case = render_case(site, first["label"], image_seed(2, site, 0), size=48)
    assert case.bias == first["bias"]


def test_findings_change_pixels_only_inside_lungs():
    for site in _sites():
        for k, cls in enumerate(CLASSES):
            seed = image_seed(5, site, k)
            with_f = render_case(site, cls, seed, size=SIZE, difficulty=0.3)
            without = render_case(site, cls, seed, size=SIZE, difficulty=0.3, with_finding=False)
            diff = with_f.display != without.display
            assert np.array_equal(with_f.mask, without.mask)
            assert not (diff & ~with_f.mask).any()
            if cls == "normal":
                assert not diff.any()
            else:
                assert diff.sum() > 0.02 * with_f.mask.sum()
                # findings are dense: they brighten the lungs
                gain = with_f.display[with_f.mask].mean() - without.display[with_f.mask].mean()
                assert gain > 0


def test_difficulty_scales_findings():
    site = _sites()[2]
    seed = image_seed(0, site, 1)
    easy = render_case(site, "pneumonia", seed, size=SIZE, difficulty=0.0).finding.sum()
    hard = render_case(site, "pneumonia", seed, size=SIZE, difficulty=1.0).finding.sum()
    assert easy > 2 * hard > 0


def test_dicom_headers_and_monochrome1_inverted(tmp_path):
    sites = _sites()
    m = make_dataset(tmp_path, sites, n_per_site=2, size=SIZE, seed=0, workers=1, progress=False)
    df = _read_manifest(m)
    for site in sites:
        row = df[df["site"] == site.name].iloc[0]
        ds = pydicom.dcmread(m.parent / row["image"])
        assert ds.SOPClassUID == (CR_STORAGE if site.modality == "CR" else DX_STORAGE)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.Modality == site.modality
        assert ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition == site.view_position
        assert ds.PhotometricInterpretation == site.photometric
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (
            16,
            site.bits_stored,
            site.bits_stored - 1,
        )
        assert ds.Rows == ds.Columns == SIZE
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(
            site.pixel_spacing_mm * 256 / SIZE, rel=1e-3
        )
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == pytest.approx(window_tags(site))
        assert str(ds.PatientName) and str(ds.PatientBirthDate).isdigit()
        assert ds.StudyInstanceUID != ds.SeriesInstanceUID != ds.SOPInstanceUID
        arr = ds.pixel_array.astype(float)
        assert arr.max() <= (1 << site.bits_stored) - 1
        mask = np.asarray(Image.open(m.parent / row["mask"])) > 127
        lung, spine = arr[mask].mean(), arr[:, SIZE // 2 - 1 : SIZE // 2 + 1].mean()
        if site.photometric == "MONOCHROME1":  # air (lungs) stored high: displayed dark
            assert lung > spine
        else:
            assert lung < spine
        # stored values are exactly the rendered image (inverted for MONOCHROME1)
        case = render_case(site, row["label"], image_seed(0, site, 0), size=SIZE)
        assert np.array_equal(arr, case.stored)


def test_bias_test_sets_differ_only_in_markers(tmp_path):
    base = _sites()[0]
    m = make_bias_test_sets(tmp_path, base, n=9, size=SIZE, seed=7, workers=1, progress=False)
    df = _read_manifest(m)
    names = [f"{base.name}-biased", f"{base.name}-unbiased", f"{base.name}-confounding"]
    assert sorted(set(df["site"])) == sorted(names)
    assert set(df["split"]) == {"test"}
    by = {n: df[df["site"] == n].reset_index(drop=True) for n in names}
    assert (by[names[1]]["bias"] == "").all()
    conf = by[names[2]]
    assert ((conf["bias"] != conf["label"]) & (conf["bias"] != "")).all()
    for i in range(len(by[names[0]])):
        labels = {by[n].loc[i, "label"] for n in names}
        assert len(labels) == 1
        imgs = [pydicom.dcmread(m.parent / by[n].loc[i, "image"]).pixel_array for n in names]
        assert np.array_equal(imgs[0].shape, imgs[1].shape)
        differs = (imgs[1] != imgs[2]) | (imgs[0] != imgs[1])
        mask = np.asarray(Image.open(m.parent / by[names[0]].loc[i, "mask"])) > 127
        assert not (differs & mask).any()
        assert differs.mean() < 0.1  # only the marker areas differ


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="bias_correlation"):
        SiteConfig(name="x", bias_correlation=1.5)
    with pytest.raises(ValueError, match="photometric"):
        SiteConfig(name="x", photometric="RGB")
    with pytest.raises(ValueError, match="name"):
        SiteConfig(name="a/b")
    with pytest.raises(ValueError, match="unique"):
        make_dataset(
            tmp_path,
            [SiteConfig(name="x"), SiteConfig(name="x")],
            n_per_site=1,
            size=32,
            progress=False,
        )
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset(tmp_path, None, n_per_site=1, size=32, difficulty=2.0, progress=False)
    with pytest.raises(ValueError, match="unknown class"):
        render_case(_sites()[0], "tuberculosis", 0, size=32)


def test_render_previews(tmp_path):
    m = make_dataset(
        tmp_path / "d", _sites(), n_per_site=3, size=SIZE, seed=0, workers=1, progress=False
    )
    paths = render_previews(m, tmp_path / "img")
    assert [p.name for p in paths] == ["synthetic_classes.png", "synthetic_sites.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.width > 300 and img.height > 100


@pytest.mark.parametrize("apply_voi", [True, False])
def test_load_cxr_reads_bright_dense(tmp_path, apply_voi):
    from cxr_io.readers import load_cxr, load_mask

    m = make_dataset(tmp_path, _sites(), n_per_site=1, size=SIZE, seed=0, workers=1, progress=False)
    df = _read_manifest(m)
    for row in df.itertuples():
        img = load_cxr(m.parent / row.image, apply_voi=apply_voi)
        mask = load_mask(m.parent / row.mask)
        assert img.pixels.shape == mask.shape == (SIZE, SIZE)
        assert img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0
        mid = img.pixels[SIZE // 4 : 3 * SIZE // 4, SIZE // 2 - 1 : SIZE // 2 + 1].mean()
        assert img.pixels[mask].mean() + 0.15 < mid  # lungs dark, mediastinum bright
        ds = pydicom.dcmread(m.parent / row.image, stop_before_pixels=True)
        assert img.meta["photometric"] == ds.PhotometricInterpretation
        assert str(ds.PatientID) not in str(img.meta["pseudo_id"])
