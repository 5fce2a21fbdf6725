"""How a cross-dataset study is laid out in MLflow (read in the MLflow UI).

Layout (one experiment per study name)::

    study run  "<study>-<YYYYmmdd-HHMMSS>-<hex>"   tags study.name, code.version; params = config
      training run  "train-<method>-seed<seed>"    tags method, seed, train.datasets
        |  input: training dataset (context "training"), output: the logged model (model_id)
        evaluation run  "eval-<method>-seed<seed>-<dataset>"
              tags eval.dataset, eval.kind, train.run_id, eval.model_id (+ method, seed)
              inputs: evaluation dataset (context "evaluation") and the model
              metrics logged with dataset= and model_id= (the model page lists every dataset)
              artifacts: predictions.csv, confusion.png, roc.png

Every run is created fresh with :class:`mlflow.MlflowClient` and explicit run ids (never resumed
by name, never through the fluent active-run stack). An exception (KeyboardInterrupt included;
SIGTERM is turned into SystemExit while a study is open in the main thread) inside a run's
``with`` block marks that run and every run still open above it FAILED and re-raises; a normal
exit marks it FINISHED (or FAILED when a child failed inside it).

Privacy: datasets and prediction tables logged here keep only an allow-list of columns
(:data:`SAFE_COLUMNS`) plus ``row`` and a keyed pseudonymous ``image_key``; no patient id or image
path is written. Every param, tag, metric name and table written is checked against the
patient ids of the frames given (:func:`assert_no_identifiers`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from cxr_io.privacy import (
    assert_no_identifiers,
    identifiers_of,
    pseudonymous_frame,
)
from cxr_io.settings import Settings
from evaluation.metrics import metric_safe_names
from evaluation.report import plot_confusion, plot_heatmap_grid, plot_roc
from pipeline.predictor import WEIGHT_NAMES

_log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DB_NAME = "mlruns.db"
ARTIFACT_DIR_NAME = "mlartifacts"
EVAL_KINDS = ("internal", "external", "biased", "unbiased", "confounding")
#: Artifact folder of a training run that holds its model artifact (weights + model.json).
MODEL_ARTIFACT = "model_artifact"
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch call


def unique_run_name(prefix: str) -> str:
    """``<prefix>_<YYYYmmdd-HHMMSS>_<6 hex>``: a name no earlier run has, so a MONAI bundle run
    never writes into an old MLflow run of the same name."""
    return f"{prefix}_{datetime.now().strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"


class FailRunOnError:
    """Ignite handler for bundle workflows tracked by MONAI's ``MLFlowHandler``: when the engine
    raises, mark the MLflow run(s) named ``run_name`` that are still ``RUNNING`` as ``FAILED``,
    then re-raise. Does nothing when tracking is off (no store)."""

    def __init__(self, tracking_uri: str | None, run_name: str | None):
        self.tracking_uri, self.run_name = tracking_uri, run_name

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def _store_exists(self) -> bool:
        path = sqlite_path(self.tracking_uri or "")
        return path.is_file() if path is not None else bool(self.tracking_uri)

    def __call__(self, engine: Any, exc: BaseException) -> None:
        try:
            if self.run_name and self._store_exists():
                from mlflow import MlflowClient

                client = MlflowClient(self.tracking_uri)
                for exp in client.search_experiments():
                    runs = client.search_runs(
                        [exp.experiment_id],
                        filter_string=f"attributes.run_name = '{self.run_name}' "
                        "and attributes.status = 'RUNNING'",
                    )
                    for run in runs:
                        client.set_terminated(run.info.run_id, "FAILED")
        except Exception:  # never hide the original error behind a tracking error
            _log.exception("could not mark the MLflow run %s as FAILED", self.run_name)
        raise exc


def resolve_tracking_uri(default_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs default_dir>/mlruns.db``.

    MLflow >= 3.13 refuses a plain ``./mlruns`` file store; a SQLite file is the local default.
    The folder is created. Artifacts of a local store go to ``<default_dir>/mlartifacts`` (see
    :func:`artifact_root_for`), never to a folder that is uploaded with the database in it.
    """
    uri = os.environ.get(ENV_TRACKING_URI, "").strip()
    if uri:
        return uri
    folder = Path(default_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DB_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def artifact_root_for(uri: str) -> str | None:
    """Artifact location for new experiments: ``file://<db folder>/mlartifacts`` for SQLite.

    None for a tracking server (the server decides, e.g. its ``--artifacts-destination``).
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / ARTIFACT_DIR_NAME).resolve().as_uri()


def code_version(repo: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this package, or ``"unknown"``."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else "unknown"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}``; lists/tuples as JSON, values as strings.

    Values longer than MLflow's 6000-character limit are cut with a ``...[truncated]`` marker.
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple)):
            text = json.dumps([str(v) if isinstance(v, Path) else v for v in value], default=str)
        else:
            text = str(value)
        if len(text) > _PARAM_VALUE_MAX:
            text = text[: _PARAM_VALUE_MAX - 14] + "...[truncated]"
        out[name] = text
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


@contextlib.contextmanager
def _scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent functions (used by ``mlflow.pytorch.log_model``) at ``uri``.

    MLflow keeps the fluent tracking URI in module state; this sets it for the duration of the
    block only and restores the previous value (also on error).
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with tracking_utils._use_tracking_uri(uri):
        yield


def log_dataset(
    client: Any,
    run_id: str,
    df: pd.DataFrame,
    name: str,
    context: str,
    *,
    secret: bytes,
    forbidden: Iterable[str] = (),
) -> Any:
    """Log the pseudonymous view of manifest frame ``df`` (:func:`pseudonymous_frame`: no patient
    ids, no paths) as an input of ``run_id`` with ``mlflow.data.context`` = ``context``.

    Returns:
        The MLflow dataset (its ``name`` and ``digest`` tie metrics to it).

    Raises:
        PrivacyError: something to be logged holds a patient identifier.
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    known = set(forbidden) | identifiers_of(df)
    safe = pseudonymous_frame(df, secret)
    assert_no_identifiers(safe, known)
    with warnings.catch_warnings():  # the schema hint about integer columns is noise here
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        ds = mlflow.data.from_pandas(safe, name=name, targets="label")
        entity = ds._to_mlflow_entity()
    assert_no_identifiers([entity.source, entity.schema, entity.profile], known)
    tags = [InputTag(key="mlflow.data.context", value=context)]
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])
    return ds


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_model(tracking_uri: str, model_id: str) -> Any:
    """Load a logged torch model (``models:/<model_id>``) from the given store.

    The model is stored with pickle: load only from a store you trust.
    """
    import mlflow.pytorch

    with _scoped_tracking_uri(tracking_uri):
        return mlflow.pytorch.load_model(f"models:/{model_id}")


class RunHandle:
    """One open MLflow run; logs through the client with this run's id."""

    def __init__(self, tracker: StudyTracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id

    @property
    def client(self):
        return self.tracker.client

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (NaN allowed) at ``step`` (e.g. the epoch)."""
        self._log_metric_batch(metrics, step)

    def _log_metric_batch(
        self, metrics: Mapping[str, float], step: int | None, **metric_kwargs: Any
    ) -> None:
        from mlflow.entities import Metric

        self.tracker.check_private(list(metrics))
        ts = _now_ms()
        entries = [
            Metric(str(k), float(v), ts, int(step or 0), run_id=self.run_id, **metric_kwargs)
            for k, v in metrics.items()
        ]
        for i in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[i : i + 1000], synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker._log_params(self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.check_private(tags)
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file (never the tracking database or a folder holding it)."""
        self.tracker._refuse_store_upload(Path(path))
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, df: pd.DataFrame, artifact_file: str) -> None:
        """Write ``df`` as CSV and upload it, after the privacy check."""
        self.tracker.check_private(df)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            df.to_csv(path, index=False)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_dataset(self, df: pd.DataFrame, name: str, context: str) -> Any:
        """Log the pseudonymous view of ``df`` as a run input; returns the MLflow dataset."""
        return log_dataset(
            self.client,
            self.run_id,
            df,
            name,
            context,
            secret=self.tracker.secret,
            forbidden=self.tracker.forbidden,
        )


class TrainingRun(RunHandle):
    """A training run: per-epoch metrics, the training dataset and the model."""

    def log_pyfunc_model(
        self, folder: str | os.PathLike, *, name: str, register: bool = True
    ) -> str:
        """Log a training folder (weights + ``model.json``) as an MLflow 3 logged model of this
        run, named ``name`` (the method), in the pyfunc flavour (:class:`CXRClassifierModel`),
        with a signature, an input example, the class names and the model card as metadata,
        and the project as a pip requirement; registered as a new version of
        :func:`registered_name` when ``register``. Returns its ``model_id``.
        """
        import mlflow.pyfunc
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.types import Schema, TensorSpec

        from classification.model_card import read_model_card

        folder = Path(folder)
        weights = next((folder / w for w in WEIGHT_NAMES if (folder / w).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no model weights ({', '.join(WEIGHT_NAMES)})")
        card = read_model_card(weights)
        example = np.full((1, 1, card.size, card.size), 0.5, dtype=np.float32)
        wrapper = CXRClassifierModel()
        wrapper.load_context(type("Ctx", (), {"artifacts": {MODEL_ARTIFACT: str(folder)}})())
        # any image size is accepted (the Predictor resizes to the card's size)
        signature = infer_signature(example, wrapper.predict(None, example))
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
            outputs=signature.outputs,
        )
        logged = self.client.create_logged_model(
            experiment_id=self.tracker.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags={**self.model_tags, "mlflow.user": _user(), "classes": ",".join(card.classes)},
        )
        with tempfile.TemporaryDirectory() as tmp:  # only the artifact's files travel
            art = Path(tmp) / MODEL_ARTIFACT
            art.mkdir()
            for f in (weights, folder / "model.json"):
                (art / f.name).write_bytes(f.read_bytes())
            with (
                _scoped_tracking_uri(self.tracker.uri),
                warnings.catch_warnings(),
                _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),  # no bar per model
            ):
                warnings.simplefilter("ignore")
                mlflow.pyfunc.log_model(
                    name=name,
                    python_model=wrapper.__class__(),
                    artifacts={MODEL_ARTIFACT: str(art)},
                    signature=signature,
                    input_example=example,
                    pip_requirements=project_requirements(),
                    metadata={"classes": list(card.classes), "model_card": card.to_dict()},
                    model_id=logged.model_id,
                    registered_model_name=registered_name(name) if register else None,
                )
        self.model_id = logged.model_id
        self.client.set_tag(self.run_id, "train.model_id", logged.model_id)
        return logged.model_id

    def __init__(self, tracker: StudyTracker, run_id: str, model_tags: Mapping[str, str]):
        super().__init__(tracker, run_id)
        self.model_tags = dict(model_tags)
        self.model_id: str | None = None

    def log_model_folder(
        self, folder: str | os.PathLike, artifact_path: str = MODEL_ARTIFACT
    ) -> str:
        """Log a training folder's model artifact (weights + ``model.json``) under
        ``artifact_path``; returns the URI :meth:`pipeline.predictor.Predictor.load` takes."""

        folder = Path(folder)
        for name in (*WEIGHT_NAMES, "model.json"):
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name), artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def log_model(self, model: Any, *, name: str = "model") -> str:
        """Log a torch module as an MLflow 3 logged model of this run; returns its ``model_id``.

        The model carries the run's ``method``, ``seed`` and ``train.datasets`` tags, so the
        experiment's model list can be filtered like the runs.
        """
        import mlflow.pytorch
        import torch

        logged = self.client.create_logged_model(
            experiment_id=self.tracker.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags={**self.model_tags, "mlflow.user": _user()},
        )
        # pickle: the LRP-ready modules are plain torch code; MLflow's warning about it is
        # documented in docs/study.md instead of printed for every model
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with _scoped_tracking_uri(self.tracker.uri):
                mlflow.pytorch.log_model(
                    model,
                    name=name,
                    model_id=logged.model_id,
                    run_id=self.run_id,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    serialization_format="pickle",
                )
        finally:
            quiet.setLevel(level)
        self.model_id = logged.model_id
        self.client.set_tag(self.run_id, "train.model_id", logged.model_id)
        return logged.model_id


# MLflow warns at class creation about predict()'s missing type hints; the signature given at
# logging time validates the input instead
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)

    class CXRClassifierModel(PythonModel):
        """A model artifact (weights + ``model.json``) as an MLflow pyfunc model: the same
        :class:`~pipeline.predictor.Predictor` path as every other door (lung masks from the
        packaged U-Net where the method needs them).

        Input: radiographs in [0, 1], an array ``[N, 1, H, W]`` or ``[N, H, W]`` (float32; any
        ``H, W``: they are resized to the card's size). Output: a DataFrame with one
        ``prob_<class>`` column per class (the card's output order) and ``label``.
        Needs only the installed ``isnet-cxr`` package to load (``mlflow.pyfunc.load_model``).
        """

        def load_context(self, context: Any) -> None:
            from pipeline.predictor import Predictor

            self.predictor = Predictor.load(context.artifacts[MODEL_ARTIFACT])

        def predict(self, context, model_input, params=None):  # noqa: ANN001
            if isinstance(model_input, dict):  # a named-tensor input
                model_input = next(iter(model_input.values()))
            x = np.asarray(model_input, dtype=np.float32)
            if x.ndim == 3:
                x = x[:, None]
            if x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(f"expected images [N, 1, H, W] or [N, H, W], got {x.shape}")
            preds = self.predictor.predict([self.predictor.read(im) for im in x], heatmaps=False)
            classes = list(self.predictor.classes)
            frame = pd.DataFrame(
                np.stack([p.probs for p in preds]).astype(np.float64),
                columns=[f"prob_{c}" for c in metric_safe_names(classes)],
            )
            frame["label"] = [p.label for p in preds]
            return frame


def project_requirements() -> list[str]:
    """pip requirements of a logged model: this project (it holds the model code) and the
    torch it was trained with."""
    import torch

    from classification.model_card import package_version

    version = package_version()
    project = f"isnet-cxr=={version}" if version and version != "unknown" else "isnet-cxr"
    return [project, f"torch=={torch.__version__.split('+')[0]}"]


def registered_name(method: str) -> str:
    """The Model Registry name of a method's models (one registered model per method)."""
    return f"isnet-cxr-{method}"


class EvaluationRun(RunHandle):
    """An evaluation run of one model on one dataset."""

    def __init__(self, tracker, run_id, *, model_id, dataset, frame: pd.DataFrame, method: str):
        super().__init__(tracker, run_id)
        self.model_id = model_id
        self.dataset = dataset
        self.frame = frame
        self.method = method

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics attached to this run's dataset and model (shown on the model page)."""
        self._log_metric_batch(
            metrics,
            step,
            model_id=self.model_id,
            dataset_name=self.dataset.name,
            dataset_digest=self.dataset.digest,
        )

    def log_predictions(
        self, probs: np.ndarray, labels: np.ndarray, class_names: list[str]
    ) -> pd.DataFrame:
        """Upload ``predictions.csv``, ``confusion.png`` and ``roc.png``.

        Args:
            probs: ``[N, K]`` softmax outputs, rows in the order of the evaluation frame.
            labels: ``[N]`` true class indices. class_names: ``K`` names.

        Returns:
            The predictions table written (``row, image_key, site, ..., label_index, pred,
            prob_<class>``; no patient ids or paths).
        """

        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels)
        if probs.shape != (len(self.frame), len(class_names)) or labels.shape != (len(probs),):
            raise ValueError(
                f"predictions for {len(self.frame)} images x {len(class_names)} classes expected; "
                f"got probs {probs.shape} and labels {labels.shape}"
            )
        table = pseudonymous_frame(self.frame, self.tracker.secret)
        table["label_index"] = labels.astype(int)
        table["pred"] = probs.argmax(axis=1)
        for k, c in enumerate(metric_safe_names(class_names)):
            table[f"prob_{c}"] = probs[:, k]
        self.tracker.check_private(table, extra=identifiers_of(self.frame))
        self.log_table(table, "predictions.csv")
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{self.method} on {self.dataset.name}"
            cm = plot_confusion(
                labels, table["pred"].to_numpy(), class_names, Path(tmp) / "c.png", title=title
            )
            roc = plot_roc(
                {self.method: probs}, labels, class_names, Path(tmp) / "roc.png", title=title
            )
            self.client.log_artifact(self.run_id, str(cm.rename(cm.with_name("confusion.png"))))
            self.client.log_artifact(self.run_id, str(roc))
        return table

    def log_heatmaps(self, examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Upload ``heatmaps.png``: image, lung mask and this model's |LRP| heatmap for each
        example ``(image [S, S], mask [S, S], heatmap [S, S])`` (:func:`plot_heatmap_grid`)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_heatmap_grid(
                [(self.method, list(examples))],
                Path(tmp) / "heatmaps.png",
                title=f"{self.method} on {self.dataset.name}",
            )
            self.client.log_artifact(self.run_id, str(path))


class StudyTracker:
    """One execution of a study in MLflow: an experiment per study, a new parent run per call.

    Example::

        with StudyTracker("site-shift", config, default_dir=out) as study:
            with study.training_run("isnet", 0, params, train_df) as tr:
                tr.log_metrics({"loss": 0.3}, step=1)
                model_id = tr.log_model(net)
            with study.evaluation_run(tr.run_id, model_id, "siteC", "external", df) as ev:
                ev.log_metrics(evaluate(...).as_dict())
                ev.log_predictions(probs, labels, classes)

    Args:
        name: experiment name (the study). config: everything needed to rerun (flattened into
        params of the study run). tracking_uri: default :func:`resolve_tracking_uri`
        (``default_dir``). forbidden: extra patient identifiers never to write.
        settings: gives the pseudonymisation secret for ``image_key``.
    """

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        *,
        default_dir: str | os.PathLike = "eval",
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        forbidden: Iterable[str] = (),
        settings: Settings | None = None,
        handle_sigterm: bool = True,
    ):
        from mlflow import MlflowClient

        if not name or not str(name).strip():
            raise ValueError("a study needs a non-empty name (the MLflow experiment name)")
        self.name = str(name)
        self.config = dict(config or {})
        self.uri = tracking_uri or resolve_tracking_uri(default_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.extra_tags = dict(tags or {})
        self.forbidden: set[str] = {str(f) for f in forbidden}
        self.secret = (settings or Settings.from_env()).pseudonym_secret()
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._open: list[str] = []
        self._failed: set[str] = set()
        self._handle_sigterm = handle_sigterm
        self._old_sigterm: Any = None

    # ------------------------------------------------------------------ privacy and params
    def check_private(self, values: Any, extra: Iterable[str] = ()) -> None:
        """Raise :class:`PrivacyError` if ``values`` hold a known patient identifier."""
        assert_no_identifiers(values, self.forbidden | set(extra))

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        self.check_private(flat)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH], synchronous=True)

    def _refuse_store_upload(self, path: Path) -> None:
        db = sqlite_path(self.uri)
        if db is None:
            return
        path, db = path.resolve(), db.resolve()
        if path == db or (path.is_dir() and db.is_relative_to(path)):
            raise ValueError(
                f"refusing to upload {path}: it is or holds the tracking database {db}. "
                "Log individual result files instead."
            )

    # ------------------------------------------------------------------ runs
    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ValueError(
                    f"MLflow experiment {self.name!r} is deleted; restore it in the UI "
                    "(or `mlflow experiments restore`) or choose another study name."
                )
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(
                self.name,
                artifact_location=artifact_root_for(self.uri),
                # the UI then opens on its model-training views, not the GenAI ones
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        except MlflowException:  # created meanwhile by a concurrent study of the same name
            exp = self.client.get_experiment_by_name(self.name)
            if exp is None:
                raise
            return exp.experiment_id

    def _new_run(self, run_name: str, parent: str | None, tags: Mapping[str, Any]) -> str:
        all_tags = {str(k): str(v) for k, v in tags.items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        self.check_private(all_tags)
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
        return run.info.run_id

    def _fail_open_runs(self, exc: BaseException) -> None:
        for rid in reversed(self._open):
            self._failed.add(rid)
            try:
                self.client.set_tag(rid, "run.error", type(exc).__name__)
                self.client.set_terminated(rid, "FAILED")
            except Exception as err:  # never hide the original error
                _log.error("could not mark MLflow run %s FAILED: %s", rid, err)

    @contextlib.contextmanager
    def _managed(self, run_id: str) -> Iterator[None]:
        self._open.append(run_id)
        try:
            yield
        except BaseException as exc:
            self._fail_open_runs(exc)
            raise
        else:
            status = "FAILED" if run_id in self._failed else "FINISHED"
            self.client.set_terminated(run_id, status)
        finally:
            self._open.remove(run_id)

    def __enter__(self) -> StudyTracker:
        self.experiment_id = self._experiment()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        tags = {
            "study.name": self.name,
            "code.version": (sha := code_version()),
            "mlflow.source.git.commit": sha,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "",
            "mlflow.user": _user(),
            **self.extra_tags,
        }
        self.run_id = self._new_run(f"{self.name}-{stamp}-{uuid.uuid4().hex[:6]}", None, tags)
        self._open.append(self.run_id)
        self._install_sigterm()
        try:
            self._log_params(self.run_id, self.config)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id not in self._open:
            return False
        try:
            if exc is not None:
                self._fail_open_runs(exc)
            else:
                status = "FAILED" if self.run_id in self._failed else "FINISHED"
                self.client.set_terminated(self.run_id, status)
        finally:
            self._open.remove(self.run_id)
            self._restore_sigterm()
        return False

    def _install_sigterm(self) -> None:
        """While the study is open, SIGTERM (e.g. from a job scheduler) raises SystemExit in the
        main thread, so the open runs are marked FAILED instead of being left RUNNING. The
        previous handler is restored when the study closes."""
        if not self._handle_sigterm or threading.current_thread() is not threading.main_thread():
            return

        def _raise(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, _raise)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _require_open(self) -> str:
        if self.run_id is None or self.run_id not in self._open:
            raise RuntimeError("use StudyTracker as a context manager: `with StudyTracker(...)`")
        return self.run_id

    def study_run(self) -> RunHandle:
        """The open study (parent) run, e.g. to attach the report."""
        return RunHandle(self, self._require_open())

    @contextlib.contextmanager
    def training_run(
        self,
        method: str,
        seed: int,
        params: Mapping[str, Any],
        train_df: pd.DataFrame,
        *,
        dataset_name: str | None = None,
    ) -> Iterator[TrainingRun]:
        """A child run for training one model (``method`` with ``seed``) on ``train_df``.

        ``train_df`` is a manifest frame (columns ``site``, ``label``, ...); only its
        pseudonymous view is logged (input context ``"training"``).
        """
        parent = self._require_open()
        sites = sorted({str(s) for s in train_df["site"]}) if "site" in train_df else []
        tags = {
            "study.name": self.name,
            "method": method,
            "seed": seed,
            "train.datasets": ",".join(sites),
            "train.n_images": len(train_df),
        }
        self.forbidden |= identifiers_of(train_df)
        run_id = self._new_run(f"train-{method}-seed{seed}", parent, tags)
        with self._managed(run_id):
            handle = TrainingRun(self, run_id, {k: str(v) for k, v in tags.items()})
            self._log_params(run_id, {"method": method, "seed": seed, **dict(params)})
            handle.log_dataset(train_df, dataset_name or f"train-{'+'.join(sites)}", "training")
            yield handle

    @contextlib.contextmanager
    def evaluation_run(
        self,
        train_run_id: str | None,
        model_id: str | None,
        dataset_name: str,
        kind: str,
        df: pd.DataFrame,
    ) -> Iterator[EvaluationRun]:
        """A run evaluating ``model_id`` on ``df``, a child of ``train_run_id`` (or the study).

        Args:
            kind: one of :data:`EVAL_KINDS`.
        """
        study = self._require_open()
        if kind not in EVAL_KINDS:
            raise ValueError(f"evaluation kind {kind!r} is not one of {EVAL_KINDS}")
        train_tags: dict[str, str] = {}
        if train_run_id:
            train_tags = self.client.get_run(train_run_id).data.tags
        method, seed = train_tags.get("method", "model"), train_tags.get("seed", "")
        tags = {
            "study.name": self.name,
            "eval.dataset": dataset_name,
            "eval.kind": kind,
            "eval.n_images": len(df),
            "train.run_id": train_run_id or "",
            "eval.model_id": model_id or "",
            "method": method,
            "seed": seed,
        }
        run_name = f"eval-{method}-seed{seed}-{dataset_name}" if seed else f"eval-{dataset_name}"
        self.forbidden |= identifiers_of(df)
        if "split" in df.columns:  # every row of an evaluation set is a test row here
            df = df.assign(split="test")
        run_id = self._new_run(run_name, train_run_id or study, tags)
        with self._managed(run_id):
            tmp = RunHandle(self, run_id)
            ds = tmp.log_dataset(df, dataset_name, "evaluation")
            if model_id:
                from mlflow.entities import LoggedModelInput

                self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
            yield EvaluationRun(
                self, run_id, model_id=model_id, dataset=ds, frame=df, method=method
            )


# ---------------------------------------------------------------------------------- the store


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be used (the message says why and what to do)."""


def _http_probe(uri: str, timeout: float) -> None:
    """GET one experiment from an MLflow server; raise :class:`TrackingStoreError` with a plain
    reason (no server, refused, not MLflow) instead of MLflow's retried raw exception."""
    import base64
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url)
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pw = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        basic = base64.b64encode(f"{user}:{pw}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        body = err.read()[:300].decode(errors="replace").strip()
        hint = {
            401: "it asks for credentials: set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN)",
            403: "it refuses this client. MLflow servers (3.17 here) answer 403 to a Host "
            "header they were not told to accept: start the server with --allowed-hosts naming "
            "the host this URI uses (README, 'A shared MLflow server'), or check its auth rules",
            404: "there is no MLflow tracking API at this address (wrong port or path?)",
        }.get(err.code, "the server answered with an error")
        raise TrackingStoreError(
            f"MLflow tracking server {uri} answered HTTP {err.code}: {hint}. Server said: {body!r}"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingStoreError(
            f"no MLflow tracking server answers at {uri} ({reason}). Start one "
            "(`mlflow server ...`), fix MLFLOW_TRACKING_URI, or unset it to log to a local "
            "SQLite store"
        ) from None
    except json.JSONDecodeError:
        raise TrackingStoreError(
            f"{uri} answered, but not as an MLflow tracking server (no JSON); check the URI"
        ) from None


def check_tracking_store(uri: str, *, timeout: float = 10.0) -> None:
    """Make sure the tracking store at ``uri`` can be written to, before any heavy work.

    A ``http(s)://`` server is asked for one experiment (``timeout`` seconds, no retries); a
    ``sqlite:///`` store is opened (created and migrated when new) in a folder that must be
    writable; other stores are opened through MLflow.

    Raises:
        TrackingStoreError: the store cannot be used; the message says why and what to do.
    """
    if uri.startswith(("http://", "https://")):
        _http_probe(uri, timeout)
        return
    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingStoreError(
                f"cannot create the MLflow store folder {folder}: {err}"
            ) from None
        if not os.access(folder, os.W_OK):
            raise TrackingStoreError(f"the MLflow store folder {folder} is not writable")
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingStoreError(f"cannot open the MLflow tracking store {uri}: {err}") from err


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at the runs of ``uri``: a server is its own UI (open its address, deep-linked
    to the run when given); a SQLite store needs ``mlflow ui`` started on it."""
    if uri.startswith(("http://", "https://")):
        link = uri.rstrip("/")
        if experiment_id:
            link += f"/#/experiments/{experiment_id}"
            if run_id:
                link += f"/runs/{run_id}"
        return f"open {link} in a browser (the tracking server serves the UI)"
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_exe) if mlflow_exe.is_file() else "mlflow"
    return (
        f"{exe} ui --backend-store-uri {uri} --port 5000   "
        "(then open http://127.0.0.1:5000; add --host 0.0.0.0 --allowed-hosts <name> to let "
        "other machines in)"
    )


# ---------------------------------------------------------------------------------- bundles


def _is_rank0() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        return True


class BundleRunLogger:
    """Ignite handler for training bundles run with ``--tracking mlflow``: when training
    completes, add to the MLflow run that MONAI's ``MLFlowHandler`` opened under ``run_name``
    the bundle's resolved settings as params, the model artifact (``model_files`` under
    ``model_artifact/``) and the training dataset (the pseudonymous view of ``records``, context
    ``"training"``). Does nothing when tracking is off (no such run), and only on rank 0.

    Args:
        tracking_uri, run_name: where MONAI's handler logs (the bundle's ids of those names).
        params: resolved settings (nested dicts are flattened to ``a.b`` names).
        model_files: files of the model artifact, as paths (names kept) or as a mapping
            ``{name in the artifact: path}`` (e.g. ``{"model.pt": ".../best_model.pt",
            "model.json": ...}``, the model-zoo name); missing ones are skipped.
        records: the training data dicts (``image``, ``label``, ``site``, ``patient_id``, ...)
            or a manifest CSV path.
        dataset_name: the MLflow dataset name.
        splits, sites: keep only these rows of a manifest given as ``records`` (None: all).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_name: str | None,
        params: Mapping[str, Any] | None = None,
        model_files: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] = (),
        records: Sequence[Mapping[str, Any]] | str | os.PathLike | None = None,
        dataset_name: str = "training",
        settings: Settings | None = None,
        splits: Sequence[str] | None = None,
        sites: Sequence[str] | None = None,
    ) -> None:
        self.tracking_uri, self.run_name = tracking_uri, run_name
        self.params = dict(params or {})
        if isinstance(model_files, Mapping):
            self.model_files = {str(k): Path(v) for k, v in model_files.items()}
        else:
            self.model_files = {Path(f).name: Path(f) for f in model_files}
        self.records = records
        self.dataset_name = dataset_name
        self.settings = settings
        self.splits, self.sites = splits, sites

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def _frame(self) -> pd.DataFrame | None:
        if self.records is None:
            return None
        if isinstance(self.records, (str, os.PathLike)):
            frame = pd.read_csv(self.records, dtype=str, keep_default_na=False)
            if self.splits is not None and "split" in frame:
                frame = frame[frame["split"].isin(list(self.splits))]
            if self.sites is not None and "site" in frame:
                frame = frame[frame["site"].isin(list(self.sites))]
            return frame
        frame = pd.DataFrame([dict(r) for r in self.records])
        if frame.empty:
            return None
        if "label_name" in frame:  # to_records: label is the class index, label_name its name
            frame["label"] = frame["label_name"]
        keep = [c for c in frame.columns if frame[c].map(pd.api.types.is_scalar).all()]
        return frame[keep]

    def find_run(self) -> str | None:
        """The id of the newest run named ``run_name`` (None when tracking is off)."""
        if not self.run_name or not self.tracking_uri:
            return None
        db = sqlite_path(self.tracking_uri)
        if db is not None and not db.is_file():
            return None
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        name = self.run_name.replace("'", "")
        for exp in client.search_experiments():
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"attributes.run_name = '{name}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                return runs[0].info.run_id
        return None

    def __call__(self, engine: Any = None) -> str | None:
        """Log to the run; returns its id (None when there is none)."""
        if not _is_rank0():
            return None
        run_id = self.find_run()
        if run_id is None:
            return None
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(self.tracking_uri)
        frame = self._frame()
        forbidden = identifiers_of(frame)
        existing = set(client.get_run(run_id).data.params)
        flat = {k: v for k, v in flatten_params(self.params).items() if k not in existing}
        assert_no_identifiers(flat, forbidden)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[i : i + _BATCH], synchronous=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name, f in self.model_files.items():
                if not f.is_file():
                    continue
                if f.name != name:  # upload under its artifact name
                    f = Path(tmp) / name
                    f.write_bytes(self.model_files[name].read_bytes())
                client.log_artifact(run_id, str(f), MODEL_ARTIFACT)
        if frame is not None:
            secret = (self.settings or Settings.from_env()).pseudonym_secret()
            log_dataset(
                client,
                run_id,
                frame,
                self.dataset_name,
                "training",
                secret=secret,
                forbidden=forbidden,
            )
        return run_id
