"""Resumable batch runs: a folder tree of chest X-rays + a trained classifier -> a results table.

:func:`run_batch` locks the output folder (one run at a time: ``.batch.lock``; a lock left by a
killed run is taken over), checks that the folder's earlier results were made by the same model
and settings (``run.json``; else :class:`BatchOutputMismatchError` unless ``resume=False``),
walks the input folders (or a manifest CSV) without following symbolic links, and for every
chunk of ``batch_size`` files:

1. lists what is not a regular file (broken or looping links, links to folders, FIFOs,
   devices), index files (``DICOMDIR``) and hidden files as ``skipped``: they are never opened,
   so nothing can block;
2. reads each file with :class:`cxr_io.readers.LoadCXR`; a file that cannot be read goes to
   ``errors.csv`` as ``unreadable`` with the reader's own error and reason (a read error wins
   over duplicate detection: a truncated copy is unreadable, not a duplicate);
3. refuses what is not a chest radiograph (:func:`cxr_io.readers.check_radiograph`: SOP class
   and Modality CR/DX, BodyPartExamined, colour, a minimum size, blank images) as ``refused``
   and lists images that may be chests but are not known to be (no BodyPartExamined or
   Modality, a lateral view) as ``flagged``; neither is classified;
4. keeps a copy of the image no larger than ``work_side`` (2048 px) on its long side, so a
   chunk's memory does not grow with the image size; a second copy of an image already seen
   (same SOPInstanceUID, or same bytes) is a ``duplicate``;
5. segments the lungs (:class:`segmentation.segmenter.LungSegmenter`); an image whose mask
   says "no chest here" (:data:`NO_CHEST_FLAGS`) is ``flagged``, not classified;
6. classifies and explains the rest with :meth:`pipeline.predictor.Predictor.predict` and writes
   ``overlays/<pseudo_id>.png``, ``masks/<pseudo_id>.png`` (original size) and, when asked,
   ``dicom_seg/<pseudo_id>.dcm``;
7. appends the chunk's rows to ``predictions.csv`` and ``errors.csv`` (one write of complete
   rows, then ``fsync``), so a crash loses at most the chunk in flight.

A re-run with the same output folder resumes: a file already in either table with the same
relative path, size and modification time is skipped. ``summary.json`` and ``index.html`` are
rewritten at the end.

Output folder::

    predictions.csv   pseudo_id, rel_path, modality, view_position, body_part, photometric, pred,
                      prob_<class>..., seg_ok, seg_flags, lung_area_fraction, background_share,
                      study_pseudo_id, file_size, file_mtime_ns
    errors.csv        rel_path, kind (unreadable|refused|flagged|duplicate|skipped|failed),
                      error, reason, file_size, file_mtime_ns
    overlays/         <pseudo_id>.png: the image, the LRP heatmap (red +, blue -), the lung outline
    masks/            <pseudo_id>.png: the lung mask, 0/255, at the image's original size
    dicom_seg/        <pseudo_id>.dcm: the same mask as DICOM SEG (``dicom_seg=True``)
    summary.json      counts per class, per kind and per error; no paths, no identifiers
    index.html        counts, the files not classified and why, a gallery of overlays
    run.json          the model's and segmenter's hashes and the settings the rows depend on

``rel_path`` is the file's path as text; bytes of a name that are not UTF-8 appear as ``\\xNN``.

Privacy: ``pseudo_id`` is a keyed hash (HMAC-SHA256 under the installation secret) of the
image's SOPInstanceUID (or of the file's bytes when it has none): one id per image, not
reversible without the secret. ``study_pseudo_id`` is the loader's patient+study pseudonym.
No PatientName, PatientID, BirthDate or AccessionNumber is written anywhere, and pydicom's
warnings and log records (which quote invalid header values verbatim) are silenced while
headers are read (:func:`cxr_io.readers.quiet_pydicom`). ``rel_path`` is the researcher's own
file path: if folder or file names hold patient names (some PACS exports do), drop that column
before sharing; the run counts such paths and warns (``paths_with_identifiers``).

The classifier's inference bundle (``configs/inference.json``) has its factories in
:mod:`pipeline.inference_bundle`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from cxr_io.privacy import identifier_tokens, image_pseudo_id
from cxr_io.readers import (
    CXRReadError,
    LoadCXR,
    RadiographPolicy,
    check_radiograph,
    quiet_pydicom,
)
from cxr_io.resources import default_segmenter
from cxr_io.settings import Settings
from evaluation.figures import heatmap_overlay_rgb
from pipeline.batch_report import write_index_html
from pipeline.predictor import Predictor, resolve_checkpoint

__all__ = [
    "BatchInputError",
    "BatchLockedError",
    "BatchOutputMismatchError",
    "BatchSummary",
    "ERROR_COLUMNS",
    "ImageIdentity",
    "InputFile",
    "collect_inputs",
    "display_path",
    "image_identity",
    "output_lock",
    "working_copy",
    "write_index_html",
    "prediction_columns",
    "run_batch",
]

PREDICTIONS = "predictions.csv"
ERRORS = "errors.csv"
SUMMARY = "summary.json"
OVERLAYS = "overlays"
MASKS = "masks"
SEGS = "dicom_seg"
INDEX = "index.html"
RUN_INFO = "run.json"
LOCK = ".batch.lock"
ERROR_COLUMNS = ("rel_path", "kind", "error", "reason", "file_size", "file_mtime_ns")
KEY_COLUMNS = ("file_size", "file_mtime_ns")
# Files of a PACS export that are not images: reported as skipped, never read as images.
INDEX_FILE_NAMES = frozenset({"dicomdir", "thumbs.db", "desktop.ini", ".ds_store"})
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")


class BatchInputError(ValueError):
    """The inputs or the output folder cannot be used (the message says which and what to do)."""


class BatchOutputMismatchError(BatchInputError):
    """``--out`` holds results of another model or other settings (``--restart`` to redo)."""


class BatchLockedError(RuntimeError):
    """Another batch run is writing to the same output folder."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One file of the input tree: its absolute ``path``, ``rel_path`` (POSIX, relative to its
    input root; bytes that are not UTF-8 shown as ``\\xNN``), and the ``size``/``mtime_ns``
    that, with ``rel_path``, key it for resuming. ``skip``: why it is not read (a broken or
    looping symbolic link, a link to a folder, a FIFO or device), empty for a regular file."""

    path: Path
    rel_path: str
    size: int
    mtime_ns: int
    skip: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rel_path, str(self.size), str(self.mtime_ns))


def display_path(rel: str) -> str:
    """A file name as text that can always be written: names that are not valid UTF-8 (which
    Python keeps as surrogate escapes) get ``\\xNN`` for each such byte."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _skip_reason(path: Path) -> str:
    """Why ``path`` cannot be read as an image file ("" when it is a regular file or a link to
    one). Never opens the file, so a FIFO or a device cannot block."""
    try:
        lst = os.lstat(path)
    except OSError as exc:
        return f"cannot be examined ({type(exc).__name__})"
    if stat.S_ISREG(lst.st_mode):
        return ""
    if stat.S_ISDIR(lst.st_mode):
        return "a folder that cannot be listed (permissions?)"
    if not stat.S_ISLNK(lst.st_mode):
        return f"{_special_kind(lst.st_mode)}, not an image file"
    try:
        st = os.stat(path)  # follows the link
    except FileNotFoundError:
        return "a broken symbolic link (its target does not exist)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a symbolic link that cannot be followed ({type(exc).__name__})"
    if stat.S_ISREG(st.st_mode):
        return ""
    if stat.S_ISDIR(st.st_mode):
        return "a symbolic link to a folder (not followed; give the folder itself as an input)"
    return f"a symbolic link to {_special_kind(st.st_mode)}, not an image file"


def _input_file(path: Path, rel: str) -> InputFile:
    skip = _skip_reason(path)
    try:
        st = os.stat(path) if not skip else os.lstat(path)
        size, mtime = int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        size, mtime = 0, 0
    return InputFile(path=path, rel_path=display_path(rel), size=size, mtime_ns=mtime, skip=skip)


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Every entry under ``root`` that is not a real folder (regular files, links of any kind,
    FIFOs, devices), without following symbolic links to folders (they are listed)."""
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=False):
        while unlisted:  # a folder os.walk could not list: listed as skipped, not lost
            yield Path(unlisted.pop().filename)
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if (here / d).is_symlink():
                yield here / d  # listed as skipped, never followed (loops, duplicates)
            elif exclude is None or (here / d).resolve() != exclude:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            yield here / name
    for err in unlisted:
        yield Path(err.filename)


def _manifest_files(csv_path: Path) -> list[tuple[Path, str]]:
    import pandas as pd

    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for a bad CSV
        raise BatchInputError(f"{csv_path}: not a readable CSV ({type(exc).__name__})") from exc
    if "image" not in df.columns:
        raise BatchInputError(
            f"{csv_path}: a manifest needs an 'image' column (paths relative to the CSV's "
            f"folder); found columns {list(df.columns)}"
        )
    base = csv_path.parent.resolve()
    out = []
    for i, value in enumerate(df["image"], start=2):  # row 1 is the header
        if not value.strip():
            raise BatchInputError(f"{csv_path}: row {i} has an empty 'image' cell")
        path = Path(value)
        path = path if path.is_absolute() else base / path
        out.append((path, os.path.relpath(path, base).replace(os.sep, "/")))
    return out


def collect_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    exclude: str | os.PathLike | None = None,
) -> list[InputFile]:
    """Every file under the inputs, sorted by ``rel_path``.

    Args:
        inputs: folders (searched recursively, every file: PACS exports often have no file
            extensions), manifest CSVs (their ``image`` column, relative to the CSV), or files.
            With one folder, ``rel_path`` is relative to it; with several inputs it starts with
            the input's name (``export1/IM0001``).
        exclude: a folder to leave out (the run's own output folder).

    Raises:
        BatchInputError: an input does not exist, names collide, or nothing was found.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise BatchInputError("no input given: pass folders of DICOM files or a manifest CSV")
    roots = [Path(p).expanduser() for p in items]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise BatchInputError(f"input not found: {', '.join(missing)}")
    names = [p.resolve().name for p in roots]
    if len(roots) > 1 and len(set(names)) != len(names):
        raise BatchInputError(
            f"inputs {', '.join(map(str, roots))} have the same folder/file name; results are "
            "keyed by '<input name>/<path inside it>': rename one or run them separately"
        )
    skip = Path(exclude).resolve() if exclude is not None else None
    found: dict[str, InputFile] = {}
    for root, name in zip(roots, names, strict=True):
        prefix = f"{name}/" if len(roots) > 1 else ""
        if root.is_dir():
            pairs = [(p, p.relative_to(root).as_posix()) for p in _walk(root, skip)]
        elif root.suffix.lower() == ".csv":
            pairs = _manifest_files(root)
            absent = [str(p) for p, _ in pairs if not os.path.lexists(p)]
            if absent:
                raise BatchInputError(
                    f"{root}: {len(absent)} image(s) listed in the manifest do not exist "
                    f"(first: {absent[0]}); fix the paths (relative to the CSV's folder)"
                )
        else:
            pairs = [(root, root.name)]
        for path, rel in pairs:
            file = _input_file(path if _skip_reason(path) else path.resolve(), prefix + rel)
            found.setdefault(file.rel_path, file)
    if not found:
        raise BatchInputError(
            f"no files found in {', '.join(map(str, roots))}: point at the folder holding the "
            "DICOM files (searched recursively) or at a manifest CSV with an 'image' column"
        )
    return [found[k] for k in sorted(found)]


# --------------------------------------------------------------------------------------------
# Image identity: pseudonymous id, duplicates, identifiers in paths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageIdentity:
    """``pseudo_id``: ``"img-" + 16 hex`` keyed hash of the SOPInstanceUID (``from_uid``) or of
    the file's bytes. ``identifiers``: lower-cased patient identifier values of the header (kept
    in memory only, to warn when a file path contains them)."""

    pseudo_id: str
    from_uid: bool
    identifiers: tuple[str, ...] = ()


def image_identity(path: str | os.PathLike, secret: bytes) -> ImageIdentity:
    """The pseudonymous id of one image (reads the DICOM header only, or hashes the file)."""
    import pydicom

    path = Path(path)
    # pydicom warns and logs invalid values (a UID, a name) verbatim: never let them out
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            tokens = identifier_tokens(ds)
        except Exception:  # not DICOM or unreadable header: load_cxr reports the reason
            ds, uid, tokens = None, "", ()
    if uid:
        return ImageIdentity(image_pseudo_id(secret, "sop", uid), True, tokens)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return ImageIdentity(image_pseudo_id(secret, "file", digest.digest()), False, tokens)


# --------------------------------------------------------------------------------------------
# Result tables (append complete rows + fsync; resume from what is on disk)
# --------------------------------------------------------------------------------------------


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The header of ``predictions.csv`` for a model with these class names."""
    return [
        "pseudo_id",
        "rel_path",
        "modality",
        "view_position",
        "body_part",
        "photometric",
        "pred",
        *[f"prob_{c}" for c in classes],
        "seg_ok",
        "seg_flags",
        "lung_area_fraction",
        "background_share",
        "study_pseudo_id",
        *KEY_COLUMNS,
    ]


def csv_text(rows: Iterable[Sequence[str]]) -> str:
    """Rows as CSV text (``\n`` line ends), ready to be written in one call."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def format_value(value: float) -> str:
    """A probability or share as written to the CSVs: 6 decimals, empty when not finite."""
    return "" if not math.isfinite(value) else f"{value:.6f}"


class _Table:
    """A CSV file that only grows by whole rows.

    On open (resume), a torn last line (no newline: the process died inside a write) is cut
    off, and the header must match ``columns``.
    """

    def __init__(self, path: Path, columns: Sequence[str], *, resume: bool) -> None:
        self.path = path
        self.columns = list(columns)
        self.rows: list[dict[str, str]] = []
        if resume and path.is_file() and path.stat().st_size > 0:
            self._repair()
            with path.open(newline="", encoding="utf-8", errors="backslashreplace") as fh:
                reader = csv.DictReader(fh)
                if list(reader.fieldnames or []) != self.columns:
                    raise BatchOutputMismatchError(
                        f"{path} has columns {reader.fieldnames}, expected {self.columns}: it was "
                        "written by another model or version. Use a new --out folder, or "
                        "--restart to start this one again."
                    )
                self.rows = list(reader)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write(csv_text([self.columns]), mode="w")

    def _repair(self) -> None:
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        with self.path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())

    def _write(self, text: str, mode: str = "a") -> None:
        with self.path.open(mode, newline="", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, rows: Sequence[dict[str, str]]) -> None:
        """Append complete rows in one write, then fsync."""
        if rows:
            self._write(csv_text([[r[c] for c in self.columns] for r in rows]))
            self.rows.extend(rows)

    def drop_stale(self, current: dict[str, tuple[str, str, str]]) -> int:
        """Remove rows of files that changed since (same ``rel_path``, other size/mtime): the
        file is processed again. Rewrites the table atomically (tmp + rename)."""
        keep = [r for r in self.rows if current.get(r["rel_path"], _row_key(r)) == _row_key(r)]
        dropped = len(self.rows) - len(keep)
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            body = [self.columns] + [[r[c] for c in self.columns] for r in keep]
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                fh.write(csv_text(body))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self.rows = keep
        return dropped

    def keys(self) -> set[tuple[str, str, str]]:
        return {_row_key(r) for r in self.rows}


def _row_key(row: dict[str, str]) -> tuple[str, str, str]:
    return (row["rel_path"], row["file_size"], row["file_mtime_ns"])


# The images of a chunk
# --------------------------------------------------------------------------------------------

# Lung-mask quality flags that mean "no chest seen": the image is flagged, not classified.
NO_CHEST_FLAGS = ("empty", "area_low", "extent_high")
# Long side of the copy of each image a chunk keeps (the networks and overlays see at most
# this); the full-size decode lives only while the file is read.
WORK_SIDE = 2048


@dataclass
class _Loaded:
    file: InputFile
    identity: ImageIdentity
    image: MetaTensor  # [1, h, w] in [0, 1], long side <= WORK_SIDE
    original_size: tuple[int, int]


def _meta_text(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def working_copy(image: MetaTensor, max_side: int = WORK_SIDE) -> MetaTensor:
    """``image`` ``[1, H, W]`` shrunk by area averaging so its long side is at most
    ``max_side`` (returned unchanged when it already is); the meta is kept."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(image.as_tensor()[None].float(), size, mode="area")[0]
    return MetaTensor(small.contiguous(), meta=dict(image.meta))


def _full_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask ``[h, w]`` brought to ``size`` (nearest neighbour)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    rows = (np.arange(size[0]) * mask.shape[0] // size[0]).astype(np.intp)
    cols = (np.arange(size[1]) * mask.shape[1] // size[1]).astype(np.intp)
    return mask[rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class _Outputs:
    """Where the per-image files of a run go and which ones to write."""

    out: Path
    heatmaps: bool
    masks: bool
    dicom_seg: bool
    overlay_side: int


def _infer(
    predictor: Predictor,
    items: Sequence[_Loaded],
    segs: Sequence[dict[str, Any]],
    outputs: _Outputs,
) -> list[dict[str, str]]:
    """Classify and explain ``items`` with their lung masks (:meth:`Predictor.predict`); write
    overlays and masks; return prediction rows."""
    results = predictor.predict(
        [it.image for it in items], [s["seg"] for s in segs], heatmaps=outputs.heatmaps
    )
    classes = predictor.classes
    rows = []
    for it, seg, res in zip(items, segs, results, strict=True):
        pid = it.identity.pseudo_id
        if res.heatmap is not None:
            _save_png(
                heatmap_overlay_rgb(
                    it.image.as_tensor()[0].numpy(), res.heatmap, res.mask, outputs.overlay_side
                ),
                outputs.out / OVERLAYS / f"{pid}.png",
            )
        _write_masks(it, np.asarray(seg["seg"], dtype=bool), outputs)
        meta, q = it.image.meta, seg["quality"]
        row = {
            "pseudo_id": pid,
            "rel_path": it.file.rel_path,
            "modality": _meta_text(meta, "modality"),
            "view_position": _meta_text(meta, "view_position"),
            "body_part": _meta_text(meta, "body_part"),
            "photometric": _meta_text(meta, "photometric"),
            "pred": res.label,
            "seg_ok": str(bool(q["ok"])),
            "seg_flags": ";".join(q["flags"]),
            "lung_area_fraction": format_value(float(q["area_fraction"])),
            "background_share": format_value(res.relevance.get("background_share", math.nan)),
            "study_pseudo_id": _meta_text(meta, "pseudo_id"),
            "file_size": str(it.file.size),
            "file_mtime_ns": str(it.file.mtime_ns),
        }
        row.update({f"prob_{c}": format_value(float(res.probs[k])) for k, c in enumerate(classes)})
        rows.append(row)
    return rows


def _write_masks(item: _Loaded, mask: np.ndarray, outputs: _Outputs) -> None:
    """``masks/<pseudo_id>.png`` (0/255, the image's original size) and, when asked,
    ``dicom_seg/<pseudo_id>.dcm`` referencing the source DICOM."""
    if not (outputs.masks or outputs.dicom_seg):
        return
    full = _full_size(mask, item.original_size)
    pid = item.identity.pseudo_id
    if outputs.masks:
        _save_png((full.astype(np.uint8) * np.uint8(255)), outputs.out / MASKS / f"{pid}.png")
    if outputs.dicom_seg and item.image.meta.get("format") == "dicom":
        from segmentation.export import save_dicom_seg

        folder = outputs.out / SEGS
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{pid}.dcm.tmp"
        with quiet_pydicom():
            save_dicom_seg(full, item.file.path, tmp)
        os.replace(tmp, folder / f"{pid}.dcm")


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def _save_png(rgb: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (tmp + rename); no text chunks, so no metadata."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The output folder: lock and settings
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[str]:
    """Hold an exclusive lock on ``out`` (``out/.batch.lock``, ``flock``) for a run.

    Yields a note when the lock file names a run that no longer exists (killed: its lock was
    released by the system and is taken over), else "".

    Raises:
        BatchLockedError: another live process holds the lock.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchLockedError(
                f"{out} is being written by another batch run (pid {previous or 'unknown'}); "
                "wait for it to end, or give this run another --out"
            ) from None
        note = ""
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            note = f"took over the lock of a run that stopped without finishing (pid {previous})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield note
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves an empty lock file
    finally:
        os.close(fd)  # releases the flock (also when the process is killed)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _run_settings(
    predictor: Predictor,
    model: Path,
    seg_checkpoint: Path | None,
    heatmaps: bool,
    policy: RadiographPolicy,
) -> dict[str, Any]:
    """What the results of a run depend on (``run.json``): a resumed run must match it."""
    card = predictor.card.to_dict()
    return {
        "model_sha256": _file_sha256(resolve_checkpoint(model)),
        "classes": list(predictor.classes),
        "size": card.get("size"),
        "method": card.get("method"),
        # the default segmenter by its content too: a run started by the CLI (which passes the
        # default's path) resumes from Python without one, and the other way round
        "seg_sha256": _file_sha256(Path(seg_checkpoint or default_segmenter())),
        "heatmaps": heatmaps,
        "policy": asdict(policy),
        "no_chest_flags": list(NO_CHEST_FLAGS),
    }


def _check_settings(out: Path, settings: dict[str, Any], resume: bool) -> None:
    """Refuse to add rows to an output folder made by another model or other settings."""
    path = out / RUN_INFO
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        differ = sorted(k for k in settings if before.get(k) != settings[k])
        if differ:
            raise BatchOutputMismatchError(
                f"{out} holds results of another model or other settings (differs in: "
                f"{', '.join(differ)}); use --restart to delete them and start again, or "
                "another --out"
            )
    tmp = out / f".{RUN_INFO}.tmp"
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """What a run did and where its outputs are (``to_dict`` is what ``summary.json`` holds,
    without the paths)."""

    out_dir: Path
    files_found: int
    processed_now: int
    already_done: int
    predictions: int
    per_class: dict[str, int]
    seg_flagged: int
    seg_flags: dict[str, int]
    non_chest: int
    errors: int
    errors_by_kind: dict[str, int]
    paths_with_identifiers: int
    changed_files: int
    heatmaps: bool
    model: dict[str, Any]
    seconds: float
    files_per_second: float
    complete: bool
    notes: list[str] = field(default_factory=list)
    refused_by_error: dict[str, int] = field(default_factory=dict)
    unreadable_by_error: dict[str, int] = field(default_factory=dict)

    @property
    def predictions_csv(self) -> Path:
        return self.out_dir / PREDICTIONS

    @property
    def errors_csv(self) -> Path:
        return self.out_dir / ERRORS

    @property
    def summary_json(self) -> Path:
        return self.out_dir / SUMMARY

    @property
    def overlays_dir(self) -> Path:
        return self.out_dir / OVERLAYS

    @property
    def index_html(self) -> Path:
        return self.out_dir / INDEX

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out_dir")
        return d


def _error_row(f: InputFile, kind: str, error: str, reason: str) -> dict[str, str]:
    return {
        "rel_path": f.rel_path,
        "kind": kind,
        "error": error,
        "reason": reason,
        "file_size": str(f.size),
        "file_mtime_ns": str(f.mtime_ns),
    }


def _is_chest(body_part: str) -> bool:
    bp = body_part.strip().upper()
    return not bp or any(k in bp for k in CHEST_BODY_PARTS)


def _chunks(seq: Sequence[InputFile], n: int) -> Iterator[Sequence[InputFile]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _fresh_start(out: Path) -> None:
    for name in (PREDICTIONS, ERRORS, SUMMARY, RUN_INFO, INDEX):
        (out / name).unlink(missing_ok=True)
    for folder, pattern in ((OVERLAYS, "*.png"), (MASKS, "*.png"), (SEGS, "*.dcm")):
        if (out / folder).is_dir():
            for path in (out / folder).glob(pattern):
                path.unlink()


class _Reader:
    """Reads one file of the chunk: ``(loaded image or None, error/flag row or None)``.

    Order: skipped (not a regular file, index/system file) -> read (a read error wins over
    duplicate detection) -> is it a chest radiograph (:func:`check_radiograph`) -> duplicate
    (same SOPInstanceUID or bytes as an earlier file) -> header flags.
    """

    def __init__(
        self, secret: bytes, settings: Settings, policy: RadiographPolicy, work_side: int
    ) -> None:
        self.secret = secret
        self.work_side = work_side
        self.loader = LoadCXR(settings=settings)
        self.policy = policy
        self.seen: dict[str, str] = {}
        self.path_warnings = 0

    def __call__(self, f: InputFile) -> tuple[_Loaded | None, dict[str, str] | None]:
        if f.skip:
            return None, _error_row(f, "skipped", "NotARegularFile", f.skip)
        if f.path.name.lower() in INDEX_FILE_NAMES or f.path.name.startswith("."):
            what = "a DICOMDIR index" if f.path.name.upper() == "DICOMDIR" else "a system file"
            return None, _error_row(f, "skipped", "NotAnImage", f"{what}, not an image")
        try:
            image = self.loader(f.path)
        except CXRReadError as exc:
            return None, _error_row(f, "unreadable", type(exc).__name__, exc.reason)
        except Exception as exc:  # never stop the run; the message may quote header values
            return None, _error_row(
                f, "unreadable", type(exc).__name__, "unexpected error while reading"
            )
        original = (int(image.shape[-2]), int(image.shape[-1]))
        try:
            flags = check_radiograph(f.path, image.as_tensor()[0].numpy(), image.meta, self.policy)
        except CXRReadError as exc:
            return None, _error_row(f, "refused", type(exc).__name__, exc.reason)
        image = working_copy(image, self.work_side)  # the full-size decode is freed here
        try:
            ident = image_identity(f.path, self.secret)
        except OSError as exc:
            return None, _error_row(f, "unreadable", type(exc).__name__, "cannot open the file")
        if any(tok in f.rel_path.lower() for tok in ident.identifiers):
            self.path_warnings += 1
        if ident.pseudo_id in self.seen:
            same = "SOPInstanceUID" if ident.from_uid else "file content"
            reason = f"same {same} as {self.seen[ident.pseudo_id]}"
            return None, _error_row(f, "duplicate", "DuplicateImage", reason)
        self.seen[ident.pseudo_id] = f.rel_path
        if flags:
            return None, _error_row(f, "flagged", "NotClassified", "; ".join(flags))
        return _Loaded(f, ident, image, original), None


# Kinds of error rows whose image was read, passed the gate and took part in duplicate
# detection before it was set aside (flagged by its header or lung mask, failed in the networks)
REGISTERED_KINDS = ("flagged", "failed")


def _identities_set_aside(
    rows: Sequence[dict[str, str]], files: Sequence[InputFile], secret: bytes
) -> dict[str, str]:
    """``pseudo_id -> rel_path`` of the flagged and failed rows of ``errors.csv``.

    errors.csv has no pseudo_id column, so a resumed run recomputes these identities (a header
    read each): a later copy of a flagged image is then a ``duplicate``, as in an uninterrupted
    run (before, a resumed run reported it as flagged again).
    """
    by_path = {f.rel_path: f for f in files}
    seen: dict[str, str] = {}
    for row in rows:
        f = by_path.get(row["rel_path"])
        if row["kind"] not in REGISTERED_KINDS or f is None or f.skip:
            continue
        try:
            seen.setdefault(image_identity(f.path, secret).pseudo_id, f.rel_path)
        except OSError:  # gone since: nothing to compare later copies with
            continue
    return seen


def run_batch(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seg_checkpoint: str | os.PathLike | None = None,
    batch_size: int = 16,
    heatmaps: bool = True,
    resume: bool = True,
    progress: bool = True,
    max_files: int | None = None,
    device: str = "cpu",
    overlay_side: int = 512,
    settings: Settings | None = None,
    masks: bool = True,
    dicom_seg: bool = False,
    policy: RadiographPolicy | None = None,
    work_side: int = WORK_SIDE,
) -> BatchSummary:
    """Predict, segment and explain every image under ``inputs``; see the module docstring.

    Args:
        inputs: folder(s) (recursive), manifest CSV(s) with an ``image`` column, or files.
        model: classifier checkpoint with ``model.json`` beside it.
        out_dir: output folder (created; ``predictions.csv``, ``errors.csv``, ``overlays/``,
            ``masks/``, ``summary.json``, ``index.html``). May lie inside an input folder: it
            is never read as input. One run at a time: it is locked while a run writes to it.
        seg_checkpoint: lung segmentation checkpoint (default: the committed synthetic U-Net).
        batch_size: files per chunk (network batch and unit of saving).
        heatmaps: explain with LRP, write overlays and ``background_share``.
        resume: skip files already in the tables; ``False`` (``--restart``) deletes previous
            results first.
        progress: a tqdm bar on stderr (files/s, ETA).
        max_files: process at most this many new files, then stop (``complete=False``).
        device: torch device for both networks.
        overlay_side: long side of the overlay PNGs.
        settings: where the pseudonymisation secret lives (default from the environment).
        masks: write ``masks/<pseudo_id>.png`` (0/255 at the image's original size).
        dicom_seg: also write ``dicom_seg/<pseudo_id>.dcm`` (DICOM SEG) for DICOM inputs.
        policy: what counts as a chest radiograph (default :class:`RadiographPolicy`).
        work_side: long side of the copy of each image kept for the networks and overlays
            (bounds the memory of a chunk; masks are written at the original size).

    Raises:
        FileNotFoundError: no checkpoint at ``model`` or ``seg_checkpoint``.
        classification.model_card.ModelCardError: no usable ``model.json`` beside ``model``.
        BatchInputError: missing/empty inputs.
        BatchOutputMismatchError: ``out_dir`` holds results of another model or settings.
        BatchLockedError: another run is writing to ``out_dir``.
    """
    if batch_size < 1:
        raise BatchInputError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    model, out = Path(model), Path(out_dir)
    policy = policy or RadiographPolicy()
    # fails early on a bad model
    predictor = Predictor.load(model, seg_checkpoint=seg_checkpoint, device=device)
    files = collect_inputs(inputs, exclude=out)
    with output_lock(out) as lock_note:
        run_settings = _run_settings(predictor, model, seg_checkpoint, heatmaps, policy)
        run_settings["work_side"] = int(work_side)
        if not resume:
            _fresh_start(out)
        summary = _run_locked(
            predictor,
            files,
            out,
            run_settings,
            _Outputs(out, heatmaps, masks, dicom_seg, overlay_side),
            batch_size=batch_size,
            resume=resume,
            progress=progress,
            max_files=max_files,
            settings=settings or Settings.from_env(),
            policy=policy,
            work_side=work_side,
        )
        if lock_note:
            summary.notes.append(lock_note)
        summary.seconds = round(time.perf_counter() - t0, 3)
        summary.files_per_second = (
            round(summary.processed_now / summary.seconds, 3) if summary.seconds > 0 else 0.0
        )
        tmp = out / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        os.replace(tmp, out / SUMMARY)
        write_index_html(out, summary, predictor.classes)
    return summary


def _run_locked(
    predictor: Predictor,
    files: Sequence[InputFile],
    out: Path,
    run_settings: dict[str, Any],
    outputs: _Outputs,
    *,
    batch_size: int,
    resume: bool,
    progress: bool,
    max_files: int | None,
    settings: Settings,
    policy: RadiographPolicy,
    work_side: int,
) -> BatchSummary:
    """The body of :func:`run_batch`, with ``out`` locked."""
    from tqdm.auto import tqdm

    classes = list(predictor.classes)
    preds = _Table(out / PREDICTIONS, prediction_columns(classes), resume=resume)
    errs = _Table(out / ERRORS, ERROR_COLUMNS, resume=resume)
    _check_settings(out, run_settings, resume)
    current = {f.rel_path: f.key for f in files}
    changed = preds.drop_stale(current) + errs.drop_stale(current)
    done = preds.keys() | errs.keys()
    reader = _Reader(settings.pseudonym_secret(), settings, policy, work_side)
    reader.seen.update({r["pseudo_id"]: r["rel_path"] for r in preds.rows})
    for pid, rel in _identities_set_aside(errs.rows, files, reader.secret).items():
        reader.seen.setdefault(pid, rel)
    todo = [f for f in files if f.key not in done]
    already = len(files) - len(todo)
    if max_files is not None:
        todo = todo[: max(0, int(max_files))]
    complete = len(todo) == len(files) - already

    bar = tqdm(total=len(todo), unit="file", desc="batch", disable=not progress, smoothing=0.1)
    for chunk in _chunks(todo, batch_size):
        loaded: list[_Loaded] = []
        errors: list[dict[str, str]] = []
        for f in chunk:
            item, row = reader(f)
            if item is not None:
                loaded.append(item)
            if row is not None:
                errors.append(row)
        rows = _infer_robust(predictor, loaded, outputs, errors)
        preds.append(rows)
        errs.append(errors)
        bar.update(len(chunk))
        bar.set_postfix(errors=len(errs.rows), refresh=False)
    bar.close()

    summary = _summarise(out, preds.rows, errs.rows, classes, len(files), len(todo), already)
    summary.heatmaps, summary.complete = outputs.heatmaps, complete
    summary.paths_with_identifiers = reader.path_warnings
    summary.changed_files = changed
    summary.model = {**predictor.card.to_dict(), "checkpoint_sha256": run_settings["model_sha256"]}
    if reader.path_warnings:
        summary.notes.append(
            f"{reader.path_warnings} file path(s) contain the patient's name, id, birth date or "
            "accession number from their own header: remove the rel_path column of "
            "predictions.csv before sharing it"
        )
    return summary


def _segment_and_gate(
    predictor: Predictor, items: Sequence[_Loaded], errors: list[dict[str, str]]
) -> tuple[list[_Loaded], list[dict[str, Any]]]:
    """Lung masks for ``items``; an image whose mask says "no chest here"
    (:data:`NO_CHEST_FLAGS`) goes to ``errors`` as flagged and is not classified."""
    if predictor.segmenter is None:
        raise ValueError("batch runs need a lung segmenter")
    segs = predictor.segmenter([it.image for it in items])
    keep, keep_segs = [], []
    for it, seg in zip(items, segs, strict=True):
        bad = [f for f in seg["quality"]["flags"] if f in NO_CHEST_FLAGS]
        if bad:
            reason = f"the lung segmenter finds no chest ({';'.join(bad)})"
            errors.append(_error_row(it.file, "flagged", "NoLungsFound", reason))
        else:
            keep.append(it)
            keep_segs.append(seg)
    return keep, keep_segs


def _infer_robust(
    predictor: Predictor,
    loaded: Sequence[_Loaded],
    outputs: _Outputs,
    errors: list[dict[str, str]],
) -> list[dict[str, str]]:
    """Segment, gate, classify the chunk; if that fails, image by image (a failing one ->
    ``errors``)."""
    if not loaded:
        return []
    try:
        chunk_errors: list[dict[str, str]] = []
        keep, segs = _segment_and_gate(predictor, loaded, chunk_errors)
        rows = _infer(predictor, keep, segs, outputs) if keep else []
        errors.extend(chunk_errors)
        return rows
    except Exception:  # one odd image must not cost the chunk: retry one by one
        pass
    rows = []
    for item in loaded:
        try:
            keep, segs = _segment_and_gate(predictor, [item], errors)
            if keep:
                rows.extend(_infer(predictor, keep, segs, outputs))
        except Exception as exc:
            errors.append(
                _error_row(
                    item.file, "failed", type(exc).__name__, "segmentation/classification failed"
                )
            )
    return rows


def _summarise(
    out: Path,
    pred_rows: Sequence[dict[str, str]],
    err_rows: Sequence[dict[str, str]],
    classes: Sequence[str],
    found: int,
    now: int,
    already: int,
) -> BatchSummary:
    per_class = Counter(r["pred"] for r in pred_rows)
    flags = Counter(f for r in pred_rows for f in r["seg_flags"].split(";") if f)

    def by_error(kind: str) -> dict[str, int]:
        return dict(sorted(Counter(r["error"] for r in err_rows if r["kind"] == kind).items()))

    return BatchSummary(
        out_dir=out,
        files_found=found,
        processed_now=now,
        already_done=already,
        predictions=len(pred_rows),
        per_class={c: int(per_class.get(c, 0)) for c in classes},
        seg_flagged=sum(r["seg_ok"] != "True" for r in pred_rows),
        seg_flags=dict(sorted(flags.items())),
        non_chest=sum(not _is_chest(r["body_part"]) for r in pred_rows),
        errors=len(err_rows),
        errors_by_kind=dict(sorted(Counter(r["kind"] for r in err_rows).items())),
        paths_with_identifiers=0,
        changed_files=0,
        heatmaps=True,
        model={},
        seconds=0.0,
        files_per_second=0.0,
        complete=True,
        refused_by_error=by_error("refused"),
        unreadable_by_error=by_error("unreadable"),
    )
