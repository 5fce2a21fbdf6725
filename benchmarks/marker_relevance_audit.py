"""Does LRP see the marker's effect? An audit of trained classifiers on the bias benchmark.

The ISNet loss penalises LRP relevance outside the lungs. That blocks the marker only if the
marker's influence on the output shows up as relevance ON the marker. This script measures it on
the paired test sets of ``benchmarks/bias_experiment.py`` (``unbiased`` and ``confounding``: the
same patients, only the marker differs; the confounding marker stands for another class than the
finding):

- ``effect``: how much the marker moves the logit of the class it stands for (confounding minus
  unbiased image): what the marker does to the output;
- ``R_marker``: the signed LRP relevance of that logit on the marker's pixels (the pixels where
  the two images differ), with the loss's rule (LRP-epsilon 0.01, z^B first layer on [0, 1]);
- ``captured`` = mean ``R_marker`` / mean ``effect``: the fraction of the marker's effect that
  LRP puts on the marker (a classifier that adds the marker's evidence like any other: most of
  it; an explanation the network has learnt to bypass: about 0);
- ``dR_lungs``: how much the same logit's relevance inside the lungs changes when the marker is
  added, and ``no_pixel``: the part of the effect that reaches no pixel at all (``effect`` minus
  the change of the heatmap's sum: relevance absorbed by the biases and the epsilon of the units
  the marker switches on or off); where the effect went instead;
- ``bg share``: share of ``|R|`` outside the lungs (what the loss sees);
- ``lung|R|/|z|``: the lungs' total ``|R|`` over the explained logit's magnitude.

    .venv/bin/python benchmarks/marker_relevance_audit.py --data /tmp/r6/d64 \\
        --model std:small_cnn:/tmp/r8/std64/run_standard_s0/best_model.pt \\
        --model isnet:small_cnn:/tmp/r8/isn64/run_isnet_s0/best_model.pt

``--model`` is ``NAME:BACKBONE:PATH`` (a ``best_model.pt`` state dict of that backbone, 3 classes
in the training manifest's order); give it once per model. ``--data`` is a ``bias_experiment.py``
data folder (``train/`` and ``test/`` manifests); for the embedded study give its manifests
instead (the lung masks are the manifest's, ground truth; the classes are sorted names, as the
study orders them):

    .venv/bin/python benchmarks/marker_relevance_audit.py \\
        --test-manifest outputs/study/data/bias/manifest.csv \\
        --model isnet:small_cnn:outputs/study/models/main/isnet-stochastic-seed0-<key>/best_model.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def paired_sets(test_manifest: Path, classes: list[str], size: int) -> dict[str, Tensor]:
    """The unbiased and confounding images of ``test_manifest`` paired by patient:
    ``x_u``, ``x_c`` ``[n, 1, S, S]``; ``lungs`` ``[n, 1, S, S]`` (0/1); ``marker`` ``[n, 1, S, S]``
    (1 where the two images differ); ``marker_class`` ``[n]`` (the confounding marker's class,
    indices in ``classes``)."""
    from classification.data import build_dataset, build_loader
    from cxr_io.manifest import load_manifest, to_records

    test = load_manifest(test_manifest)
    rows = {
        kind: test[test["site"].str.endswith(f"-{kind}")].sort_values("patient_id")
        for kind in ("unbiased", "confounding")
    }
    if any(len(r) == 0 for r in rows.values()):
        raise ValueError(
            f"{test_manifest}: no '<site>-unbiased' or no '<site>-confounding' rows; give the "
            "test manifest of bias_experiment.py or the study's data/bias/manifest.csv"
        )
    if rows["unbiased"]["patient_id"].tolist() != rows["confounding"]["patient_id"].tolist():
        raise ValueError(f"{test_manifest}: the unbiased and confounding sets hold other patients")
    out: dict[str, Tensor] = {}
    for kind, frame in rows.items():
        ds = build_dataset(to_records(frame, classes), size, need_masks=True)
        batch = next(iter(build_loader(ds, len(ds), shuffle=False)))
        out[f"x_{kind[0]}"] = torch.as_tensor(batch["image"]).float()
        out["lungs"] = torch.as_tensor(batch["mask"]).float()  # the same patients' lungs
    out["marker_class"] = torch.tensor([classes.index(b) for b in rows["confounding"]["bias"]])
    out["marker"] = ((out["x_c"] - out["x_u"]).abs() > 1e-3).float()
    return out


def audit(model: torch.nn.Module, sets: dict[str, Tensor]) -> dict[str, float]:
    """The audit's numbers (see the module docstring) for one model, means over the images."""
    from classification.lrp import lrp_heatmaps

    cls = sets["marker_class"].view(-1, 1)

    def explain(x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logit of cls [n], relevance [n, 1, S, S])``."""
        z, R = lrp_heatmaps(
            model,
            x,
            lambda logits: logits.gather(1, cls),
            eps=0.01,
            input_bounds=(0.0, 1.0),
            create_graph=False,
        )
        return z.gather(1, cls).squeeze(1).detach(), R[:, 0].sum(1, keepdim=True).detach()

    model.eval()
    z_u, R_u = explain(sets["x_u"])
    z_c, R_c = explain(sets["x_c"])
    lungs, marker = sets["lungs"], sets["marker"]

    def total(t: Tensor) -> Tensor:
        return t.flatten(1).sum(1)

    effect = z_c - z_u
    r_marker = total(R_c * marker)
    lung_abs = total(R_c.abs() * lungs)
    return {
        "effect": float(effect.mean()),
        "R_marker": float(r_marker.mean()),
        "captured": float(r_marker.mean() / effect.mean()),
        "dR_lungs": float(total((R_c - R_u) * lungs).mean()),
        "no_pixel": float((effect - total(R_c - R_u)).mean()),
        "bg_share": float((total(R_c.abs() * (1 - lungs)) / total(R_c.abs())).mean()),
        "lung_abs_over_z": float((lung_abs / z_c.abs().clamp_min(1e-6)).median()),
    }


def main() -> None:
    from classification.models import build_backbone
    from cxr_io.manifest import class_names, load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="a bias_experiment.py data folder")
    where.add_argument(
        "--test-manifest", type=Path, help="a manifest with <site>-unbiased/-confounding rows"
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", action="append", required=True, help="NAME:BACKBONE:PATH")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    for spec in args.model:
        if spec.count(":") < 2:
            ap.error(
                f"--model {spec!r}: give NAME:BACKBONE:PATH, e.g. isnet:small_cnn:run/best_model.pt"
            )
        if not Path(spec.split(":", 2)[2]).is_file():
            ap.error(f"--model {spec!r}: {spec.split(':', 2)[2]} is not a file (a best_model.pt)")
    torch.set_num_threads(1)
    if args.data is not None:
        test = args.data / "test" / "manifest.csv"
        classes = class_names(load_manifest(args.data / "train" / "manifest.csv"))
    else:
        test = args.test_manifest
        classes = class_names(load_manifest(test))
    sets = paired_sets(test, classes, args.size)
    n = len(sets["marker_class"])
    print(
        f"{n} patients; marker {sets['marker'].flatten(1).sum(1).mean():.0f} px, "
        f"lungs {sets['lungs'].flatten(1).sum(1).mean():.0f} px per image"
    )
    cols = ("effect", "R_marker", "captured", "dR_lungs", "no_pixel", "bg_share", "lung_abs_over_z")
    print(f"{'model':<16}" + "".join(f"{c:>16}" for c in cols))
    rows = {}
    for spec in args.model:
        name, backbone, path = spec.split(":", 2)
        model = build_backbone(backbone, 3, 1, 0.5, 16)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        rows[name] = audit(model, sets)
        print(f"{name:<16}" + "".join(f"{rows[name][c]:>16.3f}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
