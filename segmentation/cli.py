"""``isnet-cxr seg ...``: train the lung U-Net, segment images, fill a manifest's masks.

The lead mounts :data:`seg_app` as ``isnet-cxr seg``; ``python -m segmentation.cli`` runs it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cxr_io.manifest import ManifestError
from cxr_io.resources import default_segmenter
from segmentation.export import SegmentationWriter
from segmentation.infer import (
    IMAGE_SUFFIXES,
    PostprocessConfig,
    list_images,
    predict_files,
)
from segmentation.masks_step import write_masks
from segmentation.model import load_seg_model
from segmentation.train import train_seg

seg_app = typer.Typer(
    help="Lung segmentation: train the U-Net, predict masks, fill a manifest's mask column.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@seg_app.command("train")
def train(
    dataset_dir: Path = typer.Argument(..., help="Folder with manifest.csv (images + masks)."),
    output_dir: Path = typer.Option(Path("outputs/seg"), help="Checkpoints and logs go here."),
    epochs: int = typer.Option(40, help="Maximum epochs (early stopping may end sooner)."),
    size: int = typer.Option(256, help="Network input side (256 demo, 512 real films)."),
    batch_size: int = typer.Option(8),
    num_workers: int = typer.Option(0, help="DataLoader worker processes."),
    seed: int = typer.Option(0),
    train_site: list[str] = typer.Option(None, help="Train on these sites only (repeatable)."),
    resume: bool = typer.Option(True, help="Continue from <output_dir>/models/last.pt if present."),
    tracking: bool = typer.Option(False, "--mlflow", help="Log the run to MLflow."),
    set_: list[str] = typer.Option(
        None, "--set", help="Any config override ID=VALUE (JSON value), e.g. learning_rate=0.001"
    ),
) -> None:
    """Train the lung U-Net through configs/train_seg.json; prints the best checkpoint path."""

    overrides = {
        "spatial_size": [size, size],
        "batch_size": batch_size,
        "num_workers": num_workers,
        "seed": seed,
        "resume": resume,
        "train#trainer#max_epochs": epochs,
    }
    if train_site:
        overrides["train_sites"] = list(train_site)
        overrides["val_sites"] = list(train_site)
    for item in set_ or []:
        if "=" not in item:
            _fail(f"--set expects ID=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    try:
        best = train_seg(
            dataset_dir, output_dir, tracking="mlflow" if tracking else None, **overrides
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"best checkpoint: {best}")


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the 'DICM' marker after the 128-byte preamble."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _list_inputs(source: Path) -> list[str]:
    """Images under ``source``: a folder is searched recursively for files with an image
    extension and for DICOM files without one (checked by their 'DICM' marker); regular files
    only, symbolic links to folders not followed. Manifests and single files as
    :func:`segmentation.infer.list_images`."""
    import os
    import stat

    if not source.is_dir() or (source / "manifest.csv").is_file():
        return [d["image"] for d in list_images(source)]
    found = []
    for dirpath, _, names in os.walk(source, followlinks=False):
        for name in names:
            path = Path(dirpath) / name
            try:
                regular = stat.S_ISREG(path.stat().st_mode)  # a FIFO would block a read
            except OSError:
                continue
            if not regular or name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES) or _is_dicom_file(path):
                found.append(str(path))
    if not found:
        return [d["image"] for d in list_images(source)]  # raises its "no images found"
    return sorted(found)


def _error_of(exc: BaseException) -> tuple[str, str]:
    """(error type, reason) of a failure: the reader's own error when MONAI wrapped one."""
    from cxr_io.readers import CXRReadError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, CXRReadError):
        cause = cause.__cause__
    if isinstance(cause, CXRReadError):
        return type(cause).__name__, cause.reason
    return type(exc).__name__, "segmentation failed"


def _segment_robustly(files: list[str], run_chunk, write, errors: list[dict], bar) -> None:
    """Segment ``files`` in chunks; a chunk that fails is redone file by file, and a file that
    fails becomes an ``errors`` row (the others go on). ``write`` is called once per result."""
    chunk_size = 32
    for start in range(0, len(files), chunk_size):
        chunk = files[start : start + chunk_size]
        try:
            results = run_chunk(chunk)
        except Exception:
            results = None
        if results is None:
            results = []
            for f in chunk:
                try:
                    results.extend(run_chunk([f]))
                except Exception as exc:
                    kind, reason = _error_of(exc)
                    errors.append({"image": f, "error": kind, "reason": reason})
        for res in results:
            try:
                write(res)
            except Exception as exc:
                kind, reason = _error_of(exc)
                errors.append({"image": str(res.image), "error": kind, "reason": reason})
        bar.update(len(chunk))


@seg_app.command("predict")
def predict(
    images: list[Path] = typer.Argument(..., help="Image files, folders or a manifest CSV."),
    out: Path = typer.Option(Path("outputs/seg_predict"), help="Output folder."),
    ckpt: Path | None = typer.Option(
        None, help="Segmentation checkpoint (.pt); default: the committed synthetic U-Net."
    ),
    formats: list[str] = typer.Option(["png"], "--format", help="png, nifti, dicom_seg"),
    overlay: bool = typer.Option(True, help="Write overlay previews."),
    batch_size: int = typer.Option(4),
    num_workers: int = typer.Option(0),
    margin_mm: float = typer.Option(0.0, help="Dilate masks by this margin when spacing is known."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Segment images; write masks, overlays, quality.csv (flags per image) and errors.csv
    (files that could not be segmented, with the reason; they do not stop the run).

    Folders are searched recursively for image files and for DICOM files without an extension.
    """
    import csv

    from tqdm.auto import tqdm

    files: list[str] = []
    try:
        for p in images:
            files += _list_inputs(p)
    except FileNotFoundError as exc:
        _fail(str(exc))
    try:
        writer = SegmentationWriter(out, formats=formats, overlay=overlay)
    except ValueError as exc:
        _fail(str(exc))
    checkpoint = ckpt or default_segmenter()
    try:
        load_seg_model(checkpoint)  # a bad checkpoint stops here, not once per file
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        _fail(f"cannot load the segmentation checkpoint {checkpoint}: {exc}")

    def run_chunk(chunk: list[str]):
        return predict_files(
            chunk,
            checkpoint,
            batch_size=batch_size,
            num_workers=num_workers,
            post=PostprocessConfig(margin_mm=margin_mm),
        )

    def write(res) -> None:
        writer.write_item(res.image, res.mask, res.quality.to_dict(), res.spacing)

    errors: list[dict[str, str]] = []
    bar = tqdm(total=len(files), unit="image", desc="seg predict", disable=not progress)
    try:
        _segment_robustly(files, run_chunk, write, errors, bar)
    finally:
        bar.close()
        summary = writer.write_summary()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "errors.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "error", "reason"])
            w.writeheader()
            w.writerows(errors)
    flagged = [r for r in writer.rows if not r["ok"]]
    typer.echo(f"{len(writer.rows)} image(s) segmented, {len(flagged)} flagged -> {summary}")
    for r in flagged:
        typer.echo(f"  FLAGGED {r['image']}: {r['flags']}")
    if errors:
        typer.echo(f"{len(errors)} file(s) not segmented; reasons in {out / 'errors.csv'}")


@seg_app.command("masks")
def masks(
    manifest: Path = typer.Argument(..., help="Input manifest CSV."),
    out: Path = typer.Option(..., help="Folder for masks/ and the new manifest.csv."),
    ckpt: Path | None = typer.Option(
        None, help="Segmentation checkpoint (.pt); default: the committed synthetic U-Net."
    ),
    overwrite: bool = typer.Option(False, help="Also replace masks the manifest already has."),
    batch_size: int = typer.Option(4),
    num_workers: int = typer.Option(0),
) -> None:
    """Write a lung mask for every row and a manifest with the mask column filled."""

    try:
        path = write_masks(
            manifest,
            ckpt or default_segmenter(),
            out,
            overwrite=overwrite,
            batch_size=batch_size,
            num_workers=num_workers,
        )
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    n_pred = int((df["mask_source"] == "predicted").sum())
    n_flag = int((df["seg_ok"] == "False").sum())
    typer.echo(f"manifest: {path} ({len(df)} rows, {n_pred} masks predicted, {n_flag} flagged)")


if __name__ == "__main__":
    seg_app()
