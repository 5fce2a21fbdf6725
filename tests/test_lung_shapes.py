"""Real lung-field shapes (torchxrayvision==1.5.7's V7 Labs masks) in the phantoms. Fetches the
wheel from PyPI once into a cache shared across tests: $ISNET_CXR_TEST_CACHE, else
<system temp>/isnet-cxr-test-cache (the same approach as tests/test_synthetic_ct.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cxr_io.settings import Settings
from synthetic import default_sites, image_seed, make_dataset, render_case
from synthetic.lung_shapes import load_lung_shapes, sample_lung_pair, shapes_path, split_pair

pytestmark = pytest.mark.network_data


def test_real_lung_shapes_in_phantoms(shared_data_home, tmp_path):
    settings = Settings.from_env()
    shapes = load_lung_shapes(settings)
    assert shapes_path(settings).is_file()
    n, two, s, s2 = shapes.shape
    assert (two, s, s2) == (2, 256, 256) and 300 <= n <= 517  # most of the 517 are clean pairs
    # image-left lung left of image-right lung, both non-empty, for every kept pair
    cols = np.arange(s)
    left_c = (shapes[:, 0].sum(1) * cols).sum(1) / shapes[:, 0].sum((1, 2))
    right_c = (shapes[:, 1].sum(1) * cols).sum(1) / shapes[:, 1].sum((1, 2))
    assert np.all(left_c < s / 2) and np.all(right_c > s / 2)
    assert not np.any(shapes[:, 0] & shapes[:, 1])

    # a one-lung mask is rejected
    assert split_pair(shapes[0, 0]) is None

    # the sampler: seeded, two lungs inside the requested box
    a = sample_lung_pair(shapes, 96, np.random.default_rng(3), box=(10, 80, 8, 88))
    b = sample_lung_pair(shapes, 96, np.random.default_rng(3), box=(10, 80, 8, 88))
    assert a.shape == (2, 96, 96) and np.array_equal(a, b)
    rows, cols2 = np.nonzero(a[0] | a[1])
    assert rows.min() >= 5 and rows.max() <= 86 and cols2.min() >= 3 and cols2.max() <= 93
    assert a[0].sum() > 0.05 * 96 * 96 and a[1].sum() > 0.05 * 96 * 96

    # a phantom with real lungs: the ground truth differs from the drawn one for the same seed,
    # stays two lungs inside the body, and the lungs are darker than the rest of the body
    site = default_sites()[0]
    drawn = render_case(site, "normal", 7, size=96)
    real = render_case(site, "normal", 7, size=96, lung_shapes=shapes)
    assert not np.array_equal(drawn.mask, real.mask)
    assert real.mask.sum() > 0.1 * 96 * 96 and not np.any(real.mask & ~real.body)
    _, parts = ndimage.label(real.mask)
    assert parts >= 2
    lungs = real.display[real.mask].mean()
    soft = real.display[real.body & ~ndimage.binary_dilation(real.mask, iterations=3)].mean()
    assert lungs < soft - 0.1

    # make_dataset: default unchanged (drawn), "real" writes masks matching render_case
    out = make_dataset(
        tmp_path / "real",
        [site],
        n_per_site=3,
        size=64,
        seed=0,
        workers=1,
        progress=False,
        lung_shapes="real",
    )
    row = pd.read_csv(out).iloc[0]
    mask = np.asarray(Image.open(out.parent / row["mask"])) > 127
    ref = render_case(site, row["label"], image_seed(0, site, 0), size=64, lung_shapes=shapes).mask
    assert np.array_equal(mask, ref)
    with pytest.raises(ValueError, match="lung_shapes"):
        make_dataset(tmp_path / "bad", [site], n_per_site=1, size=64, lung_shapes="round")
