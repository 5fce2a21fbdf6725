"""Mutations of valid DICOM files: flipped bytes, a cut tail, changed header values.

Shared by the property test (``tests/test_dicom_fuzz.py``, hypothesis draws the changes) and
the reliability counts (``benchmarks/reliability_counts.py``, a seeded numpy generator draws
them with :func:`random_change`). A change is one of

- ``("flip", [(position, byte), ...])``: set bytes after the 128-byte preamble and ``DICM``
  (positions wrap around the file's length, so any integer is a valid position);
- ``("cut", position)``: keep the first ``position % len(data)`` bytes;
- ``("tag", [(keyword, value), ...])``: set header values (from :data:`TAG_VALUES`) and
  write the file again.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from tests.dicom_factory import write_cxr_dicom

BASE_KINDS = ("plain", "window", "rle")

# keyword -> values to try: a list, or (low, high) for every integer in low..high
TAG_VALUES: dict[str, list[Any] | tuple[int, int]] = {
    "Rows": (0, 70000),
    "Columns": (0, 70000),
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 32, 64],
    "BitsStored": (0, 40),
    "HighBit": (0, 40),
    "PixelRepresentation": (0, 3),
    "SamplesPerPixel": (0, 4),
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "", "XYZ"],
    "RescaleSlope": ["0", "-1", "1e308", "nan", "abc", ""],
    "RescaleIntercept": ["1e308", "-inf", "x", ""],
    "WindowCenter": ["0", "-1e9", "nan", "a\\b", ""],
    "WindowWidth": ["0", "1", "-5", "1e-30", "inf", ""],
    "VOILUTFunction": ["SIGMOID", "LINEAR_EXACT", "BOGUS"],
    "NumberOfFrames": ["0", "2", "-1", "x"],
}


def base_dicom(kind: str, pixels: np.ndarray, **tags: Any) -> bytes:
    """A valid 12-bit CR of ``pixels`` (``[H, W]`` uint16 in 0..4095) as bytes: ``plain``,
    ``window`` (a window and a rescale) or ``rle`` (RLE Lossless). Each call makes a new
    SOPInstanceUID; ``tags`` are passed on to :func:`~tests.dicom_factory.write_cxr_dicom`."""
    tags = {"BitsStored": 12, **tags}
    if kind == "window":
        tags.update(WindowCenter="2048", WindowWidth="4096", RescaleSlope="1.5")
        tags.update(RescaleIntercept="-100")
    elif kind == "rle":
        tags["transfer_syntax"] = pydicom.uid.RLELossless
    elif kind != "plain":
        raise ValueError(f"unknown base kind {kind!r}, expected one of {BASE_KINDS}")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_cxr_dicom(Path(tmp) / "x.dcm", pixels, **tags)
        return path.read_bytes()


def mutate(data: bytes, change: tuple[str, Any]) -> bytes:
    """``data`` (a DICOM file's bytes) with ``change`` applied (see the module docstring).
    Tag values pydicom refuses to set are left out; a dataset it cannot write again gives the
    unchanged bytes."""
    kind, arg = change
    if kind == "flip":
        buf = bytearray(data)
        for pos, value in arg:
            buf[132 + pos % (len(buf) - 132)] = value  # keep the preamble: stays a DICOM file
        return bytes(buf)
    if kind == "cut":
        return data[: arg % len(data)]
    if kind != "tag":
        raise ValueError(f"unknown change {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        for keyword, value in arg:
            try:
                setattr(ds, keyword, value)
            except Exception:  # pydicom refuses some values outright: leave that tag
                continue
        out = pydicom.filebase.DicomBytesIO()
        try:
            ds.save_as(out, enforce_file_format=False)
        except Exception:  # not writable: the unchanged file
            return data
    return out.getvalue()


def random_change(rng: np.random.Generator) -> tuple[str, Any]:
    """One change drawn with ``rng``: flip 1-8 bytes, cut the tail, or set 1-3 header values,
    each a third of the time (the same ranges as the property test)."""
    kind = ("flip", "cut", "tag")[int(rng.integers(3))]
    if kind == "flip":
        n = int(rng.integers(1, 9))
        return kind, [(int(rng.integers(10**6)), int(rng.integers(256))) for _ in range(n)]
    if kind == "cut":
        return kind, int(rng.integers(10**6))
    keywords = sorted(TAG_VALUES)
    changes = []
    for _ in range(int(rng.integers(1, 4))):
        keyword = keywords[int(rng.integers(len(keywords)))]
        values = TAG_VALUES[keyword]
        if isinstance(values, tuple):
            value: Any = int(rng.integers(values[0], values[1] + 1))
        else:
            value = values[int(rng.integers(len(values)))]
        changes.append((keyword, value))
    return kind, changes
