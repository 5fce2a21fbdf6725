"""The bias-free re-rendering (reference for the ISNet): same patients, no markers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
from PIL import Image

from synthetic import bias_free_sites, default_sites, make_dataset

SIZE = 48


def test_bias_free_sites_render_the_same_patients_without_markers(tmp_path) -> None:
    sites = [s for s in default_sites() if s.marker_style != "none"][:2]
    clean = bias_free_sites(sites)
    assert [s.name for s in clean] == [s.name for s in sites]
    assert all(
        s.marker_style == "none" and s.key == b.key for s, b in zip(clean, sites, strict=True)
    )
    kw = dict(n_per_site=9, size=SIZE, seed=3, workers=1, progress=False)
    biased = make_dataset(tmp_path / "biased", sites, **kw)
    free = make_dataset(tmp_path / "free", clean, **kw)
    a = pd.read_csv(biased, keep_default_na=False)
    b = pd.read_csv(free, keep_default_na=False)
    for col in ("image", "label", "site", "split", "patient_id"):
        assert a[col].tolist() == b[col].tolist()
    assert (a["bias"] != "").mean() > 0.5 and (b["bias"] == "").all()
    n_differ = 0
    for i in range(len(a)):
        ia = pydicom.dcmread(biased.parent / a.loc[i, "image"]).pixel_array
        ib = pydicom.dcmread(free.parent / b.loc[i, "image"]).pixel_array
        mask = np.asarray(Image.open(biased.parent / a.loc[i, "mask"])) > 127
        differs = ia != ib
        assert not (differs & mask).any()  # the lungs are the same pixels
        assert differs.mean() < 0.1  # only the marker areas differ
        n_differ += bool(differs.any())
    assert n_differ >= len(a) // 2  # the markers really were removed
