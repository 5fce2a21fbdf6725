"""A corpus of bad, odd and good inputs for the reader and batch runs, made by code (no blobs).

:func:`make_corpus` writes every case of the reliability issue into a folder and returns what
each file must end as: ``Expect(kind, error)`` where ``kind`` is ``predicted`` (classified),
``refused`` (not a chest radiograph: a :class:`~cxr_io.readers.CXRReadError` subclass from
:func:`~cxr_io.readers.check_radiograph`), ``flagged`` (maybe a chest, not classified),
``unreadable`` (the reader's own error subclass) or ``skipped`` (not a regular file, index).

:func:`pydicom_test_files` lists every file shipped with ``pydicom`` (``pydicom/data/test_files``)
and ``pydicom-data`` (``data_store/data``) by name, resolved with
``get_testdata_file(name, download=False)`` (never a pattern: that goes to the network).

Headers carry planted identifiers (:data:`PLANTED`), some in invalid UIDs that make pydicom
warn, so tests can search stderr, logs and outputs for them.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from tests.dicom_factory import chest_like, write_cxr_dicom

# Values that must never reach stderr, a log or an output file.
PLANTED = {
    "PatientName": "Quagmire^Wolfgang",
    "PatientID": "PIDXQ9931",
    "PatientBirthDate": "18990101",
    "AccessionNumber": "ACCXQ7713",
}
# Invalid UIDs (letters): pydicom warns "Invalid value for VR UI: '<value>'" when validating.
PLANTED_UIDS = {
    "StudyInstanceUID": "1.2.826.QUAGMIRE.77",
    "SeriesInstanceUID": "1.2.826.WOLFGANG.88",
}
PLANTED_STRINGS = (
    *(v.lower() for v in PLANTED.values()),
    "quagmire",
    "wolfgang",
)

SOP = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "SC": "1.2.840.10008.5.1.4.1.1.7",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
    "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
}


@dataclass(frozen=True)
class Expect:
    """What one file must end as (``error``: the error column of errors.csv, or None)."""

    kind: str
    error: str | None = None


def _dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the planted invalid UIDs
        warnings.simplefilter("ignore")
        return write_cxr_dicom(path, pixels, **{**PLANTED, "BitsStored": 12, **tags})


def _restamp(path: Path, sop_class: str | None = None, **tags) -> Path:
    """Rewrite ``path`` with another SOP class and/or raw tags (after the factory)."""
    ds = pydicom.dcmread(path)
    if sop_class is not None:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPClassUID = sop_class
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _good(root: Path, rng: np.random.Generator, expect: dict[str, Expect]) -> bytes:
    path = _dicom(root / "good" / "IM0001", chest_like(rng), **PLANTED_UIDS)
    expect["good/IM0001"] = Expect("predicted")
    _dicom(root / "good" / "IM0002.dcm", chest_like(rng), ViewPosition="AP")
    expect["good/IM0002.dcm"] = Expect("predicted")
    return path.read_bytes()


def _garbage(root: Path, rng: np.random.Generator, expect: dict[str, Expect]) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    g = root / "garbage"
    g.mkdir()
    for name, slope in (("slope_nan", "NaN"), ("slope_inf", "inf")):
        path = _dicom(g / name, chest_like(rng), RescaleSlope="1", RescaleIntercept="0")
        data = path.read_bytes().replace(
            b"DS\x02\x001 ", b"DS\x04\x00" + slope.encode()[:4].ljust(4)
        )
        path.write_bytes(data)
        expect[f"garbage/{name}"] = Expect("unreadable", "NonFiniteImageError")
    vol = chest_like(rng).astype(np.float32)
    vol[5, 7] = np.nan
    nib.save(nib.Nifti1Image(vol.T.copy(), np.eye(4)), g / "one_nan.nii.gz")
    expect["garbage/one_nan.nii.gz"] = Expect("unreadable", "NonFiniteImageError")
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(g / "one_nan.mha"))
    expect["garbage/one_nan.mha"] = Expect("unreadable", "NonFiniteImageError")
    for h, w in ((1, 1), (1, 256), (2, 2), (7, 5)):
        name = f"tiny_{h}x{w}"
        _dicom(g / name, rng.integers(0, 4095, (h, w)).astype(np.uint16))
        expect[f"garbage/{name}"] = Expect("refused", "TooSmallImageError")
    _dicom(g / "constant", np.full((64, 64), 1000, np.uint16))
    expect["garbage/constant"] = Expect("refused", "ConstantImageError")
    # readable, chest by its header or without a header, but nothing like lungs in it: the
    # lung segmenter's mask is empty, so the image is flagged (NoLungsFound), not classified
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (128, 128)).astype(np.uint8)).save(g / "noise.png")
    expect["garbage/noise.png"] = Expect("flagged", "NoLungsFound")
    bars = ((np.arange(128) * 8 // 128) % 2 * 3000 + 500).astype(np.uint16)
    _dicom(g / "bars", np.tile(bars, (128, 1)))
    expect["garbage/bars"] = Expect("flagged", "NoLungsFound")
    (g / "notes.txt").write_text(f"exported for {PLANTED['PatientName']}\n")
    expect["garbage/notes.txt"] = Expect("unreadable", "NotDicomError")
    (g / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    expect["garbage/DICOMDIR"] = Expect("skipped", "NotAnImage")


def _not_chest(root: Path, rng: np.random.Generator, expect: dict[str, Expect]) -> None:
    n = root / "not_chest"
    n.mkdir()
    for modality in ("MR", "CT", "US", "NM", "SEG", "RTDOSE"):
        path = _dicom(n / modality, chest_like(rng), Modality=modality)
        _restamp(path, SOP[modality])
        expect[f"not_chest/{modality}"] = Expect("refused", "NotRadiographError")
    path = _dicom(n / "secondary_capture", chest_like(rng), Modality="OT")
    _restamp(path, SOP["SC"])
    expect["not_chest/secondary_capture"] = Expect("refused", "NotRadiographError")
    rgb = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
    path = write_cxr_dicom(n / "rgb_secondary_capture", rgb, **PLANTED, Modality="OT")
    _restamp(path, SOP["SC"])
    expect["not_chest/rgb_secondary_capture"] = Expect("refused", "NotRadiographError")
    write_cxr_dicom(n / "rgb_cr", rgb, **PLANTED)
    expect["not_chest/rgb_cr"] = Expect("refused", "ColourImageError")
    _dicom(n / "cr_modality_mr", chest_like(rng), Modality="MR")  # CR SOP class, MR modality
    expect["not_chest/cr_modality_mr"] = Expect("refused", "NotRadiographError")
    for part in ("KNEE", "CSPINE"):
        _dicom(n / f"cr_{part.lower()}", chest_like(rng), BodyPartExamined=part)
        expect[f"not_chest/cr_{part.lower()}"] = Expect("refused", "NotChestError")
    _dicom(n / "body_part_blank", chest_like(rng), BodyPartExamined="")
    expect["not_chest/body_part_blank"] = Expect("flagged", "NotClassified")
    _dicom(n / "lateral", chest_like(rng), ViewPosition="LL")
    expect["not_chest/lateral"] = Expect("flagged", "NotClassified")


def _broken(root: Path, rng: np.random.Generator, good: bytes, expect: dict[str, Expect]) -> None:
    b = root / "broken"
    b.mkdir()
    for cut in (132, 300, 500, 850):
        (b / f"cut_{cut}").write_bytes(good[:cut])
        expect[f"broken/cut_{cut}"] = Expect("unreadable", "TruncatedFileError")
    (b / "truncated_copy_of_good").write_bytes(good[:-500])
    expect["broken/truncated_copy_of_good"] = Expect("unreadable", "TruncatedFileError")
    pixels = chest_like(rng)
    _dicom(b / "excess_pixel_data", pixels, raw_pixel_bytes=pixels.tobytes() * 2)
    expect["broken/excess_pixel_data"] = Expect("unreadable", "CorruptPixelDataError")
    # a complete file that holds no image (a structured report)
    ds = pydicom.dcmread(_dicom(b / "report", pixels))
    image_pixel = ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit")
    for kw in (*image_pixel, "SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation"):
        delattr(ds, kw)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SOP["SR"]
    ds.save_as(b / "report", enforce_file_format=True)
    expect["broken/report"] = Expect("unreadable", "NoPixelDataError")
    # VOI LUT whose data is shorter than its descriptor says
    path = _dicom(b / "voi_lut_short", pixels)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = np.arange(16, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"
    _restamp(path, VOILUTSequence=DicomSequence([item]))
    expect["broken/voi_lut_short"] = Expect("unreadable", "BadLUTError")
    # modality LUT of 40 bits per entry
    path = _dicom(b / "modality_lut_40bit", pixels, RescaleSlope=None, RescaleIntercept=None)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 40]
    item.ModalityLUTType = "US"
    item.LUTData = np.arange(4096, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"
    _restamp(path, ModalityLUTSequence=DicomSequence([item]))
    expect["broken/modality_lut_40bit"] = Expect("unreadable", "BadLUTError")
    path = _dicom(b / "unknown_transfer_syntax", pixels)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(path, enforce_file_format=False)
    expect["broken/unknown_transfer_syntax"] = Expect("unreadable", "UnsupportedImageError")


def _filesystem(root: Path, good: bytes, expect: dict[str, Expect]) -> None:
    """Broken, looping and self links, a link to a folder, a FIFO, a link to /dev/zero, and a
    good file whose name is not valid UTF-8."""
    f = root / "fs"
    f.mkdir()
    os.symlink(f / "does_not_exist", f / "broken_link")
    os.symlink(f / "loop_b", f / "loop_a")
    os.symlink(f / "loop_a", f / "loop_b")
    os.symlink(f / "self_link", f / "self_link")
    os.symlink(root / "good", f / "linked_folder")
    os.mkfifo(f / "fifo")
    os.symlink("/dev/zero", f / "dev_zero")
    for name in ("broken_link", "loop_a", "loop_b", "self_link", "linked_folder", "fifo"):
        expect[f"fs/{name}"] = Expect("skipped", "NotARegularFile")
    expect["fs/dev_zero"] = Expect("skipped", "NotARegularFile")
    raw = os.fsdecode(os.fsencode(str(f)) + b"/name_\xff\xfe.dcm")  # surrogate escapes
    with warnings.catch_warnings():  # the planted invalid UIDs
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(good))
        # a new SOPInstanceUID, else it is a duplicate of good/IM0001
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(raw, enforce_file_format=True)
    expect["fs/name_\\xff\\xfe.dcm"] = Expect("predicted")


def make_corpus(root: Path, seed: int = 0) -> dict[str, Expect]:
    """Write the corpus under ``root``; returns ``{rel_path as written to the CSVs: Expect}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}
    good = _good(root, rng, expect)
    _garbage(root, rng, expect)
    _not_chest(root, rng, expect)
    _broken(root, rng, good, expect)
    _filesystem(root, good, expect)
    return expect


def pydicom_test_files() -> list[Path]:
    """Every file shipped by pydicom and pydicom-data, each resolved by name with
    ``get_testdata_file(name, download=False)``; sorted, unique."""
    import data_store
    from pydicom.data import get_testdata_file

    folders = [
        Path(pydicom.data.__file__).parent / "test_files",
        Path(data_store.__file__).parent / "data",
    ]
    names = sorted(
        {p.name for folder in folders for p in folder.rglob("*") if p.is_file()} - {"__init__.py"}
    )
    found = set()
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is not None:
            found.add(Path(path))
    return sorted(found)
