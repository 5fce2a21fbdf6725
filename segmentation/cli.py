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
from segmentation.infer import PostprocessConfig, list_images, predict_files
from segmentation.masks_step import write_masks
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
) -> None:
    """Segment images; write masks, overlays and quality.csv (flags per image)."""

    files: list[str] = []
    try:
        for p in images:
            files += [d["image"] for d in list_images(p)]
    except FileNotFoundError as exc:
        _fail(str(exc))
    try:
        writer = SegmentationWriter(out, formats=formats, overlay=overlay)
    except ValueError as exc:
        _fail(str(exc))

    def sink(res) -> None:
        writer.write_item(res.image, res.mask, res.quality.to_dict(), res.spacing)

    try:
        predict_files(
            files,
            ckpt or default_segmenter(),
            batch_size=batch_size,
            num_workers=num_workers,
            post=PostprocessConfig(margin_mm=margin_mm),
            sink=sink,
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    summary = writer.write_summary()
    flagged = [r for r in writer.rows if not r["ok"]]
    typer.echo(f"{len(writer.rows)} image(s) segmented, {len(flagged)} flagged -> {summary}")
    for r in flagged:
        typer.echo(f"  FLAGGED {r['image']}: {r['flags']}")


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
