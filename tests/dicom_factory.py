"""Write small, valid CR/DX DICOM files (and helpers around them) for tests.

``write_cxr_dicom(path, pixels, **tags)`` makes a single-frame Computed Radiography (or, with
``Modality="DX"``, Digital X-Ray for presentation) file with file meta and fake patient headers.
Other helpers may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray, for presentation

# Fake patient headers: tests check that none of these strings leaves the loader.
FAKE_PATIENT = {
    "PatientName": "Planted^Patient^Name",
    "PatientID": "PID-PLANTED-4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-PLANTED-0815",
}


def chest_like(rng: np.random.Generator, n: int = 64) -> np.ndarray:
    """A smooth 12-bit ``[n, n]`` image with two dark lung-like ovals on a bright body."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    body = 2600 + 600 * np.exp(-((xx - 0.5) ** 2) / 0.08)
    for cx in (0.32, 0.68):
        body -= 1800 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    return np.clip(body + rng.normal(0, 60, (n, n)), 0, 4095).astype(np.uint16)


def write_cxr_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    raw_pixel_bytes: bytes | None = None,
    **tags: Any,
) -> Path:
    """Write ``pixels`` (``[H, W]`` integer, or ``[H, W, 3]`` uint8 colour) as a DICOM file.

    Args:
        path: output file.
        pixels: stored values; the dtype sets BitsAllocated (8/16) and PixelRepresentation.
        transfer_syntax: Explicit VR Little Endian (default), any syntax pydicom can encode
            with ``Dataset.compress`` (RLE Lossless, JPEG 2000 Lossless, ...), or JPEG Lossless
            SV1 (encoded by :func:`encode_jpeg_lossless_sv1`).
        raw_pixel_bytes: native pixel data written verbatim (e.g. with garbage high bits).
        **tags: DICOM keywords to set (override the defaults); ``None`` deletes the element.
            ``BitsStored`` also sets ``HighBit``.

    Returns:
        The path written.
    """
    pixels = np.asarray(pixels)
    colour = pixels.ndim == 3
    modality = tags.get("Modality", "CR")
    sop_class = DX_IMAGE_STORAGE if modality == "DX" else CR_IMAGE_STORAGE

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "isnet-cxr tests"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ReferringPhysicianName = ""
    for keyword, value in FAKE_PATIENT.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"

    bits = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0

    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "BitsStored" in tags and "HighBit" not in tags:
        ds.HighBit = int(tags["BitsStored"]) - 1

    data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)
    ds.PixelData = raw_pixel_bytes if raw_pixel_bytes is not None else data.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"

    if transfer_syntax == JPEGLosslessSV1:
        frame = encode_jpeg_lossless_sv1(pixels, int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, pixels)

    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def encode_jpeg_lossless_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """Encode ``[H, W]`` unsigned values as a JPEG Lossless (Process 14, predictor 1) stream.

    A minimal ITU-T T.81 lossless encoder for tests (pydicom has no encoder for this syntax):
    one component, predictor 1 (left neighbour; above for the first column), point transform 0,
    one Huffman table giving every difference category 0..16 a 5-bit code.
    """
    x = np.asarray(pixels).astype(np.int64)
    if x.ndim != 2 or x.min() < 0 or x.max() >= 2**precision:
        raise ValueError("expects [H, W] unsigned values that fit the precision")
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 2 ** (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff[diff >= 32768] -= 65536

    bits: list[str] = []
    for d in diff.ravel().tolist():
        size = 16 if d == -32768 else abs(d).bit_length()
        bits.append(format(size, "05b"))
        if 0 < size < 16:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits
    entropy = int(stream, 2).to_bytes(len(stream) // 8, "big") if stream else b""
    entropy = entropy.replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = (
        bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    )
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)  # 17 codes of length 5
    dht = b"\x00" + counts + bytes(range(17))
    sos = b"\x01\x01\x00" + b"\x01\x00\x00"  # Ns=1, Cs=1 Td/Ta=0; Ss=1 (predictor), Se=0, Ah/Al=0
    return (
        b"\xff\xd8"
        + segment(0xC3, sof3)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + entropy
        + b"\xff\xd9"
    )


@contextlib.contextmanager
def decoder_plugins_disabled(transfer_syntax: str) -> Iterator[None]:
    """Remove every available pydicom decoder plugin for ``transfer_syntax``, then restore them.

    This is how a machine without (e.g.) pylibjpeg-libjpeg looks to pydicom: the plugins that
    need missing packages are absent, and the decoder reports itself unavailable.
    """
    decoder = get_decoder(UID(transfer_syntax))
    removed = decoder.available_plugins
    for label in removed:
        decoder.remove_plugin(label)
    try:
        yield
    finally:
        for label in removed:  # pydicom's own plugins live in pydicom.pixels.decoders.<label>
            decoder.add_plugin(label, (f"pydicom.pixels.decoders.{label}", "_decode_frame"))


def ramp(rows: int, cols: int, top: int, dtype: Any = np.uint16, start: int = 0) -> np.ndarray:
    """Deterministic ``[rows, cols]`` values spanning ``start..top`` (inclusive) in raster order."""
    n = rows * cols
    return np.linspace(start, top, n).round().astype(dtype).reshape(rows, cols)
