"""Datasets as CSV manifests: one row per image.

Columns: ``image``, ``label``, ``site`` (required) and ``mask``, ``patient_id``, ``split``
(optional); any further column (e.g. ``bias`` from the synthetic generator) is kept as is.
Paths in the file are relative to the manifest's folder (absolute paths are accepted);
:func:`load_manifest` returns them absolute, :func:`write_manifest` writes them relative.

Loading validates the whole file and reports every problem at once, with the CSV row number
(the header is row 1, the first image row 2), in a :class:`ManifestError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

REQUIRED_COLUMNS = ("image", "label", "site")
OPTIONAL_COLUMNS = ("mask", "patient_id", "split")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".mha", ".mhd")


class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` lists every problem found."""

    def __init__(self, path: str | os.PathLike, problems: Sequence[str]):
        self.path = Path(path)
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(
            f"{self.path}: {len(self.problems)} problem(s) in the manifest:\n{shown}{more}\n"
            "Fix these rows (paths are relative to the manifest's folder) and load it again."
        )


def _row(i: int) -> str:
    return f"row {i + 2}"


def _resolve(base: Path, value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == "":
        return ""
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _image_size(path: str) -> tuple[int, int] | None:
    """(H, W) of an image or mask read from its header only, or None when unreadable.

    Sizes are compared, never decoded, so checking a large manifest stays cheap.
    """
    name = path.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = nib.load(path).shape
            return (int(shape[1]), int(shape[0]))  # nibabel is (x, y): rows are y
        if name.endswith((".mha", ".mhd")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            size = reader.GetSize()
            return (int(size[1]), int(size[0]))
        if name.endswith((".png", ".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(path) as img:
                return (img.height, img.width)
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return (int(ds.Rows), int(ds.Columns))
    except Exception:  # unreadable headers are reported by the loaders, not here
        return None


def load_manifest(
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    check_mask_sizes: bool = True,
) -> pd.DataFrame:
    """Read and validate a manifest; return it with absolute ``image``/``mask`` paths.

    Args:
        path: the CSV file.
        labels: the allowed class names; ``None`` accepts any non-empty label.
        check_files: check that every image and mask file exists.
        check_mask_sizes: compare each mask's size with its image's (header reads only).

    Returns:
        A DataFrame with at least the columns of :data:`REQUIRED_COLUMNS` and
        :data:`OPTIONAL_COLUMNS` (optional ones filled with ``""`` when absent).

    Raises:
        ManifestError: listing every problem with its row number.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, ["the manifest file does not exist"])
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(path, [f"not a readable CSV file ({exc})"]) from exc

    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        raise ManifestError(
            path,
            [f"missing column(s) {', '.join(missing_cols)}; found {', '.join(df.columns)}"],
        )
    if df.empty:
        raise ManifestError(path, ["the manifest has no rows"])
    for col in OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.map(lambda v: v.strip() if isinstance(v, str) else v)

    base = path.parent.resolve()
    problems: list[str] = []
    df["image"] = [_resolve(base, v) for v in df["image"]]
    df["mask"] = [_resolve(base, v) for v in df["mask"]]

    for i, row in df.iterrows():
        if not row["image"]:
            problems.append(f"{_row(i)}: empty image path")
        if not row["label"]:
            problems.append(f"{_row(i)}: empty label")
        elif labels is not None and row["label"] not in labels:
            problems.append(
                f"{_row(i)}: unknown label {row['label']!r} (expected one of {', '.join(labels)})"
            )
        if not row["site"]:
            problems.append(f"{_row(i)}: empty site")
        if row["split"] and row["split"] not in SPLITS:
            problems.append(
                f"{_row(i)}: unknown split {row['split']!r} (expected {', '.join(SPLITS)})"
            )
        if check_files:
            for col in ("image", "mask"):
                if row[col] and not Path(row[col]).is_file():
                    problems.append(f"{_row(i)}: {col} file not found: {row[col]}")

    dup = df["image"].duplicated(keep=False) & (df["image"] != "")
    for image, group in df[dup].groupby("image"):
        rows = ", ".join(str(i + 2) for i in group.index)
        problems.append(f"rows {rows}: the same image appears more than once: {image}")

    with_patient = df[(df["patient_id"] != "") & (df["split"] != "")]
    for pid, group in with_patient.groupby("patient_id"):
        splits = sorted(set(group["split"]))
        if len(splits) > 1:
            rows = ", ".join(str(i + 2) for i in group.index)
            problems.append(
                f"rows {rows}: patient {pid!r} is in more than one split ({', '.join(splits)}); "
                "keep all of a patient's images in one split"
            )

    if check_files and check_mask_sizes:
        for i, row in df.iterrows():
            if not (row["mask"] and Path(row["mask"]).is_file() and Path(row["image"]).is_file()):
                continue
            isize, msize = _image_size(row["image"]), _image_size(row["mask"])
            if isize and msize and isize != msize:
                problems.append(
                    f"{_row(i)}: mask size {msize[0]}x{msize[1]} differs from image size "
                    f"{isize[0]}x{isize[1]} ({row['mask']})"
                )

    if problems:
        raise ManifestError(path, problems)
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` with ``image``/``mask`` paths relative to the manifest's folder.

    The file is written to a temporary name and renamed, so a crash never leaves half a manifest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    out = df.copy()
    for col in ("image", "mask"):
        if col in out.columns:
            out[col] = [_relative(base, v) for v in out[col]]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    out.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def _relative(base: Path, value: Any) -> str:
    if value is None or str(value) == "" or (isinstance(value, float) and pd.isna(value)):
        return ""
    p = Path(str(value))
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p.resolve(), base)).as_posix()
    except ValueError:  # another drive on Windows
        return p.as_posix()


def class_names(df: pd.DataFrame) -> list[str]:
    """The class names of a manifest, sorted, which fixes the class index order."""
    return sorted(set(df["label"]))


def to_records(df: pd.DataFrame, classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """MONAI-style data dicts: ``image``, ``label`` (int index into ``classes``), ``site``,
    ``patient_id``, ``split``, and ``mask`` when the row has one (other columns kept as strings)."""
    classes = list(classes) if classes is not None else class_names(df)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for row in df.to_dict(orient="records"):
        rec = {k: v for k, v in row.items() if k != "mask" or v}
        rec["label_name"] = row["label"]
        rec["label"] = index[row["label"]]
        records.append(rec)
    return records


def select(
    df: pd.DataFrame,
    *,
    sites: Iterable[str] | None = None,
    splits: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows whose site and split are in the given sets (``None`` keeps all)."""
    keep = pd.Series(True, index=df.index)
    if sites is not None:
        keep &= df["site"].isin(list(sites))
    if splits is not None:
        keep &= df["split"].isin(list(splits))
    return df[keep].reset_index(drop=True)


def build_from_folders(
    root: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    site: str,
    split: str = "",
    mask_dir: str | os.PathLike | None = None,
) -> Path:
    """Make a manifest from a folder-per-class layout ``root/<label>/<image files>``.

    Args:
        root: the folder holding one sub-folder per class.
        out_csv: where to write the manifest.
        site: the site name given to every row.
        split: an optional split for every row.
        mask_dir: an optional folder with ``<label>/<stem>.png`` masks.

    Raises:
        ManifestError: when ``root`` has no class folders or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(out_csv, [f"{root} is not a folder"])
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or not f.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            mask = ""
            if mask_dir is not None:
                candidate = Path(mask_dir) / class_dir.name / f"{f.name.split('.')[0]}.png"
                mask = str(candidate.resolve()) if candidate.is_file() else ""
            rows.append(
                {
                    "image": str(f.resolve()),
                    "label": class_dir.name,
                    "site": site,
                    "mask": mask,
                    "patient_id": "",
                    "split": split,
                }
            )
    if not rows:
        raise ManifestError(
            out_csv,
            [f"no images found under {root}/<class>/ (suffixes: {', '.join(IMAGE_SUFFIXES)})"],
        )
    return write_manifest(pd.DataFrame(rows), out_csv)
