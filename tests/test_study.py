"""A tiny cross-dataset study end to end: real data files, real training, real MLflow stores."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from mlflow import MlflowClient

from cxr_io.manifest import load_manifest
from cxr_io.readers import CXRReadError
from pipeline import Predictor
from pipeline.study import StudyConfig, plan_folds, run_study, synthetic_layout
from synthetic import default_sites, make_bias_test_sets, make_dataset

pytestmark = [
    pytest.mark.slow,  # end to end: data, masks, training, evaluation, MLflow
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TINY_TRAIN = {"size": 32, "epochs": 1, "batch_size": 8, "tune_epochs": 1, "augment": False}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("study_data")
    sites = default_sites()
    kw = {"size": 64, "workers": 1, "progress": False}
    main = make_dataset(root / "sites", sites, n_per_site=18, seed=0, **kw)
    bias = make_bias_test_sets(root / "bias", sites[0], n=6, seed=1, **kw)
    return [main, bias]


def _config(manifests: list[Path], methods: list, name: str) -> StudyConfig:
    return StudyConfig.from_dict(
        {
            "name": name,
            "manifests": [str(m) for m in manifests],
            "external_sites": ["hospital-c"],
            "methods": methods,
            "train": TINY_TRAIN,
            "n_boot": 10,
            "heatmap_examples": 2,
        }
    )


def _copy_data(tiny_data: list[Path], dst: Path) -> list[Path]:
    """A private copy of the data (the crash test damages a file)."""
    out = []
    for m in tiny_data:
        shutil.copytree(m.parent, dst / m.parent.name)
        out.append(dst / m.parent.name / m.name)
    return out


def test_layout_defaults_to_biased_sites_for_training(tiny_data):
    df = pd.concat([load_manifest(m) for m in tiny_data], ignore_index=True)
    (fold,) = plan_folds(_config(tiny_data, ["standard"], "x"), df)
    assert synthetic_layout() == {
        "train_sites": ("hospital-a", "hospital-b"),
        "external_sites": ("hospital-c",),
    }
    assert fold.train_sites == ("hospital-a", "hospital-b")
    kinds = {e.name: e.kind for e in fold.evals}
    assert kinds == {
        "internal-test": "internal",
        "hospital-c": "external",
        "hospital-a-biased": "biased",
        "hospital-a-unbiased": "unbiased",
        "hospital-a-confounding": "confounding",
    }
    assert set(fold.train["split"]) == {"train"} and set(fold.val["split"]) == {"val"}
    loso = plan_folds(
        StudyConfig.from_dict({"manifests": [str(tiny_data[0])], "leave_one_site_out": True}),
        load_manifest(tiny_data[0]),
    )
    assert [f.train_sites for f in loso] == [
        ("hospital-b", "hospital-c"),
        ("hospital-a", "hospital-c"),
        ("hospital-a", "hospital-b"),
    ]
    with pytest.raises(ValueError, match="no held-out site"):
        plan_folds(
            StudyConfig.from_dict({"train_sites": ["hospital-a", "hospital-b", "hospital-c"]}),
            load_manifest(tiny_data[0]),
        )
    with pytest.raises(ValueError, match="unknown study setting"):
        StudyConfig.from_dict({"method": ["standard"]})


def test_tiny_study_into_sqlite_store(tiny_data, tmp_path):
    cfg = _config(
        tiny_data, ["standard", {"name": "isnet", "params": {"variant": "selective"}}], "tiny-study"
    )
    res = run_study(cfg, tmp_path / "out", command="pytest", log=lambda _: None)
    client = MlflowClient(res.tracking_uri)
    exp = client.get_experiment_by_name("tiny-study")
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [res.run_id]
    trains = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.run_id]
    assert sorted(r.data.tags["method"] for r in trains) == ["isnet-selective", "standard"]
    evals = [r for r in runs if "eval.dataset" in r.data.tags]
    assert len(evals) == 2 * 5
    metric_names = None
    for ev in evals:
        tags = ev.data.tags
        assert by_id[tags["mlflow.parentRunId"]].data.tags["method"] == tags["method"]
        assert tags["train.run_id"] == tags["mlflow.parentRunId"]
        assert tags["eval.kind"] in {"internal", "external", "biased", "unbiased", "confounding"}
        names = set(ev.data.metrics)
        assert "auroc_macro" in names and "background_share" in names
        # the chance level beside background_share is its own (1 - lung fraction, ~0.8)
        assert "chance" not in names
        chance = ev.data.metrics["background_share_chance"]
        assert chance == pytest.approx(1 - ev.data.metrics["lung_fraction"]) and chance > 0.5
        metric_names = metric_names or names
        assert names == metric_names  # identical metric names on every dataset
        contexts = {i.tags[0].value for i in ev.inputs.dataset_inputs}
        assert contexts == {"evaluation"}
        artifacts = {a.path for a in client.list_artifacts(ev.info.run_id)}
        assert {"predictions.csv", "heatmaps.png"} <= artifacts  # every evaluation run
    for tr in trains:
        assert {i.tags[0].value for i in tr.inputs.dataset_inputs} == {"training"}
        assert tr.data.tags.get("train.model_id")
        assert "train_ce" in tr.data.metrics
    # the model artifact of a training run loads from the store alone

    p = Predictor.load(
        f"runs:/{trains[0].info.run_id}/model_artifact", tracking_uri=res.tracking_uri
    )
    assert trains[0].data.tags["method"].startswith(p.card.method) and len(p.classes) == 3
    artifacts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {
        "report.html",
        "results.csv",
        "paired_tests.csv",
        "paired_tests_pooled.csv",
    } <= artifacts
    # the parent run carries the headline (method x dataset AUROC with CI) and the conclusion
    parent = client.get_run(res.run_id)
    row = res.results.query("method == 'standard' and dataset == 'hospital-c'").iloc[0]
    key = "auroc_macro.standard.hospital-c"
    assert parent.data.metrics[key] == pytest.approx(row["auroc_macro"])
    assert parent.data.metrics[f"{key}_lo"] == pytest.approx(row["auroc_macro_ci_low"])
    assert parent.data.metrics[f"{key}_hi"] == pytest.approx(row["auroc_macro_ci_high"])
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(res.conclusion) and "On hospital-c (external) the best is" in note
    assert "What this study found" in res.report.read_text()
    # external rows are test rows in their evaluation run
    ext = next(r for r in evals if r.data.tags["eval.kind"] == "external")
    table = pd.read_csv(
        client.download_artifacts(ext.info.run_id, "predictions.csv", str(tmp_path))
    )
    assert set(table["split"]) == {"test"}
    # every model: named after its method, signature, registered (one registered model a method)
    for tr in trains:
        model = client.get_logged_model(tr.data.tags["train.model_id"])
        assert model.name == tr.data.tags["method"]
    registered = {m.name for m in client.search_registered_models()}
    assert registered == {"isnet-cxr-standard", "isnet-cxr-isnet-selective"}

    # results and evidence on disk; every model has a card for batch runs
    cards = sorted((res.out_dir / "models").rglob("model.json"))
    assert len(cards) == 2
    assert set(res.results["dataset"]) == {
        e
        for e in [
            "internal-test",
            "hospital-c",
            "hospital-a-biased",
            "hospital-a-unbiased",
            "hospital-a-confounding",
        ]
    }
    assert len(res.paired) == 4  # isnet vs standard on 4 non-internal datasets
    assert (res.paired["ci_low"] <= res.paired["difference"]).all()
    html = res.report.read_text()
    assert "isnet-selective" in html and "hospital-c" in html and "LRP heatmaps" in html
    assert res.markdown.count("\n") == 3  # header, rule, two methods

    # privacy: no DICOM patient identifier in anything the study wrote or logged
    df = load_manifest(tiny_data[0])
    ds = pydicom.dcmread(df.loc[0, "image"], stop_before_pixels=True)
    secrets = {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)}
    local = client.download_artifacts(evals[0].info.run_id, "predictions.csv", str(tmp_path))
    texts = [html, Path(local).read_text(), (res.out_dir / "results.csv").read_text()]
    texts += [str(r.data.params) + str(r.data.tags) for r in runs]
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_crash_marks_runs_failed_and_rerun_resumes(tiny_data, tmp_path):
    manifests = _copy_data(tiny_data, tmp_path / "data")
    df = load_manifest(manifests[0])
    victim = Path(df[df["site"] == "hospital-c"]["image"].iloc[0])
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # truncated mid-pixel data
    cfg = _config(manifests, ["standard"], "crash-study")
    with pytest.raises(CXRReadError, match=victim.name):
        run_study(cfg, tmp_path / "out", command="pytest", log=lambda _: None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("crash-study")
    crashed = client.search_runs([exp.experiment_id])
    assert "RUNNING" not in {r.info.status for r in crashed}
    assert "FAILED" in {r.info.status for r in crashed}
    (parent,) = [r for r in crashed if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"

    victim.write_bytes(good)
    lines: list[str] = []
    res = run_study(cfg, tmp_path / "out", command="pytest", log=lines.append)
    assert any("reusing the finished model" in line for line in lines)
    runs = client.search_runs([exp.experiment_id])
    fresh = [r for r in runs if r.info.run_id not in {c.info.run_id for c in crashed}]
    assert fresh and all(r.info.status == "FINISHED" for r in fresh)
    assert res.run_id in {r.info.run_id for r in fresh}
    assert len(res.results) == 5


def test_study_against_real_mlflow_server(tiny_data, tmp_path, mlflow_server, monkeypatch):
    url = mlflow_server.url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = replace(_config(tiny_data, ["standard"], "server-study-e2e"), masks="segmenter")
    res = run_study(cfg, tmp_path / "out", command="pytest", log=lambda _: None)
    assert res.tracking_uri == url
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("server-study-e2e").experiment_id])
    assert len(runs) == 1 + 1 + 5 and {r.info.status for r in runs} == {"FINISHED"}
    assert "report.html" in {a.path for a in client.list_artifacts(res.run_id)}
    assert not (tmp_path / "out" / "mlflow" / "mlruns.db").exists()
    # every row was segmented by the U-Net (masks="segmenter"), and those masks were used
    (seg_manifest,) = (tmp_path / "out" / "masks").glob("manifest0-*/manifest.csv")
    seg = pd.read_csv(seg_manifest, dtype=str)
    assert (seg["mask_source"] != "given").all() and seg["mask"].str.contains("masks/").all()


def test_parallel_training_gives_the_serial_results(tiny_data, tmp_path):
    """workers=2 trains the models in two spawned processes; with the threads per model fixed,
    every number equals the serial study's, and each model was trained once. The ISNet distils
    from the segment-then-classify model listed after it: that teacher is trained first."""
    teacher = "segment_then_classify"
    methods = [
        "standard",
        {"name": "isnet", "params": {"variant": "stochastic", "teacher": teacher}},
        teacher,
    ]
    results = {}
    for workers in (1, 2):
        cfg = replace(
            _config(tiny_data, methods, f"tiny-workers{workers}"),
            train={**TINY_TRAIN, "epochs": 2, "threads": 1},
            workers=workers,
        )
        lines: list[str] = []
        res = run_study(cfg, tmp_path / f"w{workers}", command="pytest", log=lines.append)
        results[workers] = res.results
        trained_here = [ln for ln in lines if ": training (" in ln]
        assert len(trained_here) == (3 if workers == 1 else 0), lines
        if workers == 2:
            assert any("3 models, 2 at a time (1 thread(s) each)" in ln for ln in lines)
            assert sum(": reusing the finished model" in ln for ln in lines) == 3
        models = tmp_path / f"w{workers}" / "models" / "main"
        (stc_done,) = models.glob(f"{teacher}-seed0-*/done.json")
        (isnet_dir,) = models.glob("isnet-stochastic-seed0-*")
        first_isnet_file = min(p.stat().st_mtime for p in isnet_dir.rglob("*") if p.is_file())
        assert stc_done.stat().st_mtime <= first_isnet_file
    cols = ["method", "dataset", "auroc_macro", "balanced_accuracy", "background_share"]
    pd.testing.assert_frame_equal(results[1][cols], results[2][cols])


def test_each_model_is_evaluated_as_soon_as_it_is_trained(tiny_data, tmp_path):
    """With workers, the study evaluates a finished model while another still trains (the
    evaluation fills the cores a lone last training leaves idle): the ISNet starts only once
    its teacher is trained, and the teacher is evaluated meanwhile."""
    teacher = "segment_then_classify"
    methods = [teacher, {"name": "isnet", "params": {"variant": "stochastic", "teacher": teacher}}]
    cfg = replace(
        _config(tiny_data, methods, "overlap"),
        train={**TINY_TRAIN, "epochs": 30, "threads": 1},
        workers=2,
    )
    lines: list[str] = []
    run_study(cfg, tmp_path / "out", command="pytest", log=lines.append)
    first_eval = next(i for i, ln in enumerate(lines) if f" {teacher} " in ln and "AUROC" in ln)
    isnet_done = next(i for i, ln in enumerate(lines) if "isnet-stochastic/seed0: trained" in ln)
    assert first_eval < isnet_done, lines


def test_a_training_error_in_a_worker_stops_the_study_with_that_error(tiny_data, tmp_path):
    manifests = _copy_data(tiny_data, tmp_path / "data")
    df = load_manifest(manifests[0])
    rows = df[(df["site"] == "hospital-a") & (df["split"] == "train")]
    victim = Path(rows["image"].iloc[0])
    victim.write_bytes(victim.read_bytes()[:300])  # a header, no pixels
    cfg = replace(
        _config(manifests, ["standard", "segment_then_classify"], "worker-crash"),
        train={**TINY_TRAIN, "threads": 1},
        workers=2,
    )
    with pytest.raises(CXRReadError, match=victim.name):
        run_study(cfg, tmp_path / "out", command="pytest", log=lambda _: None)


def test_workers_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        StudyConfig.from_dict({"workers": 0})


def test_ctrl_c_during_parallel_training_stops_at_once_and_the_rerun_resumes(tiny_data, tmp_path):
    """``isnet-cxr study run`` with 2 workers, SIGINT to the main process while both models
    train: exit 130 with a message saying how to resume, no worker process left; the same
    command again resumes the interrupted models from their checkpoints and finishes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    study_def = {
        "name": "ctrl-c",
        "manifests": [str(m) for m in tiny_data],
        "external_sites": ["hospital-c"],
        "methods": ["standard", {"name": "isnet", "params": {"variant": "stochastic"}}],
        "train": {**TINY_TRAIN, "epochs": 40, "threads": 1},
        "workers": 2,
        "n_boot": 10,
        "heatmap_examples": 0,
    }
    config = tmp_path / "study.json"
    config.write_text(
        json.dumps(
            {
                "imports": ["$import pipeline", "$import pipeline.study"],
                "output_dir": str(tmp_path / "out"),
                "study_def": study_def,
                "study": "$pipeline.study.StudyConfig.from_dict(@study_def)",
            }
        )
    )
    root = Path(__file__).parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-c", "from pipeline.cli import app; app()", "study", "run", str(config)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers can be looked for after
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until both models are past their first epochs
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if sum(" epoch 3/40 " in s for s in seen) == 2:
            break
    assert sum(" epoch 3/40 " in s for s in seen) == 2, "".join(seen[-20:])
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the main process only, as `kill -INT` would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 60  # the workers were stopped, not waited for
    assert "interrupted" in err and "run the same command again" in err
    assert "Traceback" not in err
    for _ in range(100):  # the terminated workers are gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("worker processes survived the interruption")

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": resuming (40 epochs)") == 2, again.stdout[-3000:]
