"""Training in MONAI engines: checkpoints, resume, determinism, ISNet constant tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from classification.data import AugmentConfig, build_dataset, build_loader
from classification.models import build_backbone
from classification.train import (
    TrainConfig,
    latest_checkpoint,
    load_splits,
    train,
    tune_isnet_constants,
)

SIZE = 32


def make_tiny_manifest(out: Path, n: int = 12, seed: int = 0) -> Path:
    """A real synthetic set (DICOM + PNG masks + manifest), one biased site, 32 px."""
    from synthetic import default_sites, make_dataset

    return make_dataset(
        out, default_sites()[:1], n_per_site=n, size=SIZE, seed=seed, workers=1, progress=False
    )


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    manifest = make_tiny_manifest(tmp_path_factory.mktemp("tiny_cxr"))
    return load_splits(manifest)


def _cfg(**kw) -> TrainConfig:
    base = dict(method="standard", backbone="small_cnn", size=SIZE, epochs=1, batch_size=4, seed=3)
    base.update(kw)
    return TrainConfig(**base)


class _Spy:
    """Trainer handler that records the engine, the epochs started and the weights at start."""

    def __init__(self) -> None:
        self.engine = None
        self.epochs: list[int] = []
        self.start_weights: dict[str, torch.Tensor] | None = None

    def attach(self, engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch)

    def _epoch(self, engine) -> None:
        if self.start_weights is None:
            sd = engine.network.state_dict()
            self.start_weights = {k: v.clone() for k, v in sd.items()}
        self.epochs.append(engine.state.epoch)


class _StopAfterFirstEpoch:
    """Simulates an interruption: terminates the trainer after epoch 1 (after checkpointing)."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_splits_and_dataset(splits) -> None:
    assert splits["classes"] == ["covid", "normal", "pneumonia"]
    assert splits["train"] and splits["val"]
    assert {"image", "label", "mask"} <= set(splits["train"][0])
    ds = build_dataset(splits["train"], SIZE, need_masks=True, augment=AugmentConfig())
    loader = build_loader(ds, 4, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, SIZE, SIZE)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert "patient_id" not in batch  # no identifiers travel with batches
    no_mask = [{k: v for k, v in r.items() if k != "mask"} for r in splits["train"]]
    with pytest.raises(ValueError, match="no lung mask"):
        build_dataset(no_mask, SIZE, need_masks=True)


def test_trainer_runs_saves_state_dict_and_validates(splits, tmp_path) -> None:
    spy = _Spy()
    lines: list[str] = []
    res = train(
        splits["train"],
        splits["val"],
        _cfg(epochs=2),
        tmp_path,
        num_classes=3,
        extra_handlers=[spy],
        progress=lines.append,
    )
    assert isinstance(spy.engine, SupervisedTrainer)
    assert spy.engine.state.iteration == 2 * len(spy.engine.data_loader)
    assert res.epochs_done == 2 and len(res.history) == 2 and len(lines) == 2
    assert "val_acc" in res.history[-1] and "train_ce" in res.history[-1]
    assert 0.0 <= res.best_metric <= 1.0
    state = torch.load(res.best_model, weights_only=True)
    model = build_backbone("small_cnn", 3, dropout=0.5)
    model.load_state_dict(state)
    info = json.loads((tmp_path / "best_metric.json").read_text())
    assert info["metric"] == "val_acc" and info["value"] == res.best_metric
    assert latest_checkpoint(tmp_path / "checkpoints").name == "resume_checkpoint_epoch=2.pt"


def test_resume_after_interruption(splits, tmp_path) -> None:
    out = tmp_path / "run"
    first = _Spy()
    r1 = train(
        splits["train"],
        splits["val"],
        _cfg(epochs=2),
        out,
        num_classes=3,
        extra_handlers=[first, _StopAfterFirstEpoch()],
    )
    assert r1.epochs_done == 1 and first.epochs == [1]
    interrupted = torch.load(out / "last_model.pt", weights_only=True)
    iters_per_epoch = len(first.engine.data_loader)

    second = _Spy()
    r2 = train(
        splits["train"],
        splits["val"],
        _cfg(epochs=2),
        out,
        num_classes=3,
        resume=True,
        extra_handlers=[second],
    )
    assert second.epochs == [2]  # the epoch counter continues
    assert r2.epochs_done == 2
    assert second.engine.state.iteration == 2 * iters_per_epoch
    # it started from the interrupted run's weights, not from a fresh initialisation
    assert _same(second.start_weights, interrupted)
    assert not _same(first.start_weights, interrupted)
    final = torch.load(out / "last_model.pt", weights_only=True)
    assert not _same(final, interrupted)


def test_deterministic_with_seed(splits, tmp_path) -> None:
    runs = []
    for i in range(2):
        res = train(splits["train"], [], _cfg(epochs=1, seed=11), tmp_path / f"r{i}", num_classes=3)
        runs.append(torch.load(res.last_model, weights_only=True))
    assert _same(runs[0], runs[1])
    other = train(splits["train"], [], _cfg(epochs=1, seed=12), tmp_path / "r2", num_classes=3)
    assert not _same(runs[0], torch.load(other.last_model, weights_only=True))


def test_isnet_trains_with_tuned_constants(splits, tmp_path) -> None:
    cfg = _cfg(method="isnet", method_params={"variant": "selective"}, tune_epochs=1)
    spy = _Spy()
    res = train(splits["train"], splits["val"], cfg, tmp_path, num_classes=3, extra_handlers=[spy])
    assert isinstance(spy.engine, SupervisedTrainer)
    stored = json.loads((tmp_path / "isnet_constants.json").read_text())
    assert res.constants == (stored["C1"], stored["C2"])
    C1, C2 = res.constants
    assert 0 < C1 <= C2
    assert {"train_ce", "train_heatmap"} <= set(res.history[0])


def test_tune_isnet_constants_uses_trained_network(splits) -> None:
    ds = build_dataset(splits["train"], SIZE, need_masks=False)
    loader = build_loader(ds, 4, shuffle=False)
    torch.manual_seed(0)
    C1, C2 = tune_isnet_constants(
        lambda: build_backbone("small_cnn", 3), loader, epochs=1, variant="selective"
    )
    assert 0 < C1 <= C2


def test_evaluator_sees_method_inputs(splits) -> None:
    from classification.methods import SegmentThenClassify, Standard
    from classification.train import MethodPrepareBatch

    ds = build_dataset(splits["val"], SIZE, need_masks=True)
    batch = next(iter(build_loader(ds, 2, shuffle=False)))
    x, y = MethodPrepareBatch(SegmentThenClassify())(batch, "cpu")
    assert torch.equal(x, batch["image"] * batch["mask"])
    assert torch.equal(y, batch["label"])
    x_std, _ = MethodPrepareBatch(Standard())(batch, "cpu")
    assert torch.equal(x_std, batch["image"])
    assert not torch.equal(x, x_std)


@pytest.mark.parametrize("method", ["rrr", "background_swap"])
def test_cli_train(tmp_path, method: str) -> None:
    from typer.testing import CliRunner

    from classification.cli import train_app
    from classification.model_card import load_model

    manifest = make_tiny_manifest(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--method", method, "--size", str(SIZE)]
    args += ["--epochs", "1", "--batch-size", "4", "--out", str(out)]
    res = CliRunner().invoke(train_app, args)
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.output and "best val_acc" in res.output
    _, card = load_model(out / "best_model.pt")
    assert card.method == method  # the card names the method, so every door rebuilds it
    bad = CliRunner().invoke(train_app, [*args[:2], "--method", "gradcam", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown method" in bad.output


# --------------------------------------------------------------------------- round 6: tuning on
# plain images, augmentation policy, model selection by the validation ISNet loss


def test_isnet_constants_are_tuned_on_unaugmented_images(splits, tmp_path) -> None:
    """C1/C2 must not depend on the training augmentation: the tuning network sees the
    deterministic transform (augmented images give other relevance totals)."""
    constants = []
    for aug in (True, False):  # full augmentation vs none
        cfg = _cfg(
            method="isnet",
            method_params={"variant": "selective"},
            tune_epochs=1,
            epochs=1,
            augment=aug,
        )
        res = train(splits["train"], [], cfg, tmp_path / f"aug_{aug}", num_classes=3)
        constants.append(res.constants)
        saved = json.loads((tmp_path / f"aug_{aug}" / "train_config.json").read_text())
        assert saved["augment_policy"] == ("full" if aug else "none")
    assert constants[0] == constants[1]


def test_augment_policy_resolution() -> None:
    from classification.train import ISNET_AUGMENT, resolve_augment

    assert resolve_augment(_cfg(method="isnet")) == ISNET_AUGMENT  # "auto"
    assert resolve_augment(_cfg(method="standard")) == "full"
    assert resolve_augment(_cfg(method="isnet", augment=True)) == "full"
    assert resolve_augment(_cfg(method="standard", augment=False)) == "none"
    assert resolve_augment(_cfg(method="standard", augment="intensity")) == "intensity"
    assert resolve_augment(_cfg(method="isnet", augment="Intensity+Gamma")) == "intensity+gamma"
    with pytest.raises(ValueError, match="unknown augment"):
        resolve_augment(_cfg(augment="heavy"))
    with pytest.raises(ValueError, match="unknown augment"):
        resolve_augment(_cfg(augment="heavy+gamma"))


def test_augment_policies_build_the_named_transforms() -> None:
    from monai.transforms import RandAdjustContrastd, RandAffined, RandScaleIntensityd

    from classification.data import build_transforms

    def kinds(policy: str) -> set[type]:
        aug = AugmentConfig.from_policy(policy)
        return {type(t) for t in build_transforms(SIZE, with_mask=True, augment=aug).transforms}

    assert AugmentConfig.from_policy("none") is None
    assert RandAffined not in kinds("intensity") and RandScaleIntensityd in kinds("intensity")
    assert RandAffined in kinds("geometric") and RandScaleIntensityd not in kinds("geometric")
    assert {RandAffined, RandScaleIntensityd} <= kinds("full")
    assert RandAdjustContrastd not in kinds("full") | kinds("intensity")
    assert kinds("intensity+gamma") == kinds("intensity") | {RandAdjustContrastd}
    assert kinds("full+gamma") == kinds("full") | {RandAdjustContrastd}
    assert kinds("none+gamma") == kinds("none") | {RandAdjustContrastd}
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        AugmentConfig.from_policy("strong")


def test_gamma_augmentation_bends_the_intensity_curve_and_leaves_the_mask() -> None:
    """``+gamma``: each augmented image is a power of the plain one on its own [min, max]
    range (not a scale or shift: the curve bends), with exponents on both sides of 1 within
    [0.5, 2]; the mask is untouched."""
    from monai.utils import set_determinism

    from classification.data import build_transforms

    ramp = torch.linspace(0.0, 1.0, SIZE * SIZE).reshape(1, SIZE, SIZE)
    mask = (torch.arange(SIZE * SIZE).reshape(1, SIZE, SIZE) % 3 == 0).float()
    aug = AugmentConfig.from_policy("none+gamma")
    chain = build_transforms(SIZE, with_mask=True, augment=aug).transforms
    gamma_step = [t for t in chain if type(t).__name__ == "RandAdjustContrastd"]
    assert len(gamma_step) == 1
    set_determinism(seed=0)
    exponents = []
    for _ in range(40):
        out = gamma_step[0]({"image": ramp.clone(), "mask": mask.clone()})
        assert torch.equal(out["mask"], mask)
        x, y = ramp.flatten()[1:-1], torch.as_tensor(out["image"]).flatten()[1:-1]
        g = (torch.log(y) / torch.log(x)).median().item()
        assert torch.allclose(y, x**g, atol=1e-4)  # a power curve of the plain image
        exponents.append(g)
    set_determinism(seed=None)
    bent = [g for g in exponents if abs(g - 1) > 1e-3]
    assert min(exponents) >= 0.5 - 1e-3 and max(exponents) <= 2 + 1e-3
    assert min(bent) < 0.9 and max(bent) > 1.1 and 20 <= len(bent) < 40  # prob 0.8


def test_plain_tensor_transforms_give_the_same_samples_and_restore_the_setting(splits) -> None:
    """``plain_tensors`` (MONAI without MetaTensor bookkeeping, as ``train`` runs its data) is a
    speed-up only: the augmented image / mask samples are bit for bit those of the default."""
    from monai.data import get_track_meta

    from classification.data import plain_tensors

    def samples() -> list[dict]:
        ds = build_dataset(splits["train"], SIZE, need_masks=True, augment=AugmentConfig())
        ds.transform.set_random_state(5)
        return [ds[i] for i in range(len(ds)) for _ in range(3)]

    default = samples()
    assert get_track_meta()
    with plain_tensors():
        assert not get_track_meta()
        plain = samples()
    assert get_track_meta()
    for a, b in zip(default, plain, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    with pytest.raises(RuntimeError), plain_tensors():
        raise RuntimeError("stop")
    assert get_track_meta()


def test_mask_resize_keeps_a_finding_at_the_lung_border_inside() -> None:
    from classification.inputs import resize_image, resize_mask

    # 16 px film, lung in columns 1-6; a finding in columns 1-2 (inside the lung); 4 px input
    lung = np.zeros((16, 16), dtype=bool)
    lung[:, 1:7] = True
    finding = np.zeros((16, 16), dtype=np.float32)
    finding[4:12, 1:3] = 0.3
    small = resize_image(torch.from_numpy(finding)[None], 4)[0]
    near = torch.nn.functional.interpolate(
        torch.from_numpy(lung.astype(np.float32))[None, None], size=(4, 4), mode="nearest"
    )[0, 0]
    assert float((small * near).sum()) == 0.0  # nearest neighbour dropped the whole finding
    mask = resize_mask(lung, 4)
    assert mask.shape == (1, 4, 4) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert float((small * mask[0]).sum()) == pytest.approx(float(small.sum()))
    assert mask[0, :, 2:].sum() == 0  # pure background stays background
    torch.testing.assert_close(resize_mask(lung[None], 4), mask)  # [1, H, W] accepted


def test_training_and_inference_resize_masks_alike(splits) -> None:
    from classification.data import build_transforms
    from classification.inputs import resize_mask
    from cxr_io.readers import LoadMask

    record = next(r for r in splits["train"] if r.get("mask"))
    out = build_transforms(SIZE // 2, with_mask=True)(dict(record))
    expected = resize_mask(LoadMask()(record["mask"]), SIZE // 2)
    torch.testing.assert_close(torch.as_tensor(out["mask"]), expected)
    assert expected.sum() > 0


def test_isnet_checkpoint_is_selected_by_validation_isnet_loss(splits, tmp_path) -> None:
    cfg = _cfg(
        method="isnet",
        method_params={"variant": "stochastic", "P": 0.7},
        tune_epochs=1,
        epochs=3,
        augment="none",
        lr=3e-3,
    )
    res = train(splits["train"], splits["val"], cfg, tmp_path, num_classes=3)
    assert res.select == "val_loss"
    losses = [row["val_loss"] for row in res.history]
    assert all(
        {"val_ce", "val_heatmap", "val_bg", "val_fg", "val_acc"} <= set(r) for r in res.history
    )
    info = json.loads((tmp_path / "best_metric.json").read_text())
    best = min(range(len(losses)), key=losses.__getitem__)
    assert info == {"metric": "val_loss", "value": losses[best], "epoch": best + 1, "mode": "min"}
    assert res.best_epoch == best + 1 and res.best_metric == losses[best]
    # the criterion is the ISNet objective: (1 - P) CE + P L_H with the full P
    for row in res.history:
        assert row["val_loss"] == pytest.approx(0.3 * row["val_ce"] + 0.7 * row["val_heatmap"])


def test_validation_loss_is_the_isnet_objective_on_the_validation_set(splits) -> None:
    """ValidationLoss = isnet_losses over the validation batches (eval mode, full P, the
    re-seeded stochastic selector), averaged per image."""
    from classification.isnet_loss import ISNetLossConfig, isnet_losses, make_selector
    from classification.methods import ISNet
    from classification.train import ValidationLoss

    ds = build_dataset(splits["val"], SIZE, need_masks=True)
    loader = build_loader(ds, 3, shuffle=False)
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 3)
    cfg = ISNetLossConfig(variant="stochastic", C1=0.5, C2=5.0)
    method = ISNet(cfg, torch.Generator().manual_seed(123), warmup_epochs=4)  # P ramps in training
    got = ValidationLoss(method, loader, "cpu").compute(model)
    assert model.training  # restored
    model.eval()
    selector = make_selector("stochastic", torch.Generator().manual_seed(0))
    total, n = 0.0, 0
    for batch in loader:
        out = isnet_losses(model, batch["image"], batch["label"], batch["mask"], cfg, selector)
        total += float(out.total) * len(batch["label"])
        n += len(batch["label"])
    assert got["val_loss"] == pytest.approx(total / n, rel=1e-5)
    # the same on a second call: epochs are compared on the same random selector draws
    assert ValidationLoss(method, loader, "cpu").compute(model)["val_loss"] == pytest.approx(
        got["val_loss"], rel=1e-6
    )


def test_standard_selects_by_accuracy_and_last_keeps_the_last_epoch(splits, tmp_path) -> None:
    res = train(splits["train"], splits["val"], _cfg(epochs=1), tmp_path / "std", num_classes=3)
    assert res.select == "val_acc"
    assert "val_loss" in res.history[0]  # logged for every method
    last = train(
        splits["train"],
        splits["val"],
        _cfg(epochs=2, select="last"),
        tmp_path / "last",
        num_classes=3,
    )
    assert last.select == "last" and last.best_epoch == 2 and last.best_metric is None
    assert not (tmp_path / "last" / "best_metric.json").exists()
    assert _same(
        torch.load(last.best_model, weights_only=True),
        torch.load(last.last_model, weights_only=True),
    )
    with pytest.raises(ValueError, match="unknown select"):
        train(splits["train"], [], _cfg(select="val_f1"), tmp_path / "bad", num_classes=3)


def test_best_saver_min_mode_keeps_the_lowest(tmp_path) -> None:
    from types import SimpleNamespace

    from classification.train import BestStateDictSaver

    model = torch.nn.Linear(2, 2)
    saver = BestStateDictSaver(model, tmp_path, "val_loss", mode="min")
    for epoch, value in enumerate([0.9, 0.5, 0.7], start=1):
        saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_loss": value}, epoch=epoch)))
    assert (saver.best, saver.best_epoch) == (0.5, 2)
    with pytest.raises(ValueError, match="mode"):
        BestStateDictSaver(model, tmp_path, mode="lowest")


class _StopAfterEpoch:
    """Simulates an interruption after epoch ``n`` (after its checkpoint is written)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.n), lambda e: e.terminate())


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="standard", augment="full"),  # shuffling, affine + intensity, dropout
        dict(method="isnet", method_params={"variant": "stochastic"}, tune_epochs=1),  # selector
        dict(method="standard", lr_schedule="cosine"),  # the schedule's state is checkpointed
    ],
    ids=["standard-full-augment", "isnet-stochastic", "cosine-schedule"],
)
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(splits, tmp_path, kw) -> None:
    cfg = _cfg(epochs=3, **kw)
    whole = train(splits["train"], splits["val"], cfg, tmp_path / "whole", num_classes=3)
    out = tmp_path / "cut"
    cut = train(
        splits["train"],
        splits["val"],
        cfg,
        out,
        num_classes=3,
        extra_handlers=[_StopAfterEpoch(2)],
    )
    assert cut.epochs_done == 2
    # a fresh process would start from other global random states: scramble them
    torch.manual_seed(12345)
    resumed = train(splits["train"], splits["val"], cfg, out, num_classes=3, resume=True)
    assert resumed.epochs_done == 3
    for name in ("last_model.pt", "best_model.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert _same(a, b), name
    assert whole.history[-1] == {**resumed.history[-1], "seconds": whole.history[-1]["seconds"]}


class _LrSpy:
    """Trainer handler: the optimizer's learning rate at the start of each epoch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda e: self.lrs.append(e.optimizer.param_groups[0]["lr"])
        )


def test_cosine_schedule_anneals_the_learning_rate_per_epoch(splits, tmp_path) -> None:
    spy = _LrSpy()
    cfg = _cfg(epochs=4, lr=0.01, lr_schedule="cosine")
    train(splits["train"], [], cfg, tmp_path, num_classes=3, extra_handlers=[spy])
    want = [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert spy.lrs == pytest.approx(want)
    const, plain = _LrSpy(), _cfg(epochs=2, lr=0.01)
    train(splits["train"], [], plain, tmp_path / "c", num_classes=3, extra_handlers=[const])
    assert const.lrs == [0.01, 0.01]
    with pytest.raises(ValueError, match="lr_schedule"):
        train(splits["train"], [], _cfg(lr_schedule="step"), tmp_path / "x", num_classes=3)


def test_torch_threads_sets_and_restores() -> None:
    from cxr_io.determinism import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_init_from_starts_from_the_given_weights(splits, tmp_path) -> None:
    first = train(splits["train"], [], _cfg(epochs=1), tmp_path / "a", num_classes=3)
    start = torch.load(first.last_model, weights_only=True)
    spy = _Spy()
    cfg = _cfg(epochs=1, seed=4, init_from=str(first.last_model))
    train(splits["train"], [], cfg, tmp_path / "b", num_classes=3, extra_handlers=[spy])
    assert _same(spy.start_weights, start)
    fresh = _Spy()
    train(
        splits["train"],
        [],
        _cfg(epochs=1, seed=4),
        tmp_path / "c",
        num_classes=3,
        extra_handlers=[fresh],
    )
    assert not _same(fresh.start_weights, start)


def test_init_from_a_missing_file_is_refused_by_name(splits, tmp_path) -> None:
    missing = tmp_path / "no_such_run" / "best_model.pt"
    with pytest.raises(FileNotFoundError, match=r"init_from: .*no_such_run.*best_model\.pt"):
        train(splits["train"], [], _cfg(init_from=str(missing)), tmp_path / "r", num_classes=3)


def test_a_checkpoint_write_cut_short_is_ignored_and_cleared(splits, tmp_path) -> None:
    """A kill while saving leaves only a hidden temporary file (checkpoints are renamed into
    place): the resume ignores it, the next run removes it, one checkpoint stays."""
    out = tmp_path / "run"
    train(splits["train"], [], _cfg(epochs=1), out, num_classes=3)
    stale = out / "checkpoints" / ".resume_checkpoint_epoch=2.pt.tmp"
    stale.write_bytes(b"truncated")
    assert latest_checkpoint(out / "checkpoints").name == "resume_checkpoint_epoch=1.pt"
    res = train(splits["train"], [], _cfg(epochs=2), out, num_classes=3, resume=True)
    assert res.epochs_done == 2 and not stale.exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["resume_checkpoint_epoch=2.pt"]


def test_isnet_distils_from_a_teacher_that_train_loads(splits, tmp_path) -> None:
    """``teacher`` in the ISNet's parameters: train() loads it and the epoch history carries the
    distillation term."""
    teacher = train(
        splits["train"], [], _cfg(method="segment_then_classify"), tmp_path / "t", num_classes=3
    )
    params = {"variant": "selective", "C1": 1.0, "C2": 20.0, "teacher": str(teacher.last_model)}
    res = train(
        splits["train"],
        [],
        _cfg(method="isnet", method_params=params),
        tmp_path / "s",
        num_classes=3,
    )
    assert res.history[-1]["train_kd"] > 0
