"""``isnet-cxr train``: train a classifier with any method from a manifest.

Mount with ``app.add_typer(train_app, name="train")``; then
``isnet-cxr train --manifest M --method isnet --backbone small_cnn --size 128 --epochs N
--out DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from classification.isnet_loss import ISNetLossConfig
from classification.methods import METHOD_NAMES
from classification.model_card import card_path
from classification.train import TrainConfig, load_splits, train

train_app = typer.Typer(
    help="Train a chest X-ray classifier (standard, isnet, segment_then_classify, rrr).",
    pretty_exceptions_enable=False,
)


@train_app.callback(invoke_without_command=True)
def train_command(
    manifest: Path = typer.Option(..., help="Manifest CSV (image,label,site[,mask,split,...])."),
    method: str = typer.Option("standard", help=f"One of: {', '.join(METHOD_NAMES)}."),
    variant: str = typer.Option(
        ISNetLossConfig.variant, help="ISNet heatmaps: stochastic|selective|original."
    ),
    params: str = typer.Option(
        "{}", help='Extra method parameters as JSON, e.g. \'{"P": 0.5, "warmup_epochs": 2}\'.'
    ),
    backbone: str = typer.Option("small_cnn", help="densenet121 | resnet18 | small_cnn."),
    size: int = typer.Option(128, help="Network input side in pixels."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(16, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    optimizer: str = typer.Option("adam", help="adam | sgd (momentum 0.99)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same weights)."),
    tune_constants: bool = typer.Option(
        True, help="ISNet: tune C1/C2 on a plain network first (unless given in --params)."
    ),
    tune_epochs: int = typer.Option(5, help="ISNet: epochs of the plain network for tuning."),
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help="Force the full light augmentation on / off (overrides --augment-policy).",
    ),
    augment_policy: str = typer.Option(
        "auto",
        help="auto (ISNet: intensity only, others: full) | none | intensity | geometric | full; "
        "each may end in +gamma (a random contrast gamma in [0.5, 2] as well).",
    ),
    select: str = typer.Option(
        "auto",
        help="Model selection: auto (ISNet: val_loss, others: val_acc) | val_acc | val_auroc | "
        "val_loss | last.",
    ),
    out: Path = typer.Option(
        ..., help="Output folder (best_model.pt + model.json, checkpoints, ...)."
    ),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
) -> None:
    """Train a classifier; prints one line per epoch and where the best model is."""

    def fail(message: str) -> None:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)

    key = method.lower().replace("-", "_")
    if key not in METHOD_NAMES:
        fail(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)}")
    try:
        method_params = json.loads(params)
    except json.JSONDecodeError as e:
        fail(f"--params is not valid JSON ({e}): {params!r}")
    if not isinstance(method_params, dict):
        fail(f"--params must be a JSON object, got {params!r}")
    if key == "isnet":
        method_params.setdefault("variant", variant)
    try:
        splits = load_splits(manifest, seed=seed)
    except (OSError, ValueError) as e:  # ManifestError is a ValueError
        fail(str(e))
    cfg = TrainConfig(
        method=key,
        method_params=method_params,
        backbone=backbone,
        size=size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        tune_constants=tune_constants,
        tune_epochs=tune_epochs,
        augment=augment_policy if augment is None else augment,
        select=select,
    )
    typer.echo(
        f"training {key} ({backbone}, {size}px) on {len(splits['train'])} images, validating on "
        f"{len(splits['val'])}; classes: {', '.join(splits['classes'])}"
    )
    try:
        result = train(
            splits["train"],
            splits["val"],
            cfg,
            out,
            num_classes=len(splits["classes"]),
            classes=splits["classes"],
            resume=resume,
            progress=typer.echo,
        )
    except ValueError as e:
        fail(str(e))
    card = card_path(result.best_model)
    if result.constants is not None:
        typer.echo(f"ISNet constants: C1={result.constants[0]:.4g} C2={result.constants[1]:.4g}")
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    typer.echo(
        f"best {result.select} {best} (epoch {result.best_epoch}); model: {result.best_model} "
        f"(card: {card.name})"
    )
