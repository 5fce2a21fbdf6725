"""LRP-ready backbones: make_lrp_ready keeps MONAI outputs and state_dict keys."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet121, resnet18
from torch import nn

from classification.lrp import check_lrp_ready, lrp_heatmaps
from classification.models import (
    LRPReadyResNetBlock,
    SmallCNN,
    build_backbone,
    make_lrp_ready,
)


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for train in (False, True):
        a.train(train)
        b.train(train)
        torch.manual_seed(123)
        out_a = a(x)
        torch.manual_seed(123)
        out_b = b(x)
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3, dropout_prob=0.2),
        lambda: resnet18(spatial_dims=2, n_input_channels=1, num_classes=3),
    ],
    ids=["densenet121", "resnet18"],
)
def test_make_lrp_ready_keeps_monai_outputs(factory):
    torch.manual_seed(0)
    original = factory()
    ready = make_lrp_ready(original)
    assert list(ready.state_dict()) == list(original.state_dict())
    x = torch.rand(2, 1, 32, 32)
    check_lrp_ready(ready, x[:1])
    _same_outputs(original, ready, x)
    relus = [m for m in ready.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)
    assert len({id(r) for r in relus}) == len(relus)


def test_resnet_blocks_get_two_relus():
    ready = make_lrp_ready(resnet18(spatial_dims=2, n_input_channels=1, num_classes=2))
    blocks = [m for m in ready.modules() if isinstance(m, LRPReadyResNetBlock)]
    assert len(blocks) == 8
    assert all(b.act is not b.act2 for b in blocks)
    # the unconverted MONAI model reuses its block ReLUs: refused
    with pytest.raises(Exception, match="more than once|in-place"):
        check_lrp_ready(resnet18(spatial_dims=2, n_input_channels=1), torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("small_cnn", 64),
        ("small_cnn", 128),
        ("small_cnn_deep", 64),
        ("small_cnn_max", 64),
        ("resnet18", 64),
        ("densenet121", 64),
    ],
)
def test_build_backbone(name, size):
    torch.manual_seed(0)
    net = build_backbone(name, num_classes=3, in_channels=1, dropout=0.3)
    x = torch.rand(2, 1, size, size)
    net.eval()
    assert net(x).shape == (2, 3)
    check_lrp_ready(net, x[:1])
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert any(d.p == 0.3 for d in dropouts)
    _, R = lrp_heatmaps(net, x, lambda lg: lg[:, :1])
    assert R.shape == (2, 1, 1, size, size) and torch.isfinite(R).all()


def _receptive_extent(net: nn.Module, size: int) -> tuple[int, int]:
    """Rows and columns of a ``size`` x ``size`` input that reach the centre output feature."""
    net = net.eval()
    x = torch.rand(1, 1, size, size, requires_grad=True)
    feats = net.features(x)
    h, w = feats.shape[-2:]
    (g,) = torch.autograd.grad(feats[0, :, h // 2, w // 2].sum(), x)
    nz = g[0, 0].abs() > 0
    return int(nz.any(1).sum()), int(nz.any(0).sum())


def test_small_cnn_deep_sees_the_whole_image_where_small_cnn_sees_part():
    torch.manual_seed(0)
    deep = build_backbone("small_cnn_deep", 3)
    convs = [m.out_channels for m in deep.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64, 64, 64]
    assert _receptive_extent(deep, 64) == (64, 64)
    rows, cols = _receptive_extent(build_backbone("small_cnn", 3), 64)
    assert rows < 40 and cols < 40


def test_small_cnn_max_explains_through_one_position_per_feature():
    torch.manual_seed(0)
    net = build_backbone("small_cnn_max", 3, dropout=0.0).double().eval()
    assert isinstance(net.pool, nn.AdaptiveMaxPool2d)
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    _, R = lrp_heatmaps(net, x, lambda lg: lg[:, :1], eps=0.0, at="features.relu3")
    nonzero = (R[0, 0].abs() > 0).flatten(1).sum(dim=1)  # positions per channel
    assert int(nonzero.max()) == 1 and int(nonzero.sum()) > 0
    _, R_avg = lrp_heatmaps(
        build_backbone("small_cnn", 3, dropout=0.0).double().eval(),
        x,
        lambda lg: lg[:, :1],
        eps=0.0,
        at="features.relu3",
    )
    assert int((R_avg[0, 0].abs() > 0).flatten(1).sum(dim=1).max()) > 1
    with pytest.raises(ValueError, match="head_pool"):
        SmallCNN(3, head_pool="median")


def test_build_backbone_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone("vgg", 2)
    with pytest.raises(ValueError, match="dropout"):
        build_backbone("small_cnn", 2, dropout=1.0)


def test_make_lrp_ready_refuses_non_relu_resnet_naming_the_module():
    net = resnet18(spatial_dims=2, n_input_channels=1, act=("leakyrelu", {"inplace": False}))
    with pytest.raises(Exception, match=r"module 'act' is LeakyReLU"):
        make_lrp_ready(net)


def test_maxpool2x2_equals_nn_maxpool():
    from classification.models import MaxPool2x2

    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    ref = nn.MaxPool2d(2)(x)
    out = MaxPool2x2()(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_maxpool2x2_gradients_are_the_plain_graphs_first_and_second_order():
    """The pooling's hand-written backward gives the numbers autograd gives through the three
    torch.maximum calls, ties (split 1/2, 1/4) and odd sizes included, also when differentiated
    again (LRP / ISNet / RRR losses): the speed-up must not move a single training step."""
    from classification.models import MaxPool2x2, _max_pool_2x2

    gen = torch.Generator().manual_seed(0)
    # small integers: many 2-, 3- and 4-way ties in the 2x2 windows
    x0 = torch.randint(0, 3, (3, 2, 9, 11), generator=gen).float()
    x0[0] = torch.randn(2, 9, 11, generator=gen)
    g = torch.randn(3, 2, 4, 5, generator=gen)
    u = torch.randn(3, 2, 9, 11, generator=gen)
    results = []
    for pool in (_max_pool_2x2, MaxPool2x2()):
        x = x0.clone().requires_grad_(True)
        gg = g.clone().requires_grad_(True)
        y = pool(x * 1.0)
        (gx,) = torch.autograd.grad(y, x, gg, create_graph=True)
        (ggg,) = torch.autograd.grad((gx * u).sum(), gg)
        results.append((y.detach(), gx.detach(), ggg))
    for new, ref in zip(results[1], results[0], strict=True):
        assert bool((new == ref).all())  # equal numbers (== ignores the sign of a zero)
    windows = x0[..., :8, :10].unfold(-2, 2, 2).unfold(-2, 2, 2).flatten(-2)  # [3, 2, 4, 5, 4]
    n_max = (windows == windows.amax(-1, keepdim=True)).sum(-1)
    assert all(bool((n_max == k).any()) for k in (1, 2, 3, 4))  # the test covers every tie
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(MaxPool2x2(), (x,))
    with torch.no_grad():  # no gradient wanted: the plain views, the same values
        assert torch.equal(MaxPool2x2()(x0), _max_pool_2x2(x0))


def test_small_cnn_width_and_its_model_card(tmp_path):
    from classification.model_card import load_model, write_model_card

    wide = build_backbone("small_cnn", 3, width=32)
    convs = [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)]
    assert convs[:4] == [32, 64, 128, 128]
    assert wide(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="small_cnn only"):
        build_backbone("resnet18", 3, width=32)
    with pytest.raises(ValueError, match="width must be"):
        build_backbone("small_cnn", 3, width=0)
    # a checkpoint of a wide net is rebuilt from its card with the same width
    ckpt = tmp_path / "best_model.pt"
    torch.save(wide.state_dict(), ckpt)
    write_model_card(
        ckpt, backbone="small_cnn", size=32, classes=["a", "b", "c"], method="standard", width=32
    )
    model, card = load_model(ckpt)
    assert card.width == 32
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model(x), wide.eval()(x))
