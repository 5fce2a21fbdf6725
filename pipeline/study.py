"""Cross-dataset generalisation studies: train every method on some sites, test on the others.

A study (:class:`StudyConfig`, read from a JSON file in ``configs/``) runs:

1. data: the manifests it names, or the embedded synthetic multi-site set (plus the biased /
   unbiased / confounding test sets of one training site) generated into the output folder;
2. masks: rows without a lung mask get one from the segmentation stage (or every row, with
   ``masks="segmenter"``);
3. training: every (fold, method, seed) on the training sites' ``train`` rows, model selection on
   their ``val`` rows (a finished model is reused when the study is run again: resumable);
   with ``workers`` > 1, that many models train at once, each in its own process, while
   this process evaluates (step 4) each model as soon as it is trained;
4. evaluation: every model on the internal test split, each external site and each bias set,
   with bootstrap CIs over patients, LRP background-relevance metrics, and paired bootstrap tests
   of ISNet against each comparator;
5. evidence: MLflow runs (:class:`pipeline.tracking.StudyTracker`), ``results.csv``,
   ``paired_tests.csv``, figures and a self-contained ``report.html``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from classification.inputs import resize_image, resize_mask
from classification.model_card import load_model
from classification.train import (
    LR_SCHEDULES,
    TrainConfig,
    TrainResult,
    method_needs_masks,
    resolve_augment,
    resolve_select,
    train,
)
from cxr_io.determinism import torch_threads
from cxr_io.manifest import class_names, load_manifest, select, to_records
from cxr_io.readers import load_mask, surfaced_read_errors
from cxr_io.resources import default_segmenter
from evaluation.metrics import evaluate, paired_bootstrap_seeds
from evaluation.report import (
    headline_metrics,
    paired_table,
    plot_heatmap_grid,
    plot_roc,
    study_conclusion,
    summarise_runs,
    table_caption,
    write_report,
)
from pipeline.predictor import Predictor
from pipeline.tracking import (
    StudyTracker,
    TrainingRun,
    check_tracking_store,
    resolve_tracking_uri,
)
from segmentation.masks_step import write_masks
from synthetic import (
    SiteConfig,
    bias_free_sites,
    blind_site,
    default_sites,
    make_bias_test_sets,
    make_dataset,
    portable_site,
    render_pool,
)

BIAS_KINDS = ("biased", "unbiased", "confounding")
#: Site-name suffix of the training sites re-rendered without markers (the bias-free reference).
NO_MARKERS = "-no-markers"
TRAIN_DATA = ("study", "no_markers")


@dataclass(frozen=True)
class MethodSpec:
    """One method to compare: a :func:`classification.methods.build_method` name and params.

    ``train_data``: ``"study"`` (the fold's training sites) or ``"no_markers"``: the same
    patients re-rendered without background markers (embedded synthetic data only). The
    standard classifier trained on those is the bias-free reference: what a full-image model
    learns when there is no shortcut, evaluated on the same test sets as every other method.

    An ISNet's ``params`` may name a ``teacher``: the label of a ``segment_then_classify``
    method of the same study (same training data); each ISNet then distils from that method's
    model of the same fold and seed (:class:`classification.methods.ISNet`), which the study
    trains first.

    ``train``: training settings for this method only, over the study's ``train`` block (same
    keys as :class:`~classification.train.TrainConfig`), e.g. ``{"lr_schedule": "cosine"}`` to
    change one setting of one method while its teacher and the other methods stay as they are.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    train_data: str = "study"
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train_data not in TRAIN_DATA:
            raise ValueError(
                f"method {self.name!r}: train_data must be one of {TRAIN_DATA}, "
                f"got {self.train_data!r}"
            )

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        variant = self.params.get("variant")
        return f"{self.name}-{variant}" if variant else self.name


@dataclass(frozen=True)
class SyntheticSpec:
    """The embedded synthetic data (used when a study names no manifest)."""

    n_per_site: int = 300
    size: int = 256
    seed: int = 0
    difficulty: float = 0.5
    bias_test_n: int = 150
    #: add the portable site ``hospital-d`` (:func:`synthetic.portable_site`) as an external
    #: site where the lung segmenter is less exact (the imperfect-segmentation condition)
    portable_site: bool = False
    #: add the blind site ``hospital-e`` (:func:`synthetic.blind_site`) as an external site:
    #: an acquisition fixed before any model was evaluated on it
    blind_site: bool = False

    def sites(self) -> list[SiteConfig]:
        """The generated sites: the default three, then the portable and the blind one if
        asked for."""
        extra = [portable_site()] * self.portable_site + [blind_site()] * self.blind_site
        return default_sites() + extra


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study depends on; flattened into the MLflow params of the study run.

    Attributes:
        name: the study (MLflow experiment) name.
        manifests: manifest CSVs; empty means the embedded synthetic data (``synthetic``).
        train_sites: sites whose ``train``/``val``/``test`` rows train, select and test
            internally; empty means every site that is not external and not a bias set.
        external_sites: held-out sites (all their rows are tested); empty means every site
            that is not a training site. With neither named, the embedded synthetic data trains
            on its biased sites and holds out its clean one (:func:`synthetic_layout`).
        leave_one_site_out: one fold per site (train on the rest), instead of one fold.
        bias_sets: also make (synthetic) and evaluate the biased/unbiased/confounding sets.
        methods: the methods compared (same backbone and data).
        seeds: training seeds.
        train: :class:`classification.train.TrainConfig` fields (backbone, size, epochs, ...).
        masks: ``"manifest"`` (segment only rows without a mask) or ``"segmenter"`` (all rows).
        segmenter: the lung U-Net checkpoint used for missing masks.
        n_boot: bootstrap resamples for CIs and paired tests.
        heatmap_examples: images per heatmap grid.
        workers: models trained at once, each in its own process (its training log goes to
            stdout). Give ``train.threads`` too (PyTorch threads per model, e.g. 1 with 2
            workers on 2 cores): results then do not depend on ``workers``; with
            ``train.threads`` 0 each process takes ``cores // workers`` threads. The models'
            MLflow training runs are then opened after all of them trained.
    """

    name: str = "synthetic-cross-site"
    manifests: tuple[str, ...] = ()
    synthetic: SyntheticSpec = SyntheticSpec()
    train_sites: tuple[str, ...] = ()
    external_sites: tuple[str, ...] = ()
    leave_one_site_out: bool = False
    bias_sets: bool = True
    methods: tuple[MethodSpec, ...] = (
        MethodSpec("standard"),
        MethodSpec("segment_then_classify"),
        MethodSpec("rrr"),
        MethodSpec("isnet", {"variant": "stochastic"}),
    )
    seeds: tuple[int, ...] = (0,)
    train: dict[str, Any] = field(default_factory=dict)
    masks: str = "manifest"
    segmenter: str = ""
    n_boot: int = 500
    heatmap_examples: int = 4
    workers: int = 1

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid study config:\n  - " + "\n  - ".join(problems))

    @property
    def wants_no_markers(self) -> bool:
        """Whether a method trains on the marker-free re-rendering of the training sites."""
        return any(m.train_data == "no_markers" for m in self.methods)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudyConfig:
        """Build from plain JSON values (lists, dicts), checking every setting's type before
        any work starts.

        Raises:
            ValueError: unknown keys or wrongly typed values, all listed at once (e.g.
                ``seeds`` given as the text ``"[0,1"`` of a malformed ``--set``).
        """
        if not isinstance(raw, dict):
            raise ValueError(f"a study config is a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown study setting(s) {unknown}; known: {sorted(known)}")
        problems: list[str] = []
        kw = dict(raw)
        for key in ("manifests", "train_sites", "external_sites", "seeds", "methods"):
            if key in kw and not isinstance(kw[key], (list, tuple)):
                problems.append(f"{key} must be a JSON list, got {kw[key]!r}")
                kw.pop(key)
        for key in ("manifests", "train_sites", "external_sites", "seeds"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "synthetic" in kw:
            spec = kw.pop("synthetic")
            try:
                if not isinstance(spec, dict):
                    raise TypeError(f"must be a JSON object, got {spec!r}")
                kw["synthetic"] = SyntheticSpec(**spec)
            except TypeError as exc:
                problems.append(f"synthetic: {exc}")
        if "methods" in kw:
            specs = []
            for m in kw.pop("methods"):
                try:
                    specs.append(MethodSpec(m) if isinstance(m, str) else MethodSpec(**m))
                except TypeError as exc:
                    problems.append(f"methods: {m!r}: {exc}")
            kw["methods"] = tuple(specs)
        if problems:
            raise ValueError("invalid study config:\n  - " + "\n  - ".join(problems))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _config_problems(cfg: StudyConfig) -> list[str]:
    """Every wrong setting of ``cfg`` (types, ranges, names), so a study stops before any work
    with all of them listed instead of crashing minutes later on the first."""
    from classification.methods import METHOD_NAMES

    out: list[str] = []
    if not isinstance(cfg.name, str) or not cfg.name.strip():
        out.append(f"name must be a non-empty string, got {cfg.name!r}")
    for key in ("manifests", "train_sites", "external_sites"):
        bad = [v for v in getattr(cfg, key) if not isinstance(v, str) or not v]
        if bad:
            out.append(f"{key} must be a list of names/paths, got items {bad}")
    if not cfg.seeds:
        out.append("seeds: a study needs at least one seed")
    elif not all(_is_int(s) for s in cfg.seeds):
        out.append(f"seeds must be a list of integers, e.g. [0, 1], got {list(cfg.seeds)}")
    elif len(set(cfg.seeds)) != len(cfg.seeds):
        out.append(f"seeds must be distinct, got {list(cfg.seeds)}")
    if not cfg.methods:
        out.append("methods: a study needs at least one method")
    for m in cfg.methods:
        if m.name not in METHOD_NAMES:
            out.append(f"method {m.name!r} is not one of {list(METHOD_NAMES)}")
        if not isinstance(m.params, dict):
            out.append(f"method {m.name!r}: params must be a JSON object, got {m.params!r}")
        out += [f"method {m.label or m.name!r}: {p}" for p in _train_problems(m.train)]
    labels = [m.display for m in cfg.methods if isinstance(m.params, dict)]
    if len(set(labels)) != len(labels):
        out.append(f"method labels must be unique, got {labels}")
    out += _teacher_problems(cfg.methods)
    if cfg.manifests and cfg.wants_no_markers:
        out.append(
            "a method with train_data 'no_markers' needs the embedded synthetic data (the "
            "generator re-renders the same patients without markers); drop it for manifests"
        )
    for key in ("leave_one_site_out", "bias_sets"):
        if not isinstance(getattr(cfg, key), bool):
            out.append(f"{key} must be true or false, got {getattr(cfg, key)!r}")
    if cfg.masks not in ("manifest", "segmenter"):
        out.append(f"masks must be 'manifest' or 'segmenter', not {cfg.masks!r}")
    if not isinstance(cfg.segmenter, str):
        out.append(f"segmenter must be a path (string), got {cfg.segmenter!r}")
    if not _is_int(cfg.n_boot) or cfg.n_boot < 1:
        out.append(f"n_boot must be a positive integer, got {cfg.n_boot!r}")
    if not _is_int(cfg.workers) or cfg.workers < 1:
        out.append(f"workers must be an integer >= 1, got {cfg.workers!r}")
    if not _is_int(cfg.heatmap_examples) or cfg.heatmap_examples < 0:
        out.append(f"heatmap_examples must be an integer >= 0, got {cfg.heatmap_examples!r}")
    s = cfg.synthetic
    for key in ("n_per_site", "size", "bias_test_n"):
        if not _is_int(getattr(s, key)) or getattr(s, key) < 1:
            out.append(f"synthetic.{key} must be a positive integer, got {getattr(s, key)!r}")
    for key in ("portable_site", "blind_site"):
        if not isinstance(getattr(s, key), bool):
            out.append(f"synthetic.{key} must be true or false, got {getattr(s, key)!r}")
    if not _is_int(s.seed):
        out.append(f"synthetic.seed must be an integer, got {s.seed!r}")
    if isinstance(s.difficulty, bool) or not isinstance(s.difficulty, (int, float)):
        out.append(f"synthetic.difficulty must be a number in [0, 1], got {s.difficulty!r}")
    elif not 0 <= s.difficulty <= 1:
        out.append(f"synthetic.difficulty must be in [0, 1], got {s.difficulty!r}")
    out += _train_problems(cfg.train)
    return out


def _teacher_problems(methods: Sequence[MethodSpec]) -> list[str]:
    """A ``teacher`` must be an ISNet's, and name a segment_then_classify method of the study
    trained on the same data."""
    by_label = {m.display: m for m in methods if isinstance(m.params, dict)}
    out = []
    for m in methods:
        teacher = m.params.get("teacher") if isinstance(m.params, dict) else None
        if teacher is None:
            continue
        t = by_label.get(teacher) if isinstance(teacher, str) else None
        if m.name != "isnet":
            out.append(f"method {m.display!r}: only an isnet takes a teacher")
        elif t is None or t.name != "segment_then_classify" or t.train_data != m.train_data:
            choices = [x.display for x in methods if x.name == "segment_then_classify"]
            out.append(
                f"method {m.display!r}: teacher {teacher!r} must be the label of a "
                f"segment_then_classify method of this study with the same train_data "
                f"(here: {choices})"
            )
    return out


def _train_problems(train_cfg: Any) -> list[str]:
    """Problems of the ``train`` block: unknown keys and values whose type differs from
    :class:`~classification.train.TrainConfig`'s defaults (ints accepted for floats)."""
    if not isinstance(train_cfg, dict):
        return [f"train must be a JSON object, got {train_cfg!r}"]
    defaults = {f.name: f for f in fields(TrainConfig)}
    out = []
    for key, value in train_cfg.items():
        if key not in defaults:
            out.append(f"train.{key} is not a training setting; known: {sorted(defaults)}")
            continue
        if key in ("method", "method_params", "seed"):
            out.append(f"train.{key} is set per method/seed by the study (methods, seeds)")
            continue
        if key == "lr_schedule" and str(value).lower() not in LR_SCHEDULES:  # as training reads it
            out.append(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {value!r}")
            continue
        if key in ("augment", "select"):  # a policy name (augment: also true/false)
            resolve = resolve_augment if key == "augment" else resolve_select
            try:
                resolve(TrainConfig(**{key: value}))
            except (TypeError, ValueError) as exc:
                out.append(f"train.{key}: {exc}")
            continue
        default = getattr(TrainConfig(), key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_int(value)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
            want = kind.get(type(default), type(default).__name__)
            out.append(f"train.{key} must be {want}, got {value!r}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            out.append(f"train.{key} must not be negative, got {value!r}")
    return out


@dataclass(frozen=True)
class EvalSet:
    """One evaluation dataset: name, kind (internal/external/biased/...) and its rows."""

    name: str
    kind: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Fold:
    """Training rows (``train``/``val``) and the datasets every model of the fold is tested on."""

    name: str
    train_sites: tuple[str, ...]
    train: pd.DataFrame
    val: pd.DataFrame
    evals: tuple[EvalSet, ...]
    no_markers: tuple[pd.DataFrame, pd.DataFrame] | None = None  # (train, val) without markers

    def training_rows(self, spec: MethodSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The ``(train, val)`` rows ``spec`` trains on."""
        if spec.train_data == "no_markers":
            if self.no_markers is None:
                raise ValueError(
                    f"{self.name}: method {spec.display!r} trains without markers, but the data "
                    "has no marker-free rendering of the training sites"
                )
            return self.no_markers
        return self.train, self.val


@dataclass
class StudyResult:
    """Where a finished study left its evidence."""

    out_dir: Path
    results: pd.DataFrame
    paired: pd.DataFrame
    report: Path
    markdown: str
    tracking_uri: str
    run_id: str
    conclusion: str = ""
    caption: str = ""
    experiment_id: str = ""


# ------------------------------------------------------------------------------------- data


def _bias_kind(site: str) -> str | None:
    for kind in BIAS_KINDS:
        if site.endswith(f"-{kind}"):
            return kind
    return None


def prepare_data(
    cfg: StudyConfig,
    out_dir: Path,
    log: Callable[[str], None],
    progress: bool = False,
    pool: Executor | None = None,
) -> list[Path]:
    """The study's manifests: given ones, or the synthetic set generated (once) under
    ``out_dir/data`` (a progress bar on stderr with ``progress``; rendered in ``pool``, else
    each set in worker processes of its own); the same spec twice reuses the files."""
    if cfg.manifests:
        return [Path(m) for m in cfg.manifests]

    spec = cfg.synthetic
    data_dir = out_dir / "data"
    stamp = data_dir / "spec.json"
    want = json.dumps(
        {**asdict(spec), "bias_sets": cfg.bias_sets, "no_markers": cfg.wants_no_markers},
        sort_keys=True,
    )
    paths = [data_dir / "sites" / "manifest.csv"]
    if cfg.bias_sets:
        paths.append(data_dir / "bias" / "manifest.csv")
    if cfg.wants_no_markers:
        paths.append(data_dir / "no_markers" / "manifest.csv")
    if stamp.is_file() and stamp.read_text() == want and all(p.is_file() for p in paths):
        log(f"data: reusing {data_dir}")
        return paths
    sites = spec.sites()
    log(f"data: generating {len(sites)} sites x {spec.n_per_site} images at {spec.size} px")
    make_dataset(
        paths[0].parent,
        sites,
        n_per_site=spec.n_per_site,
        size=spec.size,
        seed=spec.seed,
        difficulty=spec.difficulty,
        progress=progress,
        workers=pool,
    )
    if cfg.bias_sets:
        base = next(s for s in sites if s.bias_correlation > 0)
        log(f"data: generating biased/unbiased/confounding sets of {base.name}")
        make_bias_test_sets(
            paths[1].parent,
            base,
            n=spec.bias_test_n,
            size=spec.size,
            seed=spec.seed + 1,
            difficulty=spec.difficulty,
            progress=progress,
            workers=pool,
        )
    if cfg.wants_no_markers:
        biased = [s for s in sites if s.bias_correlation > 0]
        log(f"data: re-rendering {', '.join(s.name for s in biased)} without markers")
        make_dataset(
            paths[-1].parent,
            bias_free_sites(biased, suffix=NO_MARKERS),
            n_per_site=spec.n_per_site,
            size=spec.size,
            seed=spec.seed,
            difficulty=spec.difficulty,
            progress=False,
            workers=pool,
        )
    stamp.write_text(want)
    return paths


def synthetic_layout(spec: SyntheticSpec | None = None) -> dict[str, tuple[str, ...]]:
    """The embedded data's layout: train on the sites with a background bias, hold out the
    others (the clean one, and the portable one when generated)."""

    sites = (spec or SyntheticSpec()).sites()
    return {
        "train_sites": tuple(s.name for s in sites if s.bias_correlation > 0),
        "external_sites": tuple(s.name for s in sites if s.bias_correlation == 0),
    }


def _no_markers_need_masks(cfg: StudyConfig) -> bool:
    """Whether a method trained on the marker-free rendering reads its lung masks (they are
    used for training only: every model is evaluated on the study's own sets)."""
    return any(
        m.train_data == "no_markers" and method_needs_masks(m.name, m.params) for m in cfg.methods
    )


def ensure_masks(
    cfg: StudyConfig,
    manifests: Sequence[Path],
    out_dir: Path,
    log: Callable[[str], None],
    progress: bool = False,
    unread: Collection[Path] = (),
    pool: Executor | None = None,
) -> list[Path]:
    """Manifests whose every row has a lung mask (segmenting rows without one, in ``pool``'s
    processes when given; a progress bar on stderr with ``progress``). The ``unread``
    manifests, whose masks no method reads, are returned as they are (minutes of segmentation
    saved)."""
    out = []
    for i, path in enumerate(manifests):
        df = load_manifest(path, check_mask_sizes=False)
        if path in unread:
            log(f"masks: not segmenting {path} (no method reads its masks)")
            out.append(path)
            continue
        if cfg.masks == "manifest" and (df["mask"] != "").all():
            out.append(path)
            continue

        # keyed by mode and segmenter: another segmenter (or a retrained one) segments anew
        seg = Path(cfg.segmenter or default_segmenter())
        key = _text_key(f"{cfg.masks}|{seg.resolve()}|{seg.stat().st_mtime_ns}")
        target = out_dir / "masks" / f"manifest{i}-{key}"
        done = target / "manifest.csv"
        if done.is_file() and done.stat().st_mtime >= Path(path).stat().st_mtime:
            log(f"masks: reusing {done}")
            out.append(done)
            continue
        n_todo = int(len(df) if cfg.masks == "segmenter" else (df["mask"] == "").sum())
        log(f"masks: segmenting {n_todo} images of {path} with {seg}")
        with _folder_progress(target / "masks", n_todo, "lung masks", enabled=progress):
            out.append(
                write_masks(path, seg, target, overwrite=cfg.masks == "segmenter", pool=pool)
            )
    return out


@contextlib.contextmanager
def _folder_progress(folder: Path, total: int, desc: str, *, enabled: bool) -> Iterator[None]:
    """A tqdm bar (stderr) counting the PNG files appearing in ``folder`` while the block runs
    (the mask writer has no progress hook of its own)."""
    if not enabled or total <= 0:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    before = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)

    def poll() -> None:
        while not stop.wait(0.5):
            done = len(list(folder.glob("*.png"))) - before if folder.is_dir() else 0
            bar.update(max(0, min(done, total) - bar.n))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
        bar.update(total - bar.n)
    finally:
        stop.set()
        thread.join()
        bar.close()


def plan_folds(cfg: StudyConfig, df: pd.DataFrame) -> list[Fold]:
    """The training/evaluation layout: one fold, or one per site with leave-one-site-out."""
    sites = sorted(set(df["site"]))
    bias_sites = [s for s in sites if _bias_kind(s)]
    real_sites = [s for s in sites if s not in bias_sites and not s.endswith(NO_MARKERS)]
    for s in (*cfg.train_sites, *cfg.external_sites):
        if s not in real_sites:
            raise ValueError(f"site {s!r} is not in the manifests (sites: {real_sites})")
    if cfg.leave_one_site_out:
        layouts = [(tuple(s for s in real_sites if s != held), (held,)) for held in real_sites]
    else:
        external = cfg.external_sites or tuple(s for s in real_sites if s not in cfg.train_sites)
        if not external:
            raise ValueError(
                "no held-out site: name external_sites (or train_sites) in the study config, "
                "or set leave_one_site_out"
            )
        train_sites = cfg.train_sites or tuple(s for s in real_sites if s not in external)
        layouts = [(tuple(train_sites), tuple(external))]
    folds = []
    for train_sites, external in layouts:
        if not train_sites:
            raise ValueError("no training site left: name train_sites in the study config")
        tr = select(df, sites=train_sites)
        train, val = select(tr, splits=["train"]), select(tr, splits=["val"])
        if train.empty or val.empty:
            raise ValueError(
                f"training sites {list(train_sites)} need rows with split 'train' and 'val'"
            )
        evals = [EvalSet("internal-test", "internal", select(tr, splits=["test"]))]
        evals += [EvalSet(s, "external", select(df, sites=[s])) for s in external]
        evals += [
            EvalSet(s, _bias_kind(s), select(df, sites=[s]))
            for s in bias_sites
            if s.rsplit("-", 1)[0] in train_sites
        ]
        name = "fold-" + "+".join(train_sites) if cfg.leave_one_site_out else "main"
        free = select(df, sites=[s + NO_MARKERS for s in train_sites])
        no_markers = None
        if len(free):
            no_markers = (select(free, splits=["train"]), select(free, splits=["val"]))
        evals = tuple(e for e in evals if len(e.frame))
        folds.append(Fold(name, tuple(train_sites), train, val, evals, no_markers))
    return folds


# ------------------------------------------------------------------------------------- run


def run_study(
    cfg: StudyConfig,
    out_dir: str | os.PathLike,
    *,
    command: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> StudyResult:
    """Run the whole study (see the module docstring); returns the results and where they are.

    The tracking store is checked first (before any data, mask or training work).

    Raises:
        pipeline.tracking.TrackingStoreError: the MLflow store cannot be used; nothing was done.
        Exception: whatever stopped it; the MLflow runs it opened are marked FAILED and the
            models already trained are kept, so running it again resumes.
    """

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    t0 = time.perf_counter()
    log = _timestamped(log, t0)
    if not (cfg.manifests or cfg.train_sites or cfg.external_sites or cfg.leave_one_site_out):
        cfg = replace(cfg, **synthetic_layout(cfg.synthetic))
    uri = resolve_tracking_uri(out / "mlflow")
    check_tracking_store(uri)
    log(f"tracking: {uri}")
    with render_pool() as pool:  # one set of worker processes renders and segments
        data = prepare_data(cfg, out, log, progress=progress, pool=pool)
        unread = data[-1:] if cfg.wants_no_markers and not _no_markers_need_masks(cfg) else []
        manifests = ensure_masks(cfg, data, out, log, progress, unread=unread, pool=pool)
    df = pd.concat([load_manifest(m) for m in manifests], ignore_index=True)
    classes = class_names(df)
    folds = plan_folds(cfg, df)
    base_train = TrainConfig(**cfg.train)
    rows: list[dict[str, Any]] = []
    probs_by: dict[tuple[str, str, int, str], Predictions] = {}
    examples: dict[str, list] = {}
    eval_inputs = EvalInputCache()  # each evaluation set read once per fold

    # with workers > 1 the models train in worker processes while this one evaluates each
    # as soon as it is ready; else each model trains inside its MLflow run below
    with (
        TrainingPhase(cfg, folds, base_train, out, classes, log) as training,
        StudyTracker(cfg.name, cfg.to_dict(), tracking_uri=uri) as tracker,
        surfaced_read_errors(),
    ):
        for fold in folds:
            log(
                f"{fold.name}: train on {', '.join(fold.train_sites)} ({len(fold.train)} images,"
                f" {len(fold.val)} val); test on {', '.join(e.name for e in fold.evals)}"
            )
            for spec, seed, tcfg, run_dir in planned_runs(cfg, fold, base_train, out):
                params = {"fold": fold.name, **asdict(tcfg)}
                rows_train, rows_val = fold.training_rows(spec)
                params["train_data"] = spec.train_data
                with tracker.training_run(spec.display, seed, params, rows_train) as tr:
                    training.wait(run_dir)
                    history = _train_once(
                        train,
                        tcfg,
                        (rows_train, rows_val),
                        classes,
                        run_dir,
                        log,
                        f"{spec.display}/seed{seed}",
                    )
                    for row in history:
                        step = int(row["epoch"])
                        tr.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step)
                    model, card = load_model(run_dir / "best_model.pt")
                    model_id = tr.log_pyfunc_model(run_dir, name=spec.display)
                    tr.log_model_folder(run_dir)
                    predictor = Predictor(model, card)  # masks come from the manifest
                    # fewer threads while other models still train: no oversubscription
                    with torch_threads(training.spare_threads()):
                        for ev in fold.evals:
                            pred, metrics = _evaluate_on(
                                tracker,
                                tr,
                                model_id,
                                predictor,
                                fold.name,
                                ev,
                                classes,
                                tcfg,
                                cfg,
                                eval_inputs,
                            )
                            rows.append(
                                {
                                    "fold": fold.name,
                                    "method": spec.display,
                                    "seed": seed,
                                    "dataset": ev.name,
                                    "kind": ev.kind,
                                    **metrics,
                                }
                            )
                            probs_by[(fold.name, spec.display, seed, ev.name)] = pred
                            if pred.examples:
                                examples.setdefault(f"{fold.name}/{ev.name}", []).append(
                                    (spec.display, pred.examples)
                                )
                            log(_summary_line(spec.display, ev.name, metrics))
        results = pd.DataFrame(rows)
        paired = _paired_tests(cfg, folds, probs_by, classes)
        pooled = _paired_tests(cfg, folds, probs_by, classes, pooled=True)
        report, markdown, conclusion, caption = _write_evidence(
            cfg, out, results, paired, pooled, probs_by, examples, classes, folds, command, tracker
        )
        run_id, experiment_id = tracker.run_id, tracker.experiment_id
        log(f"study finished in {time.perf_counter() - t0:.0f} s")
    return StudyResult(
        out,
        results,
        paired,
        report,
        markdown,
        uri,
        run_id,
        conclusion=conclusion,
        caption=caption,
        experiment_id=experiment_id or "",
    )


def _evaluate_on(
    tracker: StudyTracker,
    training_run: TrainingRun,
    model_id: str,
    predictor: Predictor,
    fold: str,
    ev: EvalSet,
    classes: Sequence[str],
    tcfg: TrainConfig,
    cfg: StudyConfig,
    eval_inputs: EvalInputCache,
) -> tuple[Predictions, dict[str, float]]:
    """Predict ``ev`` of ``fold`` with one trained model (through the :class:`Predictor`, with
    the manifest's lung masks; the images read once per fold by ``eval_inputs``), compute its
    metrics (bootstrap CIs over patients, mean relevance metrics) and log them in a new
    evaluation run under ``training_run``."""

    records = to_records(ev.frame, classes)
    inputs = eval_inputs.get(fold, ev.name, predictor, records)
    pred = predict_records(predictor, records, cfg.heatmap_examples, inputs)
    result = evaluate(
        pred.probs, pred.labels, _groups(ev.frame), classes, n_boot=cfg.n_boot, seed=tcfg.seed
    )
    metrics = {"n_images": float(result.n_images), **result.as_dict()}
    metrics.update(relevance_summary(pred.relevance))
    with tracker.evaluation_run(training_run.run_id, model_id, ev.name, ev.kind, ev.frame) as er:
        er.log_metrics(metrics)
        er.log_predictions(pred.probs, pred.labels, classes)
        if pred.examples:
            er.log_heatmaps(pred.examples)
    return pred, metrics


def relevance_summary(relevance: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean per-image relevance metrics, named for what they are: ``background_share`` (share
    of |R| outside the lungs) beside ``background_share_chance`` (its value for a heatmap blind
    to the mask: 1 - lung-area fraction), and ``lung_fraction`` (the chance level of
    ``mass_accuracy`` and ``rank_accuracy``), instead of one ``chance`` that fits only the
    latter two."""
    out: dict[str, float] = {}
    for name, values in relevance.items():
        value = float(np.nanmean(values)) if len(values) else float("nan")
        if name == "chance":
            out["lung_fraction"] = value
            out["background_share_chance"] = 1.0 - value
        else:
            out[name] = value
    return out


@dataclass
class Predictions:
    """One model's outputs on one evaluation set, in record order.

    Attributes:
        probs: ``[N, K]`` softmax probabilities; labels: ``[N]`` true class indices.
        relevance: per-image relevance metrics (``[N]`` arrays).
        examples: up to ``keep`` ``(image [S, S], mask [S, S], heatmap [S, S])`` triples of the
            first images, at the network input size.
    """

    probs: np.ndarray
    labels: np.ndarray
    relevance: dict[str, np.ndarray]
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class EvalInputs:
    """An evaluation set's images and lung masks, read from their files and resized to the
    network input size ``S``: ``images`` ``[1, S, S]`` float32 (area resize, as
    :func:`classification.inputs.network_inputs` does), ``masks`` ``[S, S]`` bool ("any part is
    lung" resize) or None when a record has no mask. Resizing them again to ``S`` changes
    nothing, so predicting from them gives the numbers predicting from the files gives; the
    study reads each set once and every model of that input size predicts from it."""

    images: list[torch.Tensor]
    masks: list[np.ndarray] | None

    @classmethod
    def read(cls, predictor: Predictor, records: Sequence[dict[str, Any]]) -> EvalInputs:
        """Read ``records`` (``image``, ``mask``) with ``predictor``'s reader at its input size."""
        size = predictor.card.size
        images = [resize_image(predictor.read(r["image"]).as_tensor(), size) for r in records]
        masks = None
        if all(r.get("mask") for r in records):
            masks = [resize_mask(load_mask(r["mask"]), size)[0].numpy() > 0 for r in records]
        return cls(images, masks)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.images) + sum(m.nbytes for m in self.masks or ())


class EvalInputCache:
    """The current fold's :class:`EvalInputs`, read once per evaluation set and network input
    size and shared by the fold's models (the five models of the embedded study read the same
    1,164 DICOM files each before), up to ``max_bytes`` in all: a set that does not fit is read
    anew for each model, as before, so a large study's memory stays bounded. Moving to another
    fold drops the previous fold's sets."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._fold: str | None = None
        self._sets: dict[tuple[str, int], EvalInputs] = {}

    def get(
        self, fold: str, name: str, predictor: Predictor, records: Sequence[dict[str, Any]]
    ) -> EvalInputs:
        """Evaluation set ``name`` of ``fold`` (its ``records``) as ``predictor`` reads it."""
        if fold != self._fold:
            self._fold, self._sets = fold, {}
        key = (name, predictor.card.size)
        if key not in self._sets:
            inputs = EvalInputs.read(predictor, records)
            held = sum(x.nbytes for x in self._sets.values())
            if held + inputs.nbytes > self.max_bytes:
                return inputs
            self._sets[key] = inputs
        return self._sets[key]


def predict_records(
    predictor: Predictor,
    records: Sequence[dict[str, Any]],
    keep_examples: int = 0,
    inputs: EvalInputs | None = None,
) -> Predictions:
    """Predict manifest records (``image``, ``label``, ``mask``) with their own masks;
    ``inputs``: the records already read (:meth:`EvalInputs.read`), else they are read here."""

    if inputs is None:
        inputs = EvalInputs.read(predictor, records)
    preds = []
    for start in range(0, len(records), 32):
        chunk = slice(start, start + 32)
        masks = None if inputs.masks is None else inputs.masks[chunk]
        preds.extend(predictor.predict(inputs.images[chunk], masks))
    examples = [
        (image[0].numpy(), p.mask.astype(np.float32), p.heatmap)
        for image, p in zip(inputs.images[:keep_examples], preds, strict=False)
    ]
    names = preds[0].relevance.keys() if preds else ()
    return Predictions(
        probs=np.stack([p.probs for p in preds]),
        labels=np.array([int(r["label"]) for r in records]),
        relevance={k: np.array([p.relevance[k] for p in preds]) for k in names},
        examples=examples,
    )


def _summary_line(method: str, dataset: str, metrics: dict[str, float]) -> str:
    line = f"  {method:<24} {dataset:<24} AUROC {metrics['auroc_macro']:.3f}"
    line += f" acc {metrics['accuracy']:.3f}"
    if "background_share" in metrics:
        line += f" bg-share {metrics['background_share']:.2f}"
    return line


def _timestamped(log: Callable[[str], None], t0: float) -> Callable[[str], None]:
    """``log`` with the elapsed wall time in front of each line (``[  12s] ...``)."""
    return lambda line: log(f"[{time.perf_counter() - t0:5.0f}s] {line}")


def _text_key(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _config_key(tcfg: TrainConfig) -> str:
    return _text_key(json.dumps(asdict(tcfg), sort_keys=True, default=str))


def planned_runs(
    cfg: StudyConfig, fold: Fold, base_train: TrainConfig, out: Path
) -> Iterator[tuple[MethodSpec, int, TrainConfig, Path]]:
    """``(method, seed, training config, model folder)`` of every model of ``fold``, in the
    config's order with each ISNet teacher moved before its students (a serial study trains in
    this order); the folder is keyed by the config (a changed config trains anew, the same one
    is reused). An ISNet's ``teacher`` label becomes the path of that method's ``best_model.pt``
    (same fold and seed); its folder key holds the teacher's folder name, so a retrained teacher
    retrains the ISNet and a moved study folder does not."""
    by_label = {m.display: m for m in cfg.methods}
    ordered: list[MethodSpec] = []  # the config's order, each teacher moved before its students

    def add(spec: MethodSpec) -> None:
        if spec not in ordered:
            if "teacher" in spec.params:
                add(by_label[spec.params["teacher"]])
            ordered.append(spec)

    for spec in cfg.methods:
        add(spec)
    folders: dict[tuple[str, int], Path] = {}
    for spec in ordered:
        for seed in cfg.seeds:
            params = dict(spec.params)
            keyed = params
            if "teacher" in params:
                teacher_dir = folders[params["teacher"], seed]
                keyed = {**params, "teacher": teacher_dir.name}
                params["teacher"] = str(teacher_dir / "best_model.pt")
            tcfg = replace(
                base_train, **spec.train, method=spec.name, method_params=keyed, seed=seed
            )
            run_dir = out / "models" / fold.name / f"{spec.display}-seed{seed}-{_config_key(tcfg)}"
            folders[spec.display, seed] = run_dir
            yield spec, seed, replace(tcfg, method_params=params), run_dir


def trained_models(out: str | Path, label: str) -> list[Path]:
    """The finished model folders of method ``label`` in the study folder ``out`` (named by
    :func:`planned_runs`), sorted by fold and seed.

    Raises:
        ValueError: none is finished, or a fold and seed has more than one (a study folder
            reused with another training config keeps both): the message names them.
    """
    by_run: dict[tuple[str, int], list[Path]] = {}
    for done in sorted(Path(out).glob(f"models/*/{label}-seed*/done.json")):
        folder = done.parent
        seed, sep, key = folder.name[len(label) + len("-seed") :].partition("-")
        if seed.isdigit() and sep and len(key) == 10:
            by_run.setdefault((folder.parent.name, int(seed)), []).append(folder)
    if not by_run:
        raise ValueError(f"{out}: no finished model of method {label!r} under models/")
    several = [str(f) for folders in by_run.values() if len(folders) > 1 for f in folders]
    if several:
        raise ValueError(
            f"{out}: method {label!r} has more than one model for a fold and seed: {several}; "
            "give a study folder with one training config per method (e.g. a copy without the "
            "older ones)"
        )
    return [folders[0] for _, folders in sorted(by_run.items())]


#: training cost order for the parallel phase (most expensive first, so no worker idles at the
#: end waiting for the one ISNet left)
_COST_ORDER = {"isnet": 0, "rrr": 1}


class _TrainJob(NamedTuple):
    """One model to train: its config, ``(train, val)`` rows, class names, folder, log tag and
    the folder of a model it needs first (an ISNet's teacher still to train), if any."""

    tcfg: TrainConfig
    rows: tuple[pd.DataFrame, pd.DataFrame]
    classes: Sequence[str]
    run_dir: Path
    tag: str
    after: Path | None = None


def _unfinished_jobs(
    cfg: StudyConfig,
    folds: Sequence[Fold],
    base_train: TrainConfig,
    out: Path,
    classes: Sequence[str],
) -> list[_TrainJob]:
    """Every model of the study without a finished one in its folder, in :func:`planned_runs`'
    order (teachers first)."""
    jobs = []
    for fold in folds:
        for spec, seed, tcfg, run_dir in planned_runs(cfg, fold, base_train, out):
            if not (run_dir / "done.json").is_file():
                tag = f"{fold.name}/{spec.display}/seed{seed}"
                teacher = tcfg.method_params.get("teacher")
                after = Path(teacher).parent if teacher else None
                if after is not None and (after / "done.json").is_file():
                    after = None
                jobs.append(_TrainJob(tcfg, fold.training_rows(spec), classes, run_dir, tag, after))
    return jobs


class _Stop(Exception):
    """Put in the job queue to stop the scheduler (the study stopped for another reason)."""


class TrainingPhase:
    """The study's unfinished models, ``cfg.workers`` at a time, each in a spawned process, fed
    by a background thread (:func:`_run_jobs`), while the caller goes on: :meth:`wait` blocks
    until one model is trained, so the study evaluates each model as soon as it is ready
    instead of after the last one. With ``cfg.workers`` 1 it does nothing (the study trains
    each model in its MLflow run).

    Leaving the ``with`` block on an error or an interruption (Ctrl-C) terminates the worker
    processes at once; every model keeps its last epoch checkpoint, so the next run resumes it
    (bit-identically). A failed training is raised by :meth:`wait` of any model not yet done.
    """

    def __init__(
        self,
        cfg: StudyConfig,
        folds: Sequence[Fold],
        base_train: TrainConfig,
        out: Path,
        classes: Sequence[str],
        log: Callable[[str], None],
    ) -> None:
        self._jobs = (
            [] if cfg.workers == 1 else _unfinished_jobs(cfg, folds, base_train, out, classes)
        )
        self._slots = min(cfg.workers, len(self._jobs))
        self._threads = base_train.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
        self._log = log
        self._queue: queue.Queue[tuple[_TrainJob | None, BaseException | None]] = queue.Queue()
        self._done: set[Path] = set()
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._schedule, name="study-training", daemon=True)

    def __enter__(self) -> TrainingPhase:
        if self._jobs:
            self._log(
                f"training {len(self._jobs)} models, {self._slots} at a time "
                f"({self._threads} thread(s) each)"
            )
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._thread.is_alive():
            if exc_type is not None:  # stop the workers now, do not wait for them
                self._queue.put((None, _Stop()))
            self._thread.join()

    def wait(self, run_dir: Path) -> None:
        """Block until the model of ``run_dir`` is trained (at once for one that is not
        trained here); raise the training error that stopped the phase."""
        if not any(job.run_dir == run_dir for job in self._jobs):
            return
        with self._changed:
            self._changed.wait_for(lambda: run_dir in self._done or self._error is not None)
            if run_dir not in self._done:
                raise self._error  # type: ignore[misc]  # not None here

    def spare_threads(self) -> int:
        """PyTorch threads for this process while models still train in the workers (the
        cores they leave); 0 (leave the setting) when none trains any more."""
        if not self._thread.is_alive():
            return 0
        return max(1, (os.cpu_count() or 1) - self._slots * self._threads)

    def wait_all(self) -> None:
        """Block until every model is trained."""
        for job in self._jobs:
            self.wait(job.run_dir)

    def _schedule(self) -> None:
        # spawn: no fork of a process holding torch threads
        pool = multiprocessing.get_context("spawn").Pool(self._slots)
        try:
            _run_jobs(
                pool, self._jobs, self._threads, self._slots, self._log, self._queue, self._trained
            )
            pool.close()
        except BaseException as err:  # handed to the thread waiting for a model
            pool.terminate()
            with self._changed:
                self._error = err
                self._changed.notify_all()
        finally:
            pool.join()

    def _trained(self, job: _TrainJob) -> None:
        with self._changed:
            self._done.add(job.run_dir)
            self._changed.notify_all()


def train_models(
    cfg: StudyConfig,
    folds: Sequence[Fold],
    base_train: TrainConfig,
    out: Path,
    classes: Sequence[str],
    log: Callable[[str], None],
) -> None:
    """Train every unfinished model of the study into its folder (:func:`planned_runs`): one
    after the other in this process with ``cfg.workers`` 1, else in a :class:`TrainingPhase`.
    Raises the first training error."""
    if cfg.workers == 1:
        for job in _unfinished_jobs(cfg, folds, base_train, out, classes):
            _train_once(train, job.tcfg, job.rows, job.classes, job.run_dir, log, job.tag)
        return
    with TrainingPhase(cfg, folds, base_train, out, classes, log) as phase:
        phase.wait_all()


def _run_jobs(
    pool: Any,
    jobs: Sequence[_TrainJob],
    threads: int,
    slots: int,
    log: Callable[[str], None],
    finished: queue.Queue[tuple[_TrainJob | None, BaseException | None]],
    on_trained: Callable[[_TrainJob], None],
) -> None:
    """Feed ``jobs`` to ``pool`` ``slots`` at a time, each once the model it needs is trained:
    teachers first (they unblock others), then the most expensive (:data:`_COST_ORDER`), so
    no worker idles at the end; ``on_trained`` is called with each job done. Raises the first
    job's error, or the error put in ``finished``."""
    teachers = {job.after for job in jobs if job.after is not None}
    waiting, trained, running = list(jobs), set(), 0
    while waiting or running:
        ready = [job for job in waiting if job.after is None or job.after in trained]
        ready.sort(key=lambda j: (j.run_dir not in teachers, _COST_ORDER.get(j.tcfg.method, 2)))
        for job in ready[: slots - running]:
            waiting.remove(job)
            running += 1
            pool.apply_async(
                _train_job,
                ((job, threads),),
                callback=lambda _tag, job=job: finished.put((job, None)),
                error_callback=lambda err, job=job: finished.put((job, err)),
            )
        if not running:  # only possible with a dependency on a job that is not in the list
            raise RuntimeError(f"cannot train {[j.tag for j in waiting]}: their teacher is missing")
        job, err = finished.get()
        running -= 1
        if err is not None:
            raise err
        trained.add(job.run_dir)
        log(f"  {job.tag}: trained")
        on_trained(job)


def _train_job(job_threads: tuple[_TrainJob, int]) -> str:
    """One model of the parallel phase, in a worker process with ``threads`` PyTorch threads
    (log lines to stdout); returns its tag."""
    job, threads = job_threads
    log = partial(print, flush=True)
    # the read error itself crosses back to the study (a wrapping error loses its cause there)
    with torch_threads(threads), surfaced_read_errors():
        _train_once(train, job.tcfg, job.rows, job.classes, job.run_dir, log, job.tag)
    return job.tag


def _train_once(
    train_fn: Callable[..., TrainResult],
    tcfg: TrainConfig,
    rows: tuple[pd.DataFrame, pd.DataFrame],
    classes: Sequence[str],
    run_dir: Path,
    log: Callable[[str], None],
    tag: str,
) -> list[dict[str, float]]:
    """Train one model into ``run_dir`` unless a finished one with the same config is there;
    an interrupted one resumes from its last epoch checkpoint. Returns the per-epoch history."""
    done = run_dir / "done.json"
    if done.is_file():
        log(f"  {tag}: reusing the finished model in {run_dir}")
        return json.loads(done.read_text())["history"]
    resume = (run_dir / "checkpoints").is_dir()
    log(f"  {tag}: {'resuming' if resume else 'training'} ({tcfg.epochs} epochs)")
    result = train_fn(
        to_records(rows[0], classes),
        to_records(rows[1], classes),
        tcfg,
        run_dir,
        num_classes=len(classes),
        classes=classes,
        resume=resume,
        progress=lambda line: log(f"    {tag} {line}"),
    )
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"history": result.history, "best_metric": result.best_metric}))
    tmp.replace(done)
    return result.history


def _groups(frame: pd.DataFrame) -> np.ndarray | None:
    """Patient ids for the bootstrap (None when any row lacks one: each image its own patient)."""
    ids = frame["patient_id"].astype(str)
    return None if (ids == "").any() else ids.to_numpy()


def _compared_pairs(
    cfg: StudyConfig, folds: Sequence[Fold]
) -> Iterator[tuple[Fold, EvalSet, str, str]]:
    """``(fold, evaluation set, ISNet, comparator)`` of every paired test: each ISNet method
    minus each other method on every non-internal dataset (ISNet minus ISNet once, in config
    order: an ablation listed after the ISNet it ablates reads as "ISNet minus ablation")."""

    isnets = [m.display for m in cfg.methods if m.name == "isnet"]
    others = [m.display for m in cfg.methods if m.name != "isnet"]
    for fold in folds:
        for ev in fold.evals:
            if ev.kind != "internal":
                for i, a in enumerate(isnets):
                    for b in [*others, *isnets[i + 1 :]]:
                        yield fold, ev, a, b


def _paired_tests(
    cfg: StudyConfig,
    folds: Sequence[Fold],
    preds: dict[tuple[str, str, int, str], Predictions],
    classes: Sequence[str],
    *,
    pooled: bool = False,
) -> pd.DataFrame:
    """ISNet minus comparator, macro AUROC, paired patient bootstrap (:func:`_compared_pairs`):
    one row per seed, or with ``pooled`` one row per comparison for the mean over the seeds
    (column ``n_seeds``; :func:`evaluation.metrics.paired_bootstrap_seeds`)."""

    rows = []
    for fold, ev, a, b in _compared_pairs(cfg, folds):
        runs = [cfg.seeds] if pooled else [(seed,) for seed in cfg.seeds]
        for seeds in runs:
            pa = [preds[(fold.name, a, seed, ev.name)] for seed in seeds]
            pb = [preds[(fold.name, b, seed, ev.name)] for seed in seeds]
            r = paired_bootstrap_seeds(
                [p.probs for p in pa],
                [p.probs for p in pb],
                pa[0].labels,
                _groups(ev.frame),
                "auroc_macro",
                class_names=list(classes),
                n_boot=cfg.n_boot,
                seed=seeds[0],
            )
            rows.append(
                {
                    "fold": fold.name,
                    "dataset": ev.name,
                    "kind": ev.kind,
                    **({"n_seeds": len(seeds)} if pooled else {"seed": seeds[0]}),
                    "isnet": a,
                    "comparator": b,
                    "auroc_isnet": r.value_a,
                    "auroc_comparator": r.value_b,
                    "difference": r.difference,
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                    "p_value": r.p_value,
                }
            )
    return pd.DataFrame(rows)


def _paired_report_tables(
    paired: pd.DataFrame, pooled: pd.DataFrame, n_seeds: int
) -> dict[str, pd.DataFrame] | None:
    """The report's paired-test tables: per seed, and pooled over the seeds when there are
    several."""
    if not len(paired):
        return None
    tables = {
        "Paired bootstrap: ISNet minus comparator (macro AUROC, same patient resamples)": (
            paired_table(paired)
        )
    }
    if n_seeds > 1:
        title = (
            f"Paired bootstrap pooled over the {n_seeds} seeds: mean of the per-seed differences, "
            "every seed on the same patient resamples (the CI leaves out the seed-to-seed spread)"
        )
        tables[title] = paired_table(pooled)
    return tables


def _write_evidence(
    cfg: StudyConfig,
    out: Path,
    results: pd.DataFrame,
    paired: pd.DataFrame,
    pooled: pd.DataFrame,
    preds: dict[tuple[str, str, int, str], Predictions],
    examples: dict[str, list],
    classes: Sequence[str],
    folds: Sequence[Fold],
    command: str,
    tracker: StudyTracker,
) -> tuple[Path, str, str, str]:
    """results.csv, paired_tests.csv (per seed), paired_tests_pooled.csv (the mean over the
    seeds, :func:`_paired_tests` with ``pooled``), ROC figures, heatmap grids and report.html, all
    logged to the study run, with the headline as the run's metrics and the conclusion as its
    description.

    Returns:
        ``(report.html, Markdown main table, conclusion paragraph, what the table's cells are)``.
    """

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    seed = cfg.seeds[0]
    for fold in folds:
        for ev in fold.evals:
            if ev.kind == "internal":
                continue
            by_method = {
                m.display: preds[(fold.name, m.display, seed, ev.name)].probs for m in cfg.methods
            }
            labels = preds[(fold.name, cfg.methods[0].display, seed, ev.name)].labels
            path = fig_dir / f"roc_{fold.name}_{ev.name}.png"
            figures[f"ROC curves on {ev.name} ({ev.kind}, {fold.name}, seed {seed})"] = plot_roc(
                by_method, labels, list(classes), path, title=f"{ev.name} ({ev.kind})"
            )
    for key, per_method in examples.items():
        if key.endswith("/internal-test"):
            continue  # every evaluation run has its own grid; the report shows the test sets
        path = fig_dir / f"heatmaps_{key.replace('/', '_')}.png"
        figures[f"LRP heatmaps on {key} (image, lung mask, each method)"] = plot_heatmap_grid(
            per_method, path, title=f"{key}: where each model looks"
        )
    # one row per (method, dataset, kind, seed): folds averaged for the shared dataset names
    # (each fold's external site is a dataset of its own); seeds stay apart, so the report
    # shows each seed's CIs and the spread over seeds
    by_seed = summarise_runs(results, by=("method", "dataset", "kind", "seed"))
    conclusion = study_conclusion(by_seed, paired, background="background_share")
    caption = table_caption(by_seed)
    html, markdown = write_report(
        by_seed,
        out,
        figures=figures,
        title=f"Study {cfg.name}",
        command=command,
        background="background_share",
        extra_tables=_paired_report_tables(paired, pooled, len(cfg.seeds)),
        conclusion=conclusion,
    )
    results.to_csv(out / "results.csv", index=False)
    paired.to_csv(out / "paired_tests.csv", index=False)
    pooled.to_csv(out / "paired_tests_pooled.csv", index=False)
    csvs = [out / f for f in ("results.csv", "paired_tests.csv", "paired_tests_pooled.csv")]
    study_run = tracker.study_run()
    for path in (html, *csvs, *figures.values()):
        study_run.log_artifact(path)
    study_run.log_metrics(headline_metrics(by_seed))
    study_run.set_tags(
        {"mlflow.note.content": f"{conclusion}\n\n{caption}\n\n{markdown}\n\n{command}"}
    )
    return html, markdown, conclusion, caption
