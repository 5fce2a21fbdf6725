"""The MLflow layout of a study, read back from a real SQLite store and a real `mlflow server`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from cxr_io.privacy import PrivacyError, assert_no_identifiers, pseudonymous_frame
from evaluation.metrics import evaluate
from pipeline.tracking import StudyTracker, flatten_params, load_model, resolve_tracking_uri

CLASSES = ["normal", "pneumonia", "covid"]


pytestmark = [
    pytest.mark.filterwarnings("ignore:Starting with pandas version 4.0"),  # inside mlflow
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]


def _manifest(site: str, n: int, seed: int) -> pd.DataFrame:
    """A manifest-like frame with identifying columns (patient ids, paths with the id in them)."""
    rng = np.random.default_rng(seed)
    pids = [f"PID-{site}-{i // 2:05d}" for i in range(n)]  # two images per patient
    return pd.DataFrame(
        {
            "image": [f"/hospital/{p}/study1/img{i}.dcm" for i, p in enumerate(pids)],
            "mask": [f"/hospital/{p}/mask{i}.png" for i, p in enumerate(pids)],
            "label": [CLASSES[i] for i in rng.integers(0, 3, n)],
            "site": site,
            "patient_id": pids,
            "split": "test",
            "bias": "",
        }
    )


def _fake_predictions(df: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array([CLASSES.index(c) for c in df["label"]])
    logits = rng.normal(size=(len(df), 3))
    logits[np.arange(len(df)), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def _run_study(uri: str, name: str, *, crash_dataset: str | None = None) -> dict:
    """A tiny study: one method trained on sites A+B, evaluated on A (internal) and C (external)."""
    train_df = pd.concat([_manifest("siteA", 12, 0), _manifest("siteB", 12, 1)], ignore_index=True)
    evals = {
        "siteA": ("internal", _manifest("siteA", 16, 2)),
        "siteC": ("external", _manifest("siteC", 16, 3)),
    }
    ids: dict = {"eval": {}}
    config = {"study": {"name": name, "train_sites": ["siteA", "siteB"]}, "n_boot": 20}
    with StudyTracker(name, config, tracking_uri=uri) as study:
        ids["study"] = study.run_id
        with study.training_run("isnet", 0, {"lr": 1e-3, "epochs": 2}, train_df) as tr:
            for epoch, loss in enumerate([0.9, 0.5], start=1):
                tr.log_metrics({"train_loss": loss}, step=epoch)
            model = torch.nn.Linear(4, 3)
            ids["model"] = tr.log_model(model)
            ids["train"] = tr.run_id
        for dataset, (kind, df) in evals.items():
            with study.evaluation_run(tr.run_id, ids["model"], dataset, kind, df) as ev:
                ids["eval"][dataset] = ev.run_id
                probs, labels = _fake_predictions(df, 5)
                result = evaluate(probs, labels, df["patient_id"], CLASSES, n_boot=20)
                ev.log_metrics(result.as_dict())
                if dataset == crash_dataset:
                    raise RuntimeError("injected crash during evaluation")
                ev.log_predictions(probs, labels, CLASSES)
    return ids


def _check_layout(client: MlflowClient, name: str, ids: dict) -> None:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    study = client.get_run(ids["study"])
    assert study.data.tags["study.name"] == name
    assert (
        len(study.data.tags["code.version"]) == 40 or study.data.tags["code.version"] == "unknown"
    )
    assert study.data.params["study.train_sites"] == '["siteA", "siteB"]'
    assert study.data.params["n_boot"] == "20"
    assert "mlflow.parentRunId" not in study.data.tags

    train = client.get_run(ids["train"])
    assert train.data.tags["mlflow.parentRunId"] == ids["study"]
    assert train.data.tags["method"] == "isnet" and train.data.tags["seed"] == "0"
    assert train.data.tags["train.datasets"] == "siteA,siteB"
    assert [m.value for m in client.get_metric_history(ids["train"], "train_loss")] == [0.9, 0.5]
    (train_input,) = train.inputs.dataset_inputs
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "training"
    assert train.outputs.model_outputs[0].model_id == ids["model"]

    model = client.get_logged_model(ids["model"])
    assert model.source_run_id == ids["train"] and model.status.to_proto() is not None
    assert str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert model.experiment_id == exp.experiment_id
    assert (model.tags["method"], model.tags["train.datasets"]) == ("isnet", "siteA,siteB")
    # the model page lists the metrics of every evaluation dataset
    by_dataset = {(m.key, m.dataset_name) for m in model.metrics}
    assert ("auroc_macro", "siteA") in by_dataset and ("auroc_macro", "siteC") in by_dataset

    for dataset, kind in [("siteA", "internal"), ("siteC", "external")]:
        run = client.get_run(ids["eval"][dataset])
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == ids["train"]
        assert (tags["eval.dataset"], tags["eval.kind"]) == (dataset, kind)
        assert tags["train.run_id"] == ids["train"] and tags["eval.model_id"] == ids["model"]
        (ds_input,) = run.inputs.dataset_inputs
        assert ds_input.dataset.name == dataset
        assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "evaluation"
        assert [m.model_id for m in run.inputs.model_inputs] == [ids["model"]]
        assert set(run.data.metrics) >= {"auroc_macro", "auroc_macro_ci_low", "ece_ci_high"}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"predictions.csv", "confusion.png", "roc.png"}

    # privacy: nothing read back carries a patient id or an image path
    forbidden = {p for s in "ABC" for p in _manifest(f"site{s}", 16, 0)["patient_id"]}
    forbidden |= {"/hospital/"}
    for run in runs:
        assert_no_identifiers([run.data.params, run.data.tags, list(run.data.metrics)], forbidden)
        for inp in run.inputs.dataset_inputs:
            d = inp.dataset
            assert_no_identifiers([d.name, d.source, d.schema, d.profile], forbidden)


def _read_predictions(client: MlflowClient, run_id: str, tmp_path: Path) -> pd.DataFrame:
    local = client.download_artifacts(run_id, "predictions.csv", str(tmp_path))
    return pd.read_csv(local)


def test_study_layout_in_sqlite_store(tmp_path, store_uri):
    import mlflow

    uri = store_uri
    before = mlflow.get_tracking_uri()
    ids = _run_study(uri, "tiny-study")
    assert mlflow.active_run() is None  # nothing left on MLflow's fluent run stack
    assert mlflow.get_tracking_uri() == before  # nor in its global tracking URI
    client = MlflowClient(uri)
    _check_layout(client, "tiny-study", ids)
    # artifacts live beside the database, in their own folder (never uploaded with the db)
    assert (tmp_path / "mlartifacts").is_dir()
    assert not list((tmp_path / "mlartifacts").rglob("*.db"))
    table = _read_predictions(client, ids["eval"]["siteC"], tmp_path / "dl")
    assert len(table) == 16
    assert list(table.columns[:3]) == ["row", "image_key", "site"]
    assert {f"prob_{c}" for c in CLASSES} <= set(table.columns)
    assert not {"patient_id", "image", "mask"} & set(table.columns)
    assert not table.astype(str).apply(lambda c: c.str.contains("PID-")).any().any()
    # the logged model loads back and computes
    net = load_model(uri, ids["model"])
    assert net(torch.zeros(2, 4)).shape == (2, 3)
    assert mlflow.get_tracking_uri() == before  # MLflow's global URI is left as it was


def test_interrupt_and_privacy_violation_leave_no_run_running(tmp_path, store_uri):
    uri = store_uri
    df = _manifest("siteA", 6, 0)
    with pytest.raises(KeyboardInterrupt):  # noqa: SIM117 - the nesting is what is tested
        with StudyTracker("interrupted", {}, tracking_uri=uri) as st:
            with st.training_run("standard", 1, {}, df) as tr:
                train_id = tr.run_id
                raise KeyboardInterrupt
    client = MlflowClient(uri)
    assert client.get_run(train_id).info.status == "FAILED"
    assert client.get_run(st.run_id).info.status == "FAILED"
    assert client.get_run(train_id).data.tags["run.error"] == "KeyboardInterrupt"

    # SIGTERM (a scheduler stopping the job) fails the runs too, and the handler is restored
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):  # noqa: SIM117
        with StudyTracker("terminated", {}, tracking_uri=uri) as st_term:
            with st_term.training_run("standard", 1, {}, df) as tr_term:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the signal arrives before this ends
    assert client.get_run(tr_term.run_id).info.status == "FAILED"
    assert client.get_run(st_term.run_id).info.status == "FAILED"
    assert signal.getsignal(signal.SIGTERM) is before

    # a param holding a patient id is refused before anything is written, and the run fails
    with pytest.raises(PrivacyError, match="patient identifier"):  # noqa: SIM117
        with StudyTracker("leaky", {}, tracking_uri=uri) as st2:
            with st2.training_run("standard", 1, {"note": "hard case PID-siteA-00001"}, df):
                pass
    runs = client.search_runs([client.get_experiment_by_name("leaky").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("note" not in r.data.params for r in runs)

    # a caught child failure still marks the study FAILED; the study never reads FINISHED
    with StudyTracker("caught", {}, tracking_uri=uri) as st3:
        with pytest.raises(ValueError), st3.training_run("standard", 1, {}, df):
            raise ValueError("boom")
        with st3.training_run("standard", 2, {}, df) as ok:
            pass
    assert client.get_run(st3.run_id).info.status == "FAILED"
    assert client.get_run(ok.run_id).info.status == "FINISHED"

    # the tracking database itself is never uploaded as an artifact
    with (
        StudyTracker("upload", {}, tracking_uri=uri) as st4,
        st4.training_run("standard", 1, {}, df) as tr4,
    ):
        with pytest.raises(ValueError, match="tracking database"):
            tr4.log_artifact(tmp_path / "mlruns.db")
        with pytest.raises(ValueError, match="tracking database"):
            tr4.log_artifact(tmp_path)


def test_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(tmp_path / "eval")
    assert uri == f"sqlite:///{(tmp_path / 'eval').resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(tmp_path / "eval") == "http://127.0.0.1:5999"

    assert flatten_params({"a": {"b": 1, "c": [1, Path("x")]}, "d": None}) == {
        "a.b": "1",
        "a.c": '[1, "x"]',
        "d": "None",
    }
    assert len(flatten_params({"long": "x" * 7000})["long"]) == 6000

    assert_no_identifiers({"seed": "7", "lr": 0.1}, ["7A21", "7"][:1])  # "7A21" not present
    assert_no_identifiers({"seed": "17"}, ["7"])  # short ids match whole values only
    with pytest.raises(PrivacyError, match=r"value\['seed'\]"):
        assert_no_identifiers({"seed": "7"}, ["7"])
    with pytest.raises(PrivacyError, match="column 'path' contains"):
        assert_no_identifiers(pd.DataFrame({"path": ["a", "x/PAT123/y"]}), ["PAT123"])

    df = _manifest("siteA", 4, 0)
    safe = pseudonymous_frame(df, b"k1")
    assert list(safe.columns) == ["row", "image_key", "site", "label", "split", "bias"]
    assert safe["image_key"].nunique() == 4
    assert (pseudonymous_frame(df, b"k2")["image_key"] != safe["image_key"]).all()  # keyed
    assert_no_identifiers(safe, set(df["patient_id"]) | set(df["image"]))


# ----------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_study_against_real_server_with_crash_and_rerun(mlflow_server, tmp_path):
    url = mlflow_server.url()
    client = MlflowClient(url)
    name = "server-study-tracking"
    with pytest.raises(RuntimeError, match="injected crash"):
        _run_study(url, name, crash_dataset="siteA")
    exp = client.get_experiment_by_name(name)
    crashed = client.search_runs([exp.experiment_id])
    status = {r.data.tags["mlflow.runName"]: r.info.status for r in crashed}
    assert status["eval-isnet-seed0-siteA"] == "FAILED"
    assert status["train-isnet-seed0"] == "FINISHED"  # closed before the crash
    study_runs = [r for r in crashed if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in study_runs] == ["FAILED"]
    assert "eval-isnet-seed0-siteC" not in status  # never reached

    ids = _run_study(url, name)  # same names: new runs, nothing resumed
    old_ids = {r.info.run_id for r in crashed}
    assert ids["study"] not in old_ids and ids["train"] not in old_ids
    assert not set(ids["eval"].values()) & old_ids
    all_runs = client.search_runs([exp.experiment_id])
    assert len(all_runs) == len(crashed) + 4
    assert "RUNNING" not in {r.info.status for r in all_runs}
    for r in crashed:  # the crashed runs were not touched by the re-run
        assert client.get_run(r.info.run_id).info.status == r.info.status
    # the layout check over the re-run's runs only
    fresh = {r.info.run_id for r in all_runs} - old_ids
    assert fresh == {ids["study"], ids["train"], *ids["eval"].values()}
    for run_id in fresh:
        assert client.get_run(run_id).info.status == "FINISHED"
    _check_layout_subset(client, name, ids)
    table = _read_predictions(client, ids["eval"]["siteC"], tmp_path)
    assert len(table) == 16 and "patient_id" not in table.columns


def _check_layout_subset(client: MlflowClient, name: str, ids: dict) -> None:
    """:func:`_check_layout` restricted to the runs in ``ids`` (the experiment has old ones)."""

    class _Only:
        def __getattr__(self, item):
            return getattr(client, item)

        def search_runs(self, experiment_ids):
            wanted = {ids["study"], ids["train"], *ids["eval"].values()}
            return [r for r in client.search_runs(experiment_ids) if r.info.run_id in wanted]

    _check_layout(_Only(), name, ids)


# ----------------------------------------------------------------------------- the store check


class _Refusing:
    """A real HTTP server on localhost that answers every request like an MLflow >= 3.5 server
    whose --allowed-hosts does not name the host the client used (403)."""

    def __init__(self, status: int = 403, body: bytes = b"Invalid Host header"):
        import http.server
        import threading

        status_, body_ = status, body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                self.send_response(status_)
                self.send_header("Content-Length", str(len(body_)))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_store_check_says_why_a_store_cannot_be_used(tmp_path, store_uri):
    from pipeline.tracking import TrackingStoreError, check_tracking_store, ui_hint

    with _Refusing() as srv, pytest.raises(TrackingStoreError, match="--allowed-hosts"):
        check_tracking_store(srv.url)
    with (
        _Refusing(200, b"<html>not mlflow</html>") as srv,
        pytest.raises(TrackingStoreError, match="not as an MLflow tracking server"),
    ):
        check_tracking_store(srv.url)
    with _Refusing() as srv:
        closed = srv.url  # nothing listens there once the server is shut
    with pytest.raises(TrackingStoreError, match="no MLflow tracking server answers"):
        check_tracking_store(closed, timeout=2)
    check_tracking_store(store_uri)  # a fine local store passes
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlruns.db'}")  # created on first use
    # the UI: a server is its own UI; a SQLite store needs `mlflow ui` started on it
    assert ui_hint("http://mlflow.example:5000", "3", "abc") == (
        "open http://mlflow.example:5000/#/experiments/3/runs/abc in a browser "
        "(the tracking server serves the UI)"
    )
    assert f"ui --backend-store-uri {store_uri}" in ui_hint(store_uri)


def test_store_check_passes_on_a_real_server(mlflow_server):
    from pipeline.tracking import check_tracking_store

    check_tracking_store(mlflow_server.url())


def test_evaluation_rows_are_test_rows_and_each_run_has_its_heatmaps(tmp_path, store_uri):
    """An external site's rows carry their own manifest's split (train/val/test); in its
    evaluation run they are all test rows."""
    df = _manifest("siteC", 8, 3).assign(split=["train", "val", "test", "train"] * 2)
    train_df = _manifest("siteA", 6, 0)
    rng = np.random.default_rng(0)
    examples = [(rng.random((8, 8)), np.ones((8, 8), bool), rng.normal(size=(8, 8)))]
    with (
        StudyTracker("splits", {}, tracking_uri=store_uri) as st,
        st.training_run("isnet", 0, {}, train_df) as tr,
        st.evaluation_run(tr.run_id, None, "siteC", "external", df) as ev,
    ):
        probs, labels = _fake_predictions(df, 1)
        ev.log_predictions(probs, labels, CLASSES)
        ev.log_heatmaps(examples)
    client = MlflowClient(store_uri)
    table = _read_predictions(client, ev.run_id, tmp_path)
    assert set(table["split"]) == {"test"}
    assert "heatmaps.png" in {a.path for a in client.list_artifacts(ev.run_id)}


@pytest.mark.slow
def test_store_check_names_allowed_hosts_for_a_real_refusing_server(tmp_path, migrated_db):
    """A real `mlflow server` whose --allowed-hosts does not name the host the client uses
    answers 403; the check says so (and what to set) instead of a raw MlflowException."""
    import shutil

    from pipeline.tracking import TrackingStoreError, check_tracking_store
    from tests.mlflow_support import _free_port, _Server, start_server

    shutil.copy(migrated_db, tmp_path / "s.db")
    port = _free_port()
    allowed = f"mlflow-host,mlflow-host:{port}"
    proc = start_server(tmp_path / "s.db", port, tmp_path / "log", "--allowed-hosts", allowed)
    try:
        deadline = time.monotonic() + 90
        while True:  # /health answers 403 too: wait until the port answers at all
            try:
                check_tracking_store(f"http://127.0.0.1:{port}", timeout=2)
                raise AssertionError("the server accepted a host it was not told to allow")
            except TrackingStoreError as err:
                if "HTTP 403" in str(err):
                    assert "--allowed-hosts" in str(err)
                    break
                assert time.monotonic() < deadline, _Server(
                    proc, port, tmp_path / "log"
                )._log_tail()
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
