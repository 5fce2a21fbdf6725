"""Resumable batch runs: a folder tree of chest X-rays + a trained classifier -> a results table.

:func:`run_batch` walks the input folders (or a manifest CSV), and for every chunk of
``batch_size`` files:

1. reads each file with :class:`cxr_io.readers.LoadCXR` (i.e. :func:`~cxr_io.readers.load_cxr`);
   a file that cannot be read goes to ``errors.csv`` with the reason, a second copy of an image
   already seen (same SOPInstanceUID) is reported as a duplicate, index files (``DICOMDIR``) and
   hidden files are reported as skipped;
2. segments the lungs with the segmentation stage (:func:`segmentation.infer.infer_postprocessing`:
   the same resize, post-processing and quality flags as ``isnet-cxr seg predict``);
3. classifies with the model described by its card (``model.json``): the image resized to
   ``size x size``; a ``segment_then_classify`` model is fed the image times the predicted mask;
4. explains the predicted class with LRP-epsilon (:func:`classification.explain.explain`),
   writes ``overlays/<pseudo_id>.png`` and the share of relevance outside the predicted lungs;
5. appends the chunk's rows to ``predictions.csv`` and ``errors.csv`` (one write of complete
   rows, then ``fsync``), so a crash loses at most the chunk in flight.

A re-run with the same output folder resumes: a file already in either table with the same
relative path, size and modification time is skipped. ``summary.json`` is rewritten at the end.

Output folder::

    predictions.csv   pseudo_id, rel_path, modality, view_position, body_part, photometric, pred,
                      prob_<class>..., seg_ok, seg_flags, lung_area_fraction, background_share,
                      study_pseudo_id, file_size, file_mtime_ns
    errors.csv        rel_path, kind (unreadable|duplicate|skipped|failed), error, reason,
                      file_size, file_mtime_ns
    overlays/         <pseudo_id>.png: the image, the LRP heatmap (red +, blue -), the lung outline
    summary.json      counts per class, flagged masks, errors per kind; no paths, no identifiers

Privacy: ``pseudo_id`` is a keyed hash (HMAC-SHA256 under the installation secret) of the
image's SOPInstanceUID (or of the file's bytes when it has none): one id per image, not
reversible without the secret. ``study_pseudo_id`` is the loader's patient+study pseudonym.
No PatientName, PatientID, BirthDate or AccessionNumber is written anywhere. ``rel_path`` is the
researcher's own file path: if folder or file names hold patient names (some PACS exports do),
drop that column before sharing; the run counts such paths and warns (``paths_with_identifiers``).

The classifier's inference bundle (``configs/inference.json``) has its factories in
:mod:`pipeline.inference_bundle`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from cxr_io.privacy import identifier_tokens, image_pseudo_id
from cxr_io.readers import CXRReadError, LoadCXR
from cxr_io.settings import Settings
from evaluation.figures import heatmap_overlay_rgb
from pipeline.predictor import Predictor, resolve_checkpoint

__all__ = [
    "BatchInputError",
    "BatchSummary",
    "ERROR_COLUMNS",
    "ImageIdentity",
    "InputFile",
    "collect_inputs",
    "image_identity",
    "prediction_columns",
    "run_batch",
]

PREDICTIONS = "predictions.csv"
ERRORS = "errors.csv"
SUMMARY = "summary.json"
OVERLAYS = "overlays"
ERROR_COLUMNS = ("rel_path", "kind", "error", "reason", "file_size", "file_mtime_ns")
KEY_COLUMNS = ("file_size", "file_mtime_ns")
# Files of a PACS export that are not images: reported as skipped, never read as images.
INDEX_FILE_NAMES = frozenset({"dicomdir", "thumbs.db", "desktop.ini", ".ds_store"})
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")


class BatchInputError(ValueError):
    """The inputs or the output folder cannot be used (the message says which and what to do)."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One file of the input tree: its absolute ``path``, ``rel_path`` (POSIX, relative to its
    input root), and the ``size``/``mtime_ns`` that, with ``rel_path``, key it for resuming."""

    path: Path
    rel_path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rel_path, str(self.size), str(self.mtime_ns))


def _input_file(path: Path, rel: str) -> InputFile:
    st = path.stat()
    return InputFile(path=path, rel_path=rel, size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != exclude]
        dirnames.sort()
        for name in sorted(filenames):
            yield here / name


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
            absent = [str(p) for p, _ in pairs if not p.is_file()]
            if absent:
                raise BatchInputError(
                    f"{root}: {len(absent)} image(s) listed in the manifest do not exist "
                    f"(first: {absent[0]}); fix the paths (relative to the CSV's folder)"
                )
        else:
            pairs = [(root, root.name)]
        for path, rel in pairs:
            found.setdefault(prefix + rel, _input_file(path.resolve(), prefix + rel))
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
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    except Exception:  # not DICOM or unreadable header: load_cxr reports the reason
        ds, uid = None, ""
    if uid:
        return ImageIdentity(image_pseudo_id(secret, "sop", uid), True, identifier_tokens(ds))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    tokens = identifier_tokens(ds) if ds is not None else ()
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
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                if list(reader.fieldnames or []) != self.columns:
                    raise BatchInputError(
                        f"{path} has columns {reader.fieldnames}, expected {self.columns}: it was "
                        "written by another model or version. Use a new --out folder, or "
                        "--no-resume to start this one again."
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
        with self.path.open(mode, newline="") as fh:
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
            with tmp.open("w", newline="") as fh:
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


# --------------------------------------------------------------------------------------------
# The models of a run
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    file: InputFile
    identity: ImageIdentity
    image: MetaTensor  # [1, H, W] in [0, 1]


def _meta_text(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _infer(
    predictor: Predictor, items: Sequence[_Loaded], heatmaps: bool, overlay_dir: Path, max_side: int
) -> list[dict[str, str]]:
    """Segment, classify and explain ``items`` (:class:`Predictor`); write overlays; return
    prediction rows."""
    results = predictor.predict([it.image for it in items], heatmaps=heatmaps)
    classes = predictor.classes
    rows = []
    for it, res in zip(items, results, strict=True):
        if res.heatmap is not None:
            _save_png(
                heatmap_overlay_rgb(
                    it.image.as_tensor()[0].numpy(), res.heatmap, res.mask, max_side
                ),
                overlay_dir / f"{it.identity.pseudo_id}.png",
            )
        meta, q = it.image.meta, res.quality
        row = {
            "pseudo_id": it.identity.pseudo_id,
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
    for name in (PREDICTIONS, ERRORS, SUMMARY):
        (out / name).unlink(missing_ok=True)
    if (out / OVERLAYS).is_dir():
        for png in (out / OVERLAYS).glob("*.png"):
            png.unlink()


def _model_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


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
) -> BatchSummary:
    """Predict, segment and explain every image under ``inputs``; see the module docstring.

    Args:
        inputs: folder(s) (recursive), manifest CSV(s) with an ``image`` column, or files.
        model: classifier checkpoint with ``model.json`` beside it.
        out_dir: output folder (created; ``predictions.csv``, ``errors.csv``, ``overlays/``,
            ``summary.json``). May lie inside an input folder: it is never read as input.
        seg_checkpoint: lung segmentation checkpoint (default: the committed synthetic U-Net).
        batch_size: files per chunk (network batch and unit of saving).
        heatmaps: explain with LRP, write overlays and ``background_share``.
        resume: skip files already in the tables; ``False`` deletes previous results first.
        progress: a tqdm bar on stderr (files/s, ETA).
        max_files: process at most this many new files, then stop (``complete=False``).
        device: torch device for both networks.
        overlay_side: long side of the overlay PNGs.
        settings: where the pseudonymisation secret lives (default from the environment).

    Raises:
        FileNotFoundError: no checkpoint at ``model`` or ``seg_checkpoint``.
        classification.model_card.ModelCardError: no usable ``model.json`` beside ``model``.
        BatchInputError: missing/empty inputs, or result tables written by another model.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise BatchInputError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    model, out = Path(model), Path(out_dir)
    # fails early on a bad model
    predictor = Predictor.load(model, seg_checkpoint=seg_checkpoint, device=device)
    files = collect_inputs(inputs, exclude=out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _fresh_start(out)
    classes = list(predictor.classes)
    preds = _Table(out / PREDICTIONS, prediction_columns(classes), resume=resume)
    errs = _Table(out / ERRORS, ERROR_COLUMNS, resume=resume)
    current = {f.rel_path: f.key for f in files}
    changed = preds.drop_stale(current) + errs.drop_stale(current)
    done = preds.keys() | errs.keys()
    seen: dict[str, str] = {r["pseudo_id"]: r["rel_path"] for r in preds.rows}
    todo = [f for f in files if f.key not in done]
    already = len(files) - len(todo)
    if max_files is not None:
        todo = todo[: max(0, int(max_files))]
    complete = len(todo) == len(files) - already

    settings = settings or Settings.from_env()
    secret = settings.pseudonym_secret()
    loader = LoadCXR(settings=settings)
    overlay_dir = out / OVERLAYS
    path_warnings = 0
    bar = tqdm(total=len(todo), unit="file", desc="batch", disable=not progress, smoothing=0.1)
    for chunk in _chunks(todo, batch_size):
        loaded: list[_Loaded] = []
        errors: list[dict[str, str]] = []
        for f in chunk:
            if f.path.name.lower() in INDEX_FILE_NAMES or f.path.name.startswith("."):
                what = "a DICOMDIR index" if f.path.name.upper() == "DICOMDIR" else "a system file"
                errors.append(_error_row(f, "skipped", "NotAnImage", f"{what}, not an image"))
                continue
            try:
                ident = image_identity(f.path, secret)
            except OSError as exc:
                errors.append(
                    _error_row(f, "unreadable", type(exc).__name__, "cannot open the file")
                )
                continue
            if any(tok in f.rel_path.lower() for tok in ident.identifiers):
                path_warnings += 1
            if ident.pseudo_id in seen:
                same = "SOPInstanceUID" if ident.from_uid else "file content"
                errors.append(
                    _error_row(
                        f, "duplicate", "DuplicateImage", f"same {same} as {seen[ident.pseudo_id]}"
                    )
                )
                continue
            try:
                image = loader(f.path)
            except CXRReadError as exc:
                errors.append(_error_row(f, "unreadable", type(exc).__name__, exc.reason))
                continue
            except Exception as exc:  # never stop the run; the message may quote header values
                errors.append(
                    _error_row(
                        f, "unreadable", type(exc).__name__, "unexpected error while reading"
                    )
                )
                continue
            seen[ident.pseudo_id] = f.rel_path
            loaded.append(_Loaded(f, ident, image))
        rows = _infer_robust(predictor, loaded, heatmaps, overlay_dir, overlay_side, errors)
        preds.append(rows)
        errs.append(errors)
        bar.update(len(chunk))
        bar.set_postfix(errors=len(errs.rows), refresh=False)
    bar.close()

    seconds = time.perf_counter() - t0
    summary = _summarise(
        out, preds.rows, errs.rows, classes, len(files), len(todo), already, heatmaps, complete
    )
    summary.paths_with_identifiers = path_warnings
    summary.changed_files = changed
    summary.model = {
        **predictor.card.to_dict(),
        "checkpoint_sha256": _model_sha256(resolve_checkpoint(model)),
    }
    summary.seconds = round(seconds, 3)
    summary.files_per_second = round(len(todo) / seconds, 3) if seconds > 0 else 0.0
    if path_warnings:
        summary.notes.append(
            f"{path_warnings} file path(s) contain the patient's name, id, birth date or "
            "accession number from their own header: remove the rel_path column of "
            "predictions.csv before sharing it"
        )
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(tmp, out / SUMMARY)
    return summary


def _infer_robust(
    predictor: Predictor,
    loaded: Sequence[_Loaded],
    heatmaps: bool,
    overlay_dir: Path,
    max_side: int,
    errors: list[dict[str, str]],
) -> list[dict[str, str]]:
    """:func:`_infer` on the chunk; if it fails, image by image (a failing one -> ``errors``)."""
    if not loaded:
        return []
    try:
        return _infer(predictor, loaded, heatmaps, overlay_dir, max_side)
    except Exception:  # one odd image must not cost the chunk: retry one by one
        pass
    rows = []
    for item in loaded:
        try:
            rows.extend(_infer(predictor, [item], heatmaps, overlay_dir, max_side))
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
    heatmaps: bool,
    complete: bool,
) -> BatchSummary:
    per_class = Counter(r["pred"] for r in pred_rows)
    flags = Counter(f for r in pred_rows for f in r["seg_flags"].split(";") if f)
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
        heatmaps=heatmaps,
        model={},
        seconds=0.0,
        files_per_second=0.0,
        complete=complete,
    )
