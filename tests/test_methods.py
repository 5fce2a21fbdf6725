"""Training objectives: losses are finite and trainable; each method's defining property holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from classification.isnet_loss import ISNetLossConfig
from classification.lrp import lrp_heatmaps
from classification.methods import (
    RRR,
    BackgroundSwap,
    ISNet,
    Method,
    SegmentThenClassify,
    Standard,
    build_method,
)
from classification.models import build_backbone

N_CLASSES = 3
SIZE = 32


def _batch(seed: int = 0, b: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiny seeded batch: images [b,1,32,32] in [0,1], labels [b], masks [b,1,32,32] (two 'lungs');
    class k has a bright blob inside the lungs and a marker in the top-left corner."""
    g = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.rand(b, 1, SIZE, SIZE, generator=g)
    masks = torch.zeros(b, 1, SIZE, SIZE)
    masks[:, :, 8:28, 4:14] = 1
    masks[:, :, 8:28, 18:28] = 1
    labels = torch.arange(b) % N_CLASSES
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 10 + 5 * k : 14 + 5 * k, 6:12] += 0.6
        images[i, 0, 0:3, 3 * k : 3 * k + 3] = 1.0
    return images.clamp(0, 1), labels, masks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("small_cnn", N_CLASSES, in_channels=1, dropout=0.0)


METHODS = {
    "standard": lambda: Standard(),
    "segment_then_classify": lambda: SegmentThenClassify(),
    "rrr": lambda: RRR(lam=1.0),
    "background_swap": lambda: BackgroundSwap(),
    "isnet_selective": lambda: ISNet(ISNetLossConfig(variant="selective")),
    "isnet_original": lambda: ISNet(ISNetLossConfig(variant="original")),
    "isnet_stochastic": lambda: ISNet(
        ISNetLossConfig(variant="stochastic"), torch.Generator().manual_seed(0)
    ),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_finite_and_decreases(name: str) -> None:
    method: Method = METHODS[name]()
    assert isinstance(method, Method)
    model = _model()
    images, labels, masks = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = method.loss(model, images, labels, masks)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.logits.shape == (images.shape[0], N_CLASSES)
        assert all(isinstance(v, float) for v in out.parts.values())
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0], losses


def test_isnet_loss_combines_ce_and_heatmap_with_P() -> None:
    method = ISNet(ISNetLossConfig(variant="selective", P=0.7))
    images, labels, masks = _batch()
    out = method.loss(_model(), images, labels, masks)
    expected = 0.3 * out.parts["ce"] + 0.7 * out.parts["heatmap"]
    assert out.parts["heatmap"] > 0
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_isnet_warmup_ramps_P() -> None:
    method = build_method("isnet", P=0.6, warmup_epochs=3)
    values = []
    for epoch in (1, 2, 3, 4, 9):
        method.set_epoch(epoch)
        values.append(method.current_P)
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6])
    images, labels, masks = _batch()
    method.set_epoch(1)
    out = method.loss(_model(), images, labels, masks)
    assert float(out.loss) == pytest.approx(out.parts["ce"], rel=1e-6)


@pytest.mark.parametrize(("variant", "k"), [("selective", 1), ("stochastic", 1), ("original", 3)])
def test_isnet_variants_heatmap_count(variant: str, k: int) -> None:
    method = build_method("isnet", variant=variant, seed=0)
    images, _, _ = _batch()
    logits, R = lrp_heatmaps(_model(), images, method.selector, eps=0.01)
    assert logits.shape == (images.shape[0], N_CLASSES)
    assert R.shape == (images.shape[0], k, 1, SIZE, SIZE)


def test_segment_then_classify_ignores_background() -> None:
    method = SegmentThenClassify()
    model = _model().eval()
    images, labels, masks = _batch()
    changed = images.clone()
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(5))
    changed = torch.where(masks.bool(), images, noise)
    assert not torch.equal(changed, images)
    with torch.no_grad():
        a = model(method.prepare_inputs(images, masks))
        b = model(method.prepare_inputs(changed, masks))
        plain_a, plain_b = model(images), model(changed)
    assert torch.equal(a, b)
    assert not torch.allclose(plain_a, plain_b)  # the plain model would see the change
    # the same holds for the training loss
    la = method.loss(model, images, labels, masks).loss
    lb = method.loss(model, changed, labels, masks).loss
    assert float(la) == float(lb)


def test_background_swap_keeps_the_lungs_and_takes_the_previous_background() -> None:
    images, labels, masks = _batch()
    masks[1::2] = torch.roll(masks[1::2], 2, dims=-1)  # lungs differ between neighbours
    swapped = BackgroundSwap.swap(images, masks)
    prev = torch.roll(images, 1, 0)
    prev_lungs = torch.roll(masks, 1, 0).bool().expand_as(images)
    lungs = masks.bool().expand_as(images)
    assert torch.equal(swapped[lungs], images[lungs])  # own lungs (and own label)
    # where the previous sample has lungs and this one none, this sample's own pixels: no other
    # patient's lung shows around the mask
    only_prev = prev_lungs & ~lungs
    assert only_prev.any() and torch.equal(swapped[only_prev], images[only_prev])
    rest = ~(lungs | prev_lungs)
    assert torch.equal(swapped[rest], prev[rest])  # the previous sample's background
    # so sample i shows the marker of sample i-1, which has another class here
    assert not torch.equal(swapped[:, :, 0:3], images[:, :, 0:3])
    method = build_method("background_swap")
    assert isinstance(method, BackgroundSwap) and method.masks_at_inference is False
    assert torch.equal(method.prepare_inputs(images, masks), images)  # inference: plain image
    model = _model().eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(swapped), labels)
    assert float(method.loss(model, images, labels, masks).loss) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="needs lung masks"):
        method.loss(model, images, labels, None)


class _MaskedNet(nn.Module):
    """A net that multiplies its input by a fixed mask: zero input gradient outside it."""

    def __init__(self, net: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask)


def test_rrr_penalty_zero_iff_no_background_gradient() -> None:
    images, labels, masks = _batch()
    rrr = RRR(lam=1.0)
    blind = _MaskedNet(_model(), masks)
    pen_blind, _ = rrr.penalty(blind, images, masks)
    assert float(pen_blind) == 0.0
    pen_plain, _ = rrr.penalty(_model(), images, masks)
    assert float(pen_plain) > 0.0
    # the penalty is differentiable w.r.t. the weights (create_graph=True)
    model = _model()
    pen, _ = rrr.penalty(model, images, masks)
    grads = torch.autograd.grad(pen, [p for p in model.parameters() if p.requires_grad])
    assert any(float(g.abs().sum()) > 0 for g in grads)
    # and it is exactly the squared input gradient of sum log-softmax over the background
    x = images.clone().requires_grad_(True)
    logp = torch.log_softmax(model(x), dim=1).sum()
    (gx,) = torch.autograd.grad(logp, x)
    expected = ((gx * (1 - masks)) ** 2).flatten(1).sum(1).mean()
    assert float(pen) == pytest.approx(float(expected), rel=1e-5)
    out = rrr.loss(model, images, labels, masks)
    assert float(out.loss) == pytest.approx(out.parts["ce"] + out.parts["rrr"], rel=1e-5)


def test_build_method_names_and_errors() -> None:
    assert isinstance(build_method("standard"), Standard)
    assert isinstance(build_method("segment-then-classify"), SegmentThenClassify)
    assert build_method("rrr", lam=3.0).lam == 3.0
    isnet = build_method("isnet", variant="original", P=0.5, C1=2.0)
    assert isinstance(isnet, ISNet) and isnet.cfg.P == 0.5 and isnet.cfg.C1 == 2.0
    with pytest.raises(ValueError, match="unknown method"):
        build_method("gradcam")
    with pytest.raises(ValueError, match="unknown parameter"):
        build_method("isnet", Q=1)
    with pytest.raises(ValueError, match="takes no parameters"):
        build_method("standard", lam=1)
    images, labels, _ = _batch()
    with pytest.raises(ValueError, match="needs lung masks"):
        RRR().loss(_model(), images, labels, None)


def test_isnet_input_bounds_none_gives_zero_pixels_no_relevance() -> None:
    """With ``input_bounds=None`` (epsilon rule down to the input) a background of zero pixels gets
    no relevance, so the background term vanishes; the z^B rule (default) puts relevance there."""
    images, labels, masks = _batch()
    images = images * masks  # background pixels exactly 0
    model = _model().eval()
    eps_rule = build_method("isnet", variant="selective", B=0.0, input_bounds=None)
    zb_rule = build_method("isnet", variant="selective", B=0.0)
    assert eps_rule.cfg.input_bounds is None and zb_rule.cfg.input_bounds == (0.0, 1.0)
    assert build_method("isnet", input_bounds=[0, 1]).cfg.input_bounds == (0.0, 1.0)  # JSON list
    out_eps = eps_rule.loss(model, images, labels, masks)
    out_zb = zb_rule.loss(model, images, labels, masks)
    assert out_eps.parts["heatmap"] == pytest.approx(0.0, abs=1e-7)
    assert out_zb.parts["heatmap"] > 1e-3
    assert out_eps.parts["ce"] == pytest.approx(out_zb.parts["ce"], rel=1e-6)


def test_isnet_heatmap_layer_matches_isnet_losses() -> None:
    """``heatmap_layer`` puts the loss on channel-summed hidden-layer relevance (pooled mask): the
    method's heatmap loss equals ``isnet_losses``'s and differs from the input-level loss."""
    from classification.isnet_loss import isnet_losses

    images, labels, masks = _batch()
    model = _model().eval()
    method = build_method("isnet", variant="selective", heatmap_layer="features.pool1")
    out = method.loss(model, images, labels, masks)
    ref = isnet_losses(model, images, labels, masks, method.cfg)
    assert ref.R.shape == (images.shape[0], 1, 1, SIZE // 4, SIZE // 4)
    assert out.parts["heatmap"] == pytest.approx(float(ref.lh.detach()), rel=1e-5)
    at_input = build_method("isnet", variant="selective").loss(model, images, labels, masks)
    assert abs(out.parts["heatmap"] - at_input.parts["heatmap"]) > 1e-4
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(KeyError, match="no module named"):
        build_method("isnet", heatmap_layer="nope").loss(model, images, labels, masks)


def test_isnet_method_step_is_isnet_losses(monkeypatch) -> None:
    """One ISNet step in the code base: ``ISNet.loss`` goes through ``isnet_losses`` (what the
    step benchmark times), with the warm-up P passed through; same loss, same gradients."""
    import classification.methods as methods_mod
    from classification.isnet_loss import isnet_losses, make_selector

    calls: list[float | None] = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("P"))
        return isnet_losses(*args, **kwargs)

    monkeypatch.setattr(methods_mod, "isnet_losses", counting)
    images, labels, masks = _batch()
    cfg = ISNetLossConfig(variant="stochastic", C1=0.5, C2=5.0)
    method = ISNet(cfg, torch.Generator().manual_seed(7), warmup_epochs=2)
    method.set_epoch(2)  # P = 0.7 * 1/2
    model = _model()
    out = method.loss(model, images, labels, masks)
    assert calls == [pytest.approx(0.35)]
    ref_model = _model()
    ref = isnet_losses(
        ref_model,
        images,
        labels,
        masks,
        cfg,
        make_selector("stochastic", torch.Generator().manual_seed(7)),
        P=0.35,
    )
    assert float(out.loss) == pytest.approx(float(ref.total), rel=1e-6)
    assert out.parts["heatmap"] == pytest.approx(
        cfg.A * out.parts["bg"] + cfg.B * out.parts["fg"], rel=1e-5
    )
    out.loss.backward()
    ref.total.backward()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_isnet_for_validation_uses_full_P_and_no_second_order_graph() -> None:
    images, labels, masks = _batch()
    method = ISNet(ISNetLossConfig(variant="stochastic"), warmup_epochs=5)
    assert method.current_P == 0.0  # epoch 1 of the warm-up
    val = method.for_validation()
    assert val.current_P == method.cfg.P and val.create_graph is False
    out = val.loss(_model().eval(), images, labels, masks)
    assert out.parts["P"] == method.cfg.P


def test_isnet_lung_only_prob_masks_training_images_only() -> None:
    images, labels, masks = _batch()
    method = build_method("isnet", variant="selective", lung_only_prob=1.0)
    masked = method.lung_only(images, masks)
    torch.testing.assert_close(masked, images * masks)
    assert torch.equal(build_method("isnet", lung_only_prob=0.0).lung_only(images, masks), images)
    torch.manual_seed(0)
    half = build_method("isnet", lung_only_prob=0.5).lung_only(images, masks)
    is_masked = [torch.equal(half[i], images[i] * masks[i]) for i in range(len(images))]
    assert 0 < sum(is_masked) < len(images)  # seeded: some of each
    # the training loss sees the masked images: same as the plain method given image * mask
    model = _model()
    out = method.loss(model, images, labels, masks)
    plain = build_method("isnet", variant="selective").loss(model, images * masks, labels, masks)
    assert float(out.loss) == pytest.approx(float(plain.loss), rel=1e-6)
    # validation and tuned copies: validation never masks, the tuned copy keeps the option
    assert method.for_validation().lung_only_prob == 0.0
    assert method.with_constants(1.0, 2.0).lung_only_prob == 1.0
    with pytest.raises(ValueError, match="lung_only_prob"):
        build_method("isnet", lung_only_prob=1.5)


def test_isnet_swap_background_trains_on_swapped_images_with_own_masks() -> None:
    """``swap_background`` makes the training loss that of the plain ISNet on
    ``BackgroundSwap.swap(images, masks)`` with the image's own masks; the marker of image i
    then sits beside image i+1's label; validation sees the plain images."""
    images, labels, masks = _batch()
    swapped = BackgroundSwap.swap(images, masks)
    assert torch.equal(swapped[1, 0, 0:3], images[0, 0, 0:3])  # the previous image's marker
    cfg = dict(variant="selective", P=0.7, C1=1.0, C2=20.0)
    method = build_method("isnet", swap_background=True, **cfg)
    model = _model()
    out = method.loss(model, images, labels, masks)
    plain = build_method("isnet", **cfg)
    expected = plain.loss(model, swapped, labels, masks)
    assert float(out.loss) == pytest.approx(float(expected.loss), rel=1e-6)
    assert float(out.loss) != pytest.approx(float(plain.loss(model, images, labels, masks).loss))
    assert method.with_constants(2.0, 30.0).swap_background is True
    assert method.for_validation().swap_background is False
    with pytest.raises(ValueError, match="swap_background must be true or false"):
        build_method("isnet", swap_background="false")


def test_isnet_distillation_replaces_part_of_the_cross_entropy(tmp_path) -> None:
    """With a teacher the classification term is (1 - distill) CE + distill KD, KD the
    temperature-scaled KL from the teacher's softmax on the lung-masked image; a teacher equal to
    the student on an all-lung mask gives KD 0."""
    images, labels, masks = _batch()
    student = _model(0).eval()  # the teacher runs in eval mode: compare like with like
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save(student.state_dict(), same)
    torch.save(_model(1).state_dict(), other)
    cfg = dict(variant="selective", P=0.7, C1=1.0, C2=20.0)
    plain = build_method("isnet", **cfg).loss(student, images, labels, masks)

    ones = torch.ones_like(masks)
    twin = build_method("isnet", teacher=str(same), distill=0.4, **cfg)
    twin.attach_teacher(lambda: _model(5))
    out = twin.loss(student, images, labels, ones)
    ref = build_method("isnet", **cfg).loss(student, images, labels, ones)
    assert out.parts["kd"] == pytest.approx(0.0, abs=1e-6)
    assert float(out.loss) == pytest.approx(float(ref.loss) - 0.3 * 0.4 * out.parts["ce"], rel=1e-5)

    method = build_method("isnet", teacher=str(other), distill=0.4, distill_T=3.0, **cfg)
    method.attach_teacher(lambda: _model(5))
    out = method.loss(student, images, labels, masks)
    with torch.no_grad():
        t = torch.softmax(_model(1).eval()(images * masks) / 3.0, dim=1)
        log_s = torch.log_softmax(student(images) / 3.0, dim=1)
        kd = float((t * (t.log() - log_s)).sum(dim=1).mean() * 9.0)
    assert out.parts["kd"] == pytest.approx(kd, rel=1e-4) and kd > 1e-3
    expected = 0.3 * (0.6 * plain.parts["ce"] + 0.4 * kd) + 0.7 * plain.parts["heatmap"]
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    # the copies training makes keep the teacher; validation's loss stays CE + heatmap loss
    assert method.with_constants(2.0, 30.0).teacher_net is method.teacher_net
    assert "kd" not in method.for_validation().loss(student, images, labels, masks).parts


def test_isnet_teacher_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"teacher: .*nope\.pt is not a file"):
        build_method("isnet", teacher=str(tmp_path / "nope.pt"))
    path = tmp_path / "t.pt"
    torch.save(_model(1).state_dict(), path)
    with pytest.raises(ValueError, match="distill in"):
        build_method("isnet", teacher=str(path), distill=1.5)
    images, labels, masks = _batch()
    with pytest.raises(RuntimeError, match="attach_teacher"):
        build_method("isnet", teacher=str(path)).loss(_model(), images, labels, masks)
