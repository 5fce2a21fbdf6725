"""Privacy: the one keyed-hash scheme for pseudonymous ids and the identifier checks.

Every pseudonymous id in this project is ``HMAC-SHA256(secret, part_1 \\x00 part_2 ...)`` cut to
16 hex digits (:func:`keyed_hash`), with the per-installation secret of
:meth:`cxr_io.settings.Settings.pseudonym_secret`:

* a DICOM image's patient/study: ``"anon-" + keyed_hash(secret, PatientID, StudyInstanceUID)``
  (:func:`pseudonymous_id`);
* one image file in a batch run: ``"img-" + keyed_hash(secret, "sop", SOPInstanceUID)`` or
  ``"img-" + keyed_hash(secret, "file", sha256 of the bytes)`` (:func:`image_pseudo_id`);
* a manifest row logged to MLflow: ``keyed_hash(secret, image path)`` (:func:`pseudonymous_frame`).

:func:`assert_no_identifiers` refuses any value about to be written that contains a known patient
identifier; :func:`identifier_tokens` collects a DICOM header's identifying values (in memory only).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Columns of a manifest frame that may be logged (everything else is dropped).
SAFE_COLUMNS = ("site", "label", "split", "bias", "pseudo_id")
#: Columns that identify a patient or an image file (never logged, used for the privacy check).
IDENTIFIER_COLUMNS = ("patient_id", "image", "mask")
#: Columns made here from numbers or keyed hashes (their cells are not searched for identifiers).
GENERATED_COLUMNS = ("row", "image_key", "pseudo_id", "label_index", "pred")
#: DICOM header keywords whose values identify a patient.
IDENTIFIER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


def keyed_hash(secret: bytes, *parts: str | bytes) -> str:
    """``HMAC-SHA256(secret, parts joined by NUL)`` as 16 hex digits (not reversible without
    the secret; the separator keeps ``("P1", "12")`` apart from ``("P11", "2")``)."""
    msg = b"\x00".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:16]


def pseudonymous_id(patient_id: str, study_uid: str, secret: bytes) -> str:
    """Keyed hash of PatientID and StudyInstanceUID: ``"anon-" + 16 hex digits``."""
    return "anon-" + keyed_hash(secret, patient_id, study_uid)


def image_pseudo_id(secret: bytes, kind: str, payload: str | bytes) -> str:
    """One image's id in a batch run: ``"img-" + 16 hex``; ``kind`` is ``"sop"`` (payload: the
    SOPInstanceUID) or ``"file"`` (payload: the SHA-256 digest of the file's bytes)."""
    return "img-" + keyed_hash(secret, kind, payload)


def identifier_tokens(ds: Any) -> tuple[str, ...]:
    """Lower-cased identifying values of a pydicom header (:data:`IDENTIFIER_KEYWORDS`) and their
    parts of 4 or more characters (for warning when a file path contains them); memory only."""
    tokens: set[str] = set()
    for keyword in IDENTIFIER_KEYWORDS:
        value = str(ds.get(keyword, "") or "").strip().lower()
        if not value:
            continue
        parts = [value] + [p for p in value.replace("^", " ").split() if p]
        tokens.update(p for p in parts if len(p) >= 4)
    return tuple(sorted(tokens))


class PrivacyError(ValueError):
    """A value about to be written contains a patient identifier."""


def assert_no_identifiers(values: Any, forbidden: Iterable[Any]) -> None:
    """Raise :class:`PrivacyError` when any string in ``values`` contains a forbidden identifier.

    ``values`` may be a string, a mapping (keys and values are checked), a DataFrame (column
    names and the distinct values of its text columns; the columns this module generates,
    :data:`GENERATED_COLUMNS`, and numeric columns are skipped) or any iterable of those.
    Identifiers of 4 or more characters are matched as substrings; shorter ones only as whole
    values (so an id ``"7"`` does not flag ``seed=7``). The error says where the identifier
    was found, never the identifier itself.
    """
    ids = {str(f).strip() for f in forbidden if f is not None and str(f).strip()}
    ids.discard("nan")
    if not ids:
        return
    long_ids = {i for i in ids if len(i) >= 4}
    short_ids = ids - long_ids
    lengths = sorted({len(i) for i in long_ids})

    def contains_id(text: str) -> bool:
        # every substring of an id's length, looked up in a set: O(len(text) * n_lengths),
        # independent of how many identifiers there are
        if text in short_ids:
            return True
        for n in lengths:
            if n > len(text):
                break
            if any(text[j : j + n] in long_ids for j in range(len(text) - n + 1)):
                return True
        return False

    for where, text in _strings(values, "value"):
        if contains_id(text):
            raise PrivacyError(
                f"{where} contains a patient identifier; it must not be written to MLflow, logs "
                "or outputs. Drop or pseudonymise that field."
            )


def _strings(values: Any, where: str) -> Iterator[tuple[str, str]]:
    if values is None:
        return
    if isinstance(values, (str, bytes, Path, int, float, np.generic)):
        yield where, values.decode() if isinstance(values, bytes) else str(values)
    elif isinstance(values, pd.DataFrame):
        for col in values.columns:
            yield f"{where} column name {col!r}", str(col)
            generated = str(col) in GENERATED_COLUMNS or str(col).startswith("prob_")
            if generated or pd.api.types.is_numeric_dtype(values[col]):
                continue
            for cell in pd.unique(values[col].astype(str)):
                yield f"{where} column {col!r}", cell
    elif isinstance(values, Mapping):
        for key, val in values.items():
            yield f"{where} key {key!r}", str(key)
            yield from _strings(val, f"{where}[{key!r}]")
    elif isinstance(values, Iterable):
        for i, val in enumerate(values):
            yield from _strings(val, f"{where}[{i}]")
    else:
        yield where, str(values)


def pseudonymous_frame(df: pd.DataFrame, secret: bytes) -> pd.DataFrame:
    """The part of a manifest frame that may be logged: ``row, image_key`` + :data:`SAFE_COLUMNS`.

    ``row`` is the frame's integer index (the manifest row) or the position; ``image_key`` is
    ``HMAC-SHA256(secret, image path)`` cut to 16 hex characters (same image, same key, within
    one installation; not reversible without the secret). Patient ids, paths and every other
    column are dropped.
    """
    out = pd.DataFrame(index=range(len(df)))
    idx = df.index
    out["row"] = idx.to_numpy() if pd.api.types.is_integer_dtype(idx) else np.arange(len(df))
    if "image" in df.columns:
        out["image_key"] = [keyed_hash(secret, str(p)) for p in df["image"]]
    for col in SAFE_COLUMNS:
        if col in df.columns:
            out[col] = df[col].fillna("").astype(str).to_numpy()
    return out


def identifiers_of(df: pd.DataFrame | None) -> set[str]:
    if df is None:
        return set()
    ids: set[str] = set()
    for col in IDENTIFIER_COLUMNS:
        if col in df.columns:
            ids.update(str(v) for v in df[col].dropna() if str(v).strip())
    return ids
