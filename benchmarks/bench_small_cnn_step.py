"""Benchmark: the study's training step on one CPU thread, before and after two speed-ups that
change no number.

The embedded study trains ``small_cnn`` at 64 px, batch 16, one PyTorch thread per model. Printed,
measured side by side in this one run (interleaved repetitions, medians):

1. One optimisation step of each method (standard, RRR, ISNet stochastic: ``Method.loss``,
   backward, optimiser step) with ``MaxPool2x2``'s hand-written backward against the plain
   autograd graph of its three ``torch.maximum`` calls (the pooling before commit 8376bab), and
   whether the gradients are the same numbers (they must be).
2. The augmented training chain (``build_transforms`` with masks, ``full`` policy, from the
   first random transform on) per sample, MONAI's default MetaTensors against
   :func:`classification.data.plain_tensors`, and whether the samples are identical.

Usage: ``.venv/bin/python benchmarks/bench_small_cnn_step.py [--reps 15]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.transforms import Compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.data import AugmentConfig, build_transforms, plain_tensors  # noqa: E402
from classification.methods import build_method  # noqa: E402
from classification.models import MaxPool2x2, _max_pool_2x2, build_backbone  # noqa: E402

SIZE, BATCH, CLASSES = 64, 16, 3
METHODS = {"standard": {}, "rrr": {"lam": 10.0}, "isnet": {"variant": "stochastic", "P": 0.7}}


class _PlainGraphPool(MaxPool2x2):
    """The pooling as it was: autograd through the three ``torch.maximum`` calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _max_pool_2x2(x)


def _network(plain: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_backbone("small_cnn", CLASSES).train()
    if plain:
        for name, module in list(net.features.named_children()):
            if isinstance(module, MaxPool2x2):
                setattr(net.features, name, _PlainGraphPool())
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    mask = torch.zeros(BATCH, 1, SIZE, SIZE)
    mask[:, :, 8:56, 10:54] = 1
    return x, y, mask


def _stepper(name: str, plain: bool) -> tuple[Callable[[], None], torch.nn.Module]:
    net = _network(plain)
    method = build_method(name, **METHODS[name])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y, mask = _batch()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        method.loss(net, x, y, mask).loss.backward()
        opt.step()

    return step, net


def _median_ms(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_steps(reps: int) -> None:
    print(f"1. one training step, small_cnn {SIZE} px, batch {BATCH}, 1 thread (median of {reps})")
    for name in METHODS:
        fast, fast_net = _stepper(name, plain=False)
        slow, slow_net = _stepper(name, plain=True)
        for k in range(2):  # warm-up (LRP probes, allocator); the same dropout draws for both
            for step in (fast, slow):
                torch.manual_seed(k)
                step()
        weights = zip(fast_net.state_dict().values(), slow_net.state_dict().values(), strict=True)
        same = all(torch.equal(a, b) for a, b in weights)
        t_fast, t_slow = [], []
        for _ in range(3):  # interleaved
            t_slow.append(_median_ms(slow, reps))
            t_fast.append(_median_ms(fast, reps))
        ms_fast, ms_slow = statistics.median(t_fast), statistics.median(t_slow)
        print(
            f"   {name:<9} plain graph {ms_slow:7.1f} ms   hand-written backward {ms_fast:7.1f} ms"
            f"   ratio {ms_slow / ms_fast:4.2f}x   same weights after 2 steps: {same}"
        )


def bench_augmentation(n: int) -> None:
    chain = build_transforms(SIZE, with_mask=True, augment=AugmentConfig())
    start = next(i for i, t in enumerate(chain.transforms) if hasattr(t, "set_random_state"))
    tail = Compose(chain.transforms[start:])
    gen = torch.Generator().manual_seed(0)
    inputs = [
        {
            "image": torch.rand(1, SIZE, SIZE, generator=gen),
            "mask": (torch.rand(1, SIZE, SIZE, generator=gen) > 0.5).float(),
            "label": 1,
        }
        for _ in range(n)
    ]

    def run() -> tuple[float, list[torch.Tensor]]:
        tail.set_random_state(7)
        t = time.perf_counter()
        out = [tail(dict(d))["image"] for d in inputs]
        return 1000 * (time.perf_counter() - t) / n, out

    rounds = []
    for _ in range(3):  # interleaved
        meta_ms, meta_out = run()
        with plain_tensors():
            plain_ms, plain_out = run()
        rounds.append((meta_ms, plain_ms))
    same = all(torch.equal(torch.as_tensor(a), b) for a, b in zip(meta_out, plain_out, strict=True))
    meta_ms = statistics.median(r[0] for r in rounds)
    plain_ms = statistics.median(r[1] for r in rounds)
    print(f"2. augmented training chain (image + mask, full policy), {n} samples x 3 rounds")
    print(
        f"   MetaTensor {meta_ms:5.2f} ms/sample   plain_tensors {plain_ms:5.2f} ms/sample"
        f"   ratio {meta_ms / plain_ms:4.2f}x   identical samples: {same}"
    )


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {_cpu_model()}, torch {torch.__version__}")
    bench_steps(args.reps)
    bench_augmentation(args.samples)


if __name__ == "__main__":
    main()
