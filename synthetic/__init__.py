"""Multi-site synthetic chest X-rays with a controllable background bias.

Every image is a seeded drawing of a PA chest radiograph ("phantom" mode, :mod:`synthetic.phantom`)
or a radiograph projected from a real chest CT (``mode="ct"``, :mod:`synthetic.ct`). The class is
defined only by a finding inside the lung fields (``normal``: none; ``pneumonia``: one or two dense
consolidations in one lung; ``covid``: bilateral peripheral hazy opacities). Each
:class:`SiteConfig` (:mod:`synthetic.sites`) fixes the acquisition (:mod:`synthetic.acquisition`)
and a background bias marker (:mod:`synthetic.markers`) whose class agrees with the image's class
with a per-site probability: the shortcut an ordinary classifier takes and an ISNet should ignore.
:mod:`synthetic.dataset` writes DICOM datasets with masks and a manifest.

Files written by :func:`make_dataset`::

    out_dir/manifest.csv                      image,label,site,mask,patient_id,split,bias
    out_dir/images/<site>/<site>_<i>.dcm      CR or DX DICOM, 16-bit, fake patient header
    out_dir/masks/<site>/<site>_<i>.png       lung fields (heart excluded), 0/255, same size

Determinism: each image is drawn from ``np.random.SeedSequence(seed, spawn_key=(site key, i))``
split into independent streams (anatomy, finding, marker, noise, header), so the same seed gives
the same pixel data whatever the number of workers, and a finding can be switched off without
changing any other pixel.
"""

from synthetic.acquisition import SyntheticCase, acquire, window_tags, write_dicom
from synthetic.dataset import (
    make_bias_test_sets,
    make_dataset,
    render_case,
    render_pool,
    render_previews,
)
from synthetic.markers import marker_stamp, place_marker
from synthetic.phantom import Anatomy, draw_anatomy, draw_finding, finding_amplitude
from synthetic.sites import (
    CLASSES,
    CR_STORAGE,
    DX_STORAGE,
    MANIFEST_COLUMNS,
    MARKER_CORNERS,
    MARKER_STYLES,
    SPLIT_FRACTIONS,
    SiteConfig,
    Streams,
    assign_bias,
    bias_free_sites,
    bias_test_sites,
    blind_site,
    default_sites,
    expected_agreement,
    image_seed,
    portable_site,
)

__all__ = [
    "CLASSES",
    "CR_STORAGE",
    "DX_STORAGE",
    "MANIFEST_COLUMNS",
    "MARKER_CORNERS",
    "MARKER_STYLES",
    "SPLIT_FRACTIONS",
    "Anatomy",
    "SiteConfig",
    "Streams",
    "SyntheticCase",
    "acquire",
    "assign_bias",
    "bias_free_sites",
    "bias_test_sites",
    "default_sites",
    "draw_anatomy",
    "draw_finding",
    "expected_agreement",
    "finding_amplitude",
    "image_seed",
    "make_bias_test_sets",
    "make_dataset",
    "render_pool",
    "marker_stamp",
    "place_marker",
    "blind_site",
    "portable_site",
    "render_case",
    "render_previews",
    "window_tags",
    "write_dicom",
]
