"""``isnet-cxr batch run``: classify, segment and explain a folder tree of chest X-rays.

Mount with ``app.add_typer(batch_app, name="batch")``; then
``isnet-cxr batch run INPUT... --model CKPT --out DIR [--no-heatmaps] [--restart]``.

Exit codes: 0 done (unreadable, refused and flagged files are listed in ``errors.csv``, they
do not fail the run); 2 bad arguments; 3 the model checkpoint (or segmentation checkpoint)
does not exist; 4 the model has no usable ``model.json``; 5 no input files, or the output
folder holds results of another model or other settings (``--restart`` to redo it); 6 another
run is writing to the same output folder; 130 interrupted (Ctrl-C): what was written is kept,
the same command resumes.
"""

from __future__ import annotations

from pathlib import Path

import typer

EXIT_NO_MODEL = 3
EXIT_NO_CARD = 4
EXIT_BAD_INPUT = 5
EXIT_LOCKED = 6
EXIT_INTERRUPTED = 130

batch_app = typer.Typer(
    help="Batch runs over folders of DICOM files (resumable; errors listed, never fatal).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@batch_app.callback()
def _group() -> None:
    """Batch runs over folders of DICOM files (resumable; errors listed, never fatal)."""


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@batch_app.command("run")
def run_command(
    inputs: list[Path] = typer.Argument(
        ..., help="Folder(s) of DICOM files (searched recursively) or a manifest CSV."
    ),
    model: Path = typer.Option(..., help="Classifier checkpoint (model.json beside it)."),
    out: Path = typer.Option(..., help="Output folder (predictions.csv, errors.csv, ...)."),
    heatmaps: bool = typer.Option(True, help="LRP heatmap overlays + background share."),
    resume: bool = typer.Option(True, help="Skip files already in the output tables."),
    restart: bool = typer.Option(
        False, help="Delete the results in --out (any model or settings) and start again."
    ),
    masks: bool = typer.Option(True, help="Write lung masks as PNG under masks/."),
    dicom_seg: bool = typer.Option(
        False, help="Also write each lung mask as a DICOM SEG under dicom_seg/ (DICOM inputs)."
    ),
    seg_model: Path | None = typer.Option(
        None, help="Lung segmentation checkpoint (default: the committed synthetic U-Net)."
    ),
    batch_size: int = typer.Option(16, min=1, help="Files per chunk (saved after each)."),
    max_files: int | None = typer.Option(None, min=0, help="Stop after this many new files."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0."),
    progress: bool = typer.Option(True, help="Show a progress bar (files/s, ETA)."),
) -> None:
    """Predict every image: class probabilities, lung-mask quality, LRP overlay; then a summary."""
    try:
        _run(**locals())
    except KeyboardInterrupt:
        _fail(
            f"interrupted: the rows already in {out} are kept; run the same command again to "
            "resume",
            EXIT_INTERRUPTED,
        )


def _run(
    inputs: list[Path],
    model: Path,
    out: Path,
    heatmaps: bool,
    resume: bool,
    restart: bool,
    masks: bool,
    dicom_seg: bool,
    seg_model: Path | None,
    batch_size: int,
    max_files: int | None,
    device: str,
    progress: bool,
) -> None:
    """The body of ``batch run`` (see :func:`run_command`)."""
    from classification.model_card import ModelCardError
    from cxr_io.resources import default_segmenter
    from pipeline.batch import BatchInputError, BatchLockedError, run_batch

    if not model.is_file():
        _fail(
            f"model checkpoint not found: {model} (give the best_model.pt written by "
            "`isnet-cxr train`)",
            EXIT_NO_MODEL,
        )
    seg = seg_model or default_segmenter()
    if not Path(seg).is_file():
        _fail(f"segmentation checkpoint not found: {seg}", EXIT_NO_MODEL)
    try:
        summary = run_batch(
            inputs,
            model,
            out,
            seg_checkpoint=seg,
            batch_size=batch_size,
            heatmaps=heatmaps,
            resume=resume and not restart,
            progress=progress,
            masks=masks,
            dicom_seg=dicom_seg,
            max_files=max_files,
            device=device,
        )
    except ModelCardError as exc:
        _fail(str(exc), EXIT_NO_CARD)
    except FileNotFoundError as exc:
        _fail(str(exc), EXIT_NO_MODEL)
    except BatchInputError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except BatchLockedError as exc:
        _fail(str(exc), EXIT_LOCKED)

    s = summary
    typer.echo(
        f"{s.processed_now} file(s) processed now, {s.already_done} already done, "
        f"{s.files_found} found ({s.files_per_second:.2f} files/s)"
    )
    classes = ", ".join(f"{c}: {n}" for c, n in s.per_class.items())
    typer.echo(f"predictions: {s.predictions} ({classes}); lung mask flagged: {s.seg_flagged}")
    if s.non_chest:
        typer.echo(f"not chest by BodyPartExamined: {s.non_chest} (see body_part)")
    if s.errors:
        kinds = ", ".join(f"{k}: {n}" for k, n in s.errors_by_kind.items())
        typer.echo(f"not classified: {s.errors} ({kinds}); reasons in {s.errors_csv}")
    if s.refused_by_error:
        why = ", ".join(f"{k}: {n}" for k, n in s.refused_by_error.items())
        typer.echo(f"refused (not a chest radiograph or not usable): {why}")
    for note in s.notes:
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
    if not s.complete:
        typer.echo("stopped early (--max-files): run the same command again to continue")
    typer.echo(f"results: {s.predictions_csv}; overview: {s.index_html}")
