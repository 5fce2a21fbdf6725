"""Benchmark: cost of an ISNet training step versus a standard step (CPU).

Prints, all measured side by side in this one run (interleaved repetitions, medians):

1. DenseNet121, batch 8, 224x224, 1 input channel, 3 classes: standard step (forward, CE,
   backward, gradient clipping, SGD step) vs ISNet step (default config: selective, heatmaps at
   the input, z^B first layer, exact second order), and vs the faster ISNet step with exact LRP
   relevance at a hidden layer (``features.transition1.pool``, mask max-pooled there).
2. Selective and Stochastic step time with 2 vs 10 classes (should be within ~10%).
3. Original (one heatmap per class) with 2 vs 10 classes: the per-class slope.
4. Peak memory: max RSS (``resource.getrusage``) of separate child processes that run only
   standard steps or only ISNet steps; printed as peak RSS and as the increase over the RSS
   measured after building the model and batch (before the first step).
5. Inference: eval-mode forward time of a network after ISNet steps vs after standard steps (same
   architecture: the ISNet adds nothing at test time).

Usage:
    .venv/bin/python benchmarks/bench_isnet_step.py            # full (heavy: minutes)
    .venv/bin/python benchmarks/bench_isnet_step.py --quick    # small_cnn, 64x64, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.isnet_loss import ISNetLossConfig  # noqa: E402
from classification.methods import ISNet  # noqa: E402
from classification.models import build_backbone  # noqa: E402


@dataclass(frozen=True)
class Setting:
    backbone: str
    size: int
    batch: int
    classes: int
    scaling_size: int
    hidden_layer: str | None


FULL = Setting("densenet121", 224, 8, 3, 128, "features.transition1.pool")
QUICK = Setting("small_cnn", 64, 8, 3, 64, "features.pool1")


def _batch(s: Setting, classes: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(s.batch, 1, size, size, generator=gen)
    y = torch.randint(0, classes, (s.batch,), generator=gen)
    mask = torch.zeros(s.batch, 1, size, size)
    mask[:, :, size // 8 : 7 * size // 8, size // 6 : 5 * size // 6] = 1
    return x, y, mask


class Stepper:
    """A model + SGD optimiser doing standard or ISNet training steps on a fixed batch.

    The ISNet step is the one training runs: :meth:`classification.methods.ISNet.loss` (which
    calls :func:`classification.isnet_loss.isnet_losses`), backward, gradient-norm clipping at 1,
    optimiser step, as :class:`classification.train.MethodIteration` does.
    """

    def __init__(self, s: Setting, classes: int, size: int, cfg: ISNetLossConfig) -> None:
        torch.manual_seed(0)
        self.model = build_backbone(s.backbone, classes).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.99)
        self.x, self.y, self.mask = _batch(s, classes, size)
        self.cfg = cfg
        self.method = ISNet(cfg, torch.Generator().manual_seed(0))

    def standard(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def isnet(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.method.loss(self.model, self.x, self.y, self.mask)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(fns: dict[str, object], reps: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()  # type: ignore[operator]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(args: argparse.Namespace) -> None:
    """Peak RSS of steps only: reset the kernel's peak-RSS mark (``clear_refs`` 5) after setup,
    then read VmHWM; falls back to ``getrusage`` max RSS (whole process) if reset is refused."""
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    cfg = ISNetLossConfig(heatmap_layer=s.hidden_layer if args.child == "hidden" else None)
    st = Stepper(s, s.classes, s.size, cfg)
    base_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "getrusage ru_maxrss (whole process)"
    fn = st.standard if args.child == "standard" else st.isnet
    for _ in range(2):
        fn()
    if method.startswith("VmHWM"):
        peak_kb = _status_kb("VmHWM")
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "method": method}))


def _child_memory(kind: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small_cnn at 64x64 (smoke run)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per step kind")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--sections",
        default="1,2,4,5",
        help="comma-separated sections: 1 main, 2 class scaling (2-3), 4 memory, 5 inference",
    )
    ap.add_argument("--child", choices=["standard", "isnet", "hidden"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _memory_child(args)
        return
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    print(f"# ISNet training step benchmark ({'quick' if args.quick else 'full'})")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f} (the machine is shared with other jobs: "
        f"absolute times are noisy, ratios are measured interleaved)"
    )
    base = ISNetLossConfig()

    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    if 1 in sections:
        _main_comparison(s, base, args)
    if 2 in sections or 3 in sections:
        _class_scaling(s, base, args)
    if 4 in sections:
        _memory(s, args)
    if 5 in sections:
        _inference(s, base, args)


def _main_comparison(s: Setting, base: ISNetLossConfig, args: argparse.Namespace) -> None:
    print(
        f"\n## 1. {s.backbone}, batch {s.batch}, {s.size}x{s.size}, 1 channel, {s.classes} "
        f"classes, median of {args.reps}"
    )
    st = Stepper(s, s.classes, s.size, base)
    hid = Stepper(s, s.classes, s.size, replace(base, heatmap_layer=s.hidden_layer))
    med = _interleaved(
        {"standard": st.standard, "isnet_input": st.isnet, "isnet_hidden": hid.isnet}, args.reps
    )
    ratio_in = med["isnet_input"] / med["standard"]
    ratio_hid = med["isnet_hidden"] / med["standard"]
    print(f"standard step                         {med['standard']:.3f} s")
    print(
        f"ISNet step, selective, input heatmap  {med['isnet_input']:.3f} s   ratio {ratio_in:.2f}x"
    )
    print(
        f"ISNet step, selective, relevance at '{s.hidden_layer}' {med['isnet_hidden']:.3f} s   "
        f"ratio {ratio_hid:.2f}x"
    )


def _class_scaling(s: Setting, base: ISNetLossConfig, args: argparse.Namespace) -> None:
    sz = s.scaling_size
    reps = args.reps if not args.quick else 3 * args.reps
    print(
        f"\n## 2-3. class-count scaling: {s.backbone}, batch {s.batch}, {sz}x{sz}, median of {reps}"
    )
    steppers = {}
    for variant in ("selective", "stochastic", "original"):
        for n in (2, 10):
            steppers[f"{variant}_{n}"] = Stepper(s, n, sz, replace(base, variant=variant)).isnet
    smed = _interleaved(steppers, reps)
    for variant in ("selective", "stochastic"):
        a, b = smed[f"{variant}_2"], smed[f"{variant}_10"]
        print(f"{variant:10s}  2 classes {a:.3f} s, 10 classes {b:.3f} s, ratio {b / a:.3f}")
    a, b = smed["original_2"], smed["original_10"]
    slope = (b - a) / 8
    print(
        f"original    2 classes {a:.3f} s, 10 classes {b:.3f} s, slope {slope:.3f} s per class "
        f"({slope / a * 100:.0f}% of the 2-class step per extra class)"
    )


def _memory(s: Setting, args: argparse.Namespace) -> None:
    mem = {k: _child_memory(k, args) for k in ("standard", "isnet", "hidden")}
    print(
        f"\n## 4. peak memory of 2 steps in separate processes ({s.backbone}, {s.size}x{s.size}; "
        f"{mem['standard']['method']})"
    )
    for k, v in mem.items():
        inc = v["peak_mb"] - v["base_mb"]
        print(f"{k:9s} peak RSS {v['peak_mb']:.0f} MB, increase over setup {inc:.0f} MB")
    std_inc = mem["standard"]["peak_mb"] - mem["standard"]["base_mb"]
    for k in ("isnet", "hidden"):
        inc = mem[k]["peak_mb"] - mem[k]["base_mb"]
        print(
            f"{k} / standard: peak {mem[k]['peak_mb'] / mem['standard']['peak_mb']:.2f}x, "
            f"increase {inc / std_inc:.2f}x"
        )


def _inference(s: Setting, base: ISNetLossConfig, args: argparse.Namespace) -> None:
    plain = Stepper(s, s.classes, s.size, base)
    plain.standard()
    isnet = Stepper(s, s.classes, s.size, base)
    isnet.isnet()
    plain_model, isnet_model = plain.model.eval(), isnet.model.eval()
    x = plain.x
    with torch.no_grad():
        imed = _interleaved(
            {"plain": lambda: plain_model(x), "isnet": lambda: isnet_model(x)},
            max(5, 2 * args.reps),
        )
    print(
        f"\n## 5. inference (eval forward, batch {s.batch}): plain {imed['plain']:.3f} s, "
        f"ISNet-trained {imed['isnet']:.3f} s, ratio {imed['isnet'] / imed['plain']:.2f}x "
        f"(same architecture)"
    )


if __name__ == "__main__":
    main()
