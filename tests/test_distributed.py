"""Multi-process training through real PyTorch DDP: ``torchrun`` + the bundle overlays
``configs/multi_gpu_train.json`` / ``configs/multi_gpu_train_seg.json``, two CPU processes (gloo).

Each run gets a test-only third overlay that replaces ``run``: after training, every rank saves
its final state dict, validation metrics, iteration count, shard size and method constants to
``output_dir/rank<R>_final.pt``, so the test can check that the ranks ended with identical weights
(gradients were all-reduced) after training on different halves of the data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classification.models import build_backbone
from cxr_io.determinism import EpochSeeder
from tests.test_train import SIZE, make_tiny_manifest

pytestmark = pytest.mark.slow  # end to end through real engines

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
WORLD = 2
N_TRAIN = 12  # make_tiny_manifest(n=16): 12 train, 3 val, 1 test rows

PER_RANK_DUMP = (
    "$torch.save({'state': @network_def.state_dict(), "
    "'iterations': @train#trainer.state.iteration, "
    "'samples': len(@train#sampler), "
    "'world': dist.get_world_size(), "
    "'torch_seed': torch.initial_seed(), "
    "'val': {k: float(v) for k, v in @validate#evaluator.state.metrics.items()}, "
    "'constants': [getattr(getattr(@train#method, 'cfg', None), k, None) for k in ('C1', 'C2')]}, "
    "@output_dir + '/rank' + str(@rank) + '_final.pt')"
)
SEG_DUMP = PER_RANK_DUMP.replace("@train#method", "None")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_manifest(tmp_path_factory.mktemp("ddp_data"), n=16)


def _torchrun(configs: list[Path], args: dict[str, object], tmp: Path) -> str:
    """Run ``torchrun --nproc_per_node=2 --standalone -m monai.bundle run`` on CPU; return its
    output (the test fails with that output if the exit code is not 0)."""
    dump = tmp / "per_rank_dump.json"
    dump_cmd = SEG_DUMP if "train_seg" in configs[0].name else PER_RANK_DUMP
    dump.write_text(json.dumps({"run": ["$@train#trainer.run()", dump_cmd]}))
    files = [str(c) for c in [*configs, dump]]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(files),
        "--bundle_root",
        str(ROOT),
    ]
    for key, value in args.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _per_rank(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}_final.pt", weights_only=True) for r in range(WORLD)]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not any(k.startswith("module.") for k in a)  # plain (unwrapped) state dict
    for k in a:
        assert torch.equal(a[k], b[k]), f"rank 0 and rank 1 differ in {k}"


@pytest.mark.parametrize("method", ["standard", "isnet"])
def test_classifier_ddp_two_processes(dataset, tmp_path, method) -> None:
    out = tmp_path / "out"
    out.mkdir()  # the per-rank dumps of this test may run before rank 0 creates it
    args: dict[str, object] = {
        "dataset_dir": str(dataset.parent),
        "output_dir": str(out),
        "method": method,
        "size": SIZE,
        "epochs": 1,
        "batch_size": 4,
        "tune_epochs": 1,
        "seed": 1,
    }
    if method == "isnet":
        args["tracking"] = "mlflow"
    log = _torchrun([CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"], args, tmp_path)

    ranks = _per_rank(out)
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    # each rank trained on its half of the training set (DistributedSampler)
    assert [r["samples"] for r in ranks] == [N_TRAIN // WORLD] * WORLD
    assert [r["iterations"] for r in ranks] == [math.ceil(N_TRAIN / WORLD / 4)] * WORLD
    # ... and still ended with identical weights and BatchNorm statistics, and the same
    # validation metrics (reduced over the two validation shards)
    _assert_same_weights(ranks[0]["state"], ranks[1]["state"])
    assert ranks[0]["val"] == ranks[1]["val"] and "val_acc" in ranks[0]["val"]
    # the ranks drew their own augmentation / dropout / selection streams (EpochSeeder mixes
    # in the rank); rank 0 drew what a single process draws
    assert ranks[0]["torch_seed"] == EpochSeeder(1).epoch_seed(1)
    assert ranks[1]["torch_seed"] == EpochSeeder(1).epoch_seed(1, rank=1) != ranks[0]["torch_seed"]

    # one best checkpoint, written by rank 0, equal to the final weights (one epoch)
    assert sorted(out.rglob("best_model.pt")) == [out / "best_model.pt"]
    best = torch.load(out / "best_model.pt", weights_only=True)
    build_backbone("small_cnn", 3).load_state_dict(best)
    _assert_same_weights(best, ranks[0]["state"])
    assert (out / "last_model.pt").is_file()
    assert (out / "checkpoints" / "resume_checkpoint_epoch=1.pt").is_file()
    assert log.count("epoch 1/1") == 1  # progress printed by rank 0 only

    if method == "isnet":
        saved = json.loads((out / "isnet_constants.json").read_text())
        for r in ranks:  # every rank trained with rank 0's tuned constants
            assert r["constants"] == pytest.approx([saved["C1"], saved["C2"]], rel=1e-12)
        _assert_one_finished_run(out, "isnet_cxr_train", {"train_heatmap", "val_acc"})
    else:
        assert ranks[0]["constants"] == [None, None]


def _assert_one_finished_run(out: Path, experiment: str, metrics: set[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # only rank 0 logs
    assert runs[0].info.status == "FINISHED"
    assert metrics <= set(runs[0].data.metrics)


def test_segmentation_ddp_two_processes(dataset, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # the per-rank dumps of this test may run before rank 0 creates it
    args = {
        "meta_file": str(CONFIGS / "metadata.json"),
        "dataset_dir": str(dataset.parent),
        "output_dir": str(out),
        "spatial_size": [SIZE, SIZE],
        "batch_size": 4,
        "train#trainer#max_epochs": 1,
        "seed": 1,
    }
    log = _torchrun(
        [CONFIGS / "train_seg.json", CONFIGS / "multi_gpu_train_seg.json"], args, tmp_path
    )

    ranks = _per_rank(out)
    assert [r["samples"] for r in ranks] == [N_TRAIN // WORLD] * WORLD
    _assert_same_weights(ranks[0]["state"], ranks[1]["state"])
    assert ranks[0]["val"] == ranks[1]["val"] and "val_mean_dice" in ranks[0]["val"]
    assert [r["torch_seed"] for r in ranks] == [
        EpochSeeder(1).epoch_seed(1, rank=r) for r in (0, 1)
    ]
    models = out / "models"
    assert sorted(out.rglob("model.pt")) == [models / "model.pt"]
    _assert_same_weights(torch.load(models / "model.pt", weights_only=True), ranks[0]["state"])
    last = torch.load(models / "last.pt", weights_only=True)
    _assert_same_weights(last["network"], ranks[0]["state"])
    assert log.count("Key metric: val_mean_dice") == 1  # StatsHandler on rank 0 only
