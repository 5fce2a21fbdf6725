"""A study stops before any work when its config or its tracking store is wrong, and says why;
`data check --labels` reports unknown labels. All fast: nothing is generated or trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxr_io.resources import bundle_file
from pipeline.cli import app, parse_override
from pipeline.study import StudyConfig, run_study
from pipeline.tracking import TrackingStoreError
from tests.test_tracking import _Refusing

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _study_def() -> dict:
    return json.loads((ROOT / "configs" / "study.json").read_text())["study_def"]


def test_malformed_set_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "study",
            "run",
            str(ROOT / "configs" / "study.json"),
            "--out",
            str(out),
            "--set",
            "study_def#seeds=[0,1",
            "--set",
            "study_def#train#epochs=3",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "'[0,1' is not valid JSON" in res.output
    assert not out.exists()  # nothing was made
    # a well-formed value of the wrong type, and an unknown key: all listed, still no work
    res = runner.invoke(
        app,
        [
            "study",
            "run",
            str(ROOT / "configs" / "study.json"),
            "--out",
            str(out),
            "--set",
            'study_def#seeds=["0"]',
            "--set",
            "study_def#train#epoch=3",
            "--set",
            "study_def#n_boot=0",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "seeds must be a list of integers" in res.output
    assert "train.epoch is not a training setting" in res.output
    assert "n_boot must be a positive integer" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["study", "run", "--set", "nosuch#key=1", "--out", str(out)])
    assert res.exit_code == 2 and "'nosuch' is not in the config" in res.output


def test_override_values():
    assert parse_override("study_def#seeds=[0,1]") == ("study_def#seeds", [0, 1])
    assert parse_override("study_def#name=my-study") == ("study_def#name", "my-study")
    assert parse_override("study_def#train#lr=1e-3") == ("study_def#train#lr", 0.001)
    for bad in ("study_def#seeds", "=3", 'study_def#name="x', "study_def#n_boot=5x"):
        with pytest.raises(ValueError):
            parse_override(bad)


def test_config_types_are_checked():
    cfg = StudyConfig.from_dict(_study_def())  # the shipped config is valid
    assert cfg.seeds == (0,)
    assert (
        StudyConfig.from_dict(
            json.loads(bundle_file("configs", "study.json").read_text())["study_def"]
        ).methods
        == cfg.methods
    )
    for raw, message in [
        ({"seeds": "[0,1"}, "seeds must be a JSON list"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"methods": ["isnett"]}, "method 'isnett' is not one of"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_schedule must be one of"),
        ({"train": {"seed": 1}}, "train.seed is set per method/seed by the study"),
        (
            {"methods": [{"name": "isnet", "train": {"lr_schedule": "step"}}]},
            "method 'isnet': train.lr_schedule must be one of",
        ),
        ({"synthetic": {"difficulty": 2}}, "synthetic.difficulty must be in [0, 1]"),
        ({"bias_sets": "yes"}, "bias_sets must be true or false"),
        ({"synthetic": {"blind_site": "yes"}}, "synthetic.blind_site must be true or false"),
        (
            {"methods": [{"name": "isnet", "params": {"teacher": "stc"}}]},
            "teacher 'stc' must be the label of a segment_then_classify method",
        ),
        (
            {"methods": ["segment_then_classify", {"name": "rrr", "params": {"teacher": "x"}}]},
            "method 'rrr': only an isnet takes a teacher",
        ),
        (
            {
                "methods": [
                    {"name": "segment_then_classify", "train_data": "no_markers"},
                    {"name": "isnet", "params": {"teacher": "segment_then_classify"}},
                ]
            },
            "with the same train_data",
        ),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            StudyConfig.from_dict({**_study_def(), **raw})


def test_refusing_store_stops_the_study_before_data_and_masks(tmp_path, monkeypatch):
    cfg = StudyConfig.from_dict({**_study_def(), "train": {"epochs": 1}})
    with _Refusing() as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
        with pytest.raises(TrackingStoreError, match="HTTP 403.*--allowed-hosts"):
            run_study(cfg, tmp_path / "out", log=lambda _: None)
        # the CLI says it plainly, without a traceback
        res = runner.invoke(
            app,
            ["study", "run", str(ROOT / "configs" / "study.json"), "--out", str(tmp_path / "out2")],
        )
    assert res.exit_code == 2 and "--allowed-hosts" in res.output
    assert "Nothing was computed" in res.output and "Traceback" not in res.output
    for out in (tmp_path / "out", tmp_path / "out2"):
        assert not (out / "data").exists() and not (out / "masks").exists()


def test_data_check_reports_unknown_labels(tmp_path):
    res = runner.invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--n-per-site",
            "3",
            "--size",
            "32",
            "--workers",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = tmp_path / "s" / "manifest.csv"
    ok = runner.invoke(app, ["data", "check", str(manifest), "--labels", "covid,normal,pneumonia"])
    assert ok.exit_code == 0 and "manifest OK" in ok.output
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df.loc[1, "label"] = "pneumonai"  # a typo
    df.loc[4, "label"] = "Covid"  # another spelling
    df.to_csv(manifest, index=False)
    bad = runner.invoke(app, ["data", "check", str(manifest), "--labels", "covid,normal,pneumonia"])
    assert bad.exit_code == 2, bad.output
    assert "2 problem(s)" in bad.output
    assert "row 3" in bad.output and "'pneumonai'" in bad.output and "row 6" in bad.output


def test_mask_stage_progress_bar_counts_files(tmp_path, capsys):
    import threading
    import time

    from pipeline.study import _folder_progress

    folder = tmp_path / "masks"

    def writer():
        folder.mkdir()
        for i in range(4):
            (folder / f"{i}.png").write_bytes(b"x")
            time.sleep(0.2)

    with _folder_progress(folder, 4, "lung masks", enabled=True):
        t = threading.Thread(target=writer)
        t.start()
        t.join()
    err = capsys.readouterr().err
    assert "lung masks" in err and "4/4" in err


def test_an_isnet_teacher_is_planned_first_and_keys_its_student(tmp_path):
    """planned_runs: the teacher, listed after its student, is planned first; its label
    becomes the path of the same seed's segment-then-classify model; the ISNet's folder key holds
    the teacher's folder name (not the study folder), so it changes with the teacher's config
    and not with the output location."""
    from classification.train import TrainConfig
    from pipeline.study import Fold, planned_runs

    methods = [
        {"name": "isnet", "params": {"variant": "stochastic", "teacher": "segment_then_classify"}},
        "segment_then_classify",
    ]
    cfg = StudyConfig.from_dict({**_study_def(), "methods": methods, "seeds": [0, 1]})
    fold = Fold("main", ("a",), pd.DataFrame(), pd.DataFrame(), ())

    def plan(out, **train):
        return list(planned_runs(cfg, fold, TrainConfig(**train), out))

    runs = plan(tmp_path / "a")
    assert [(s.name, seed) for s, seed, _, _ in runs] == [
        ("segment_then_classify", 0),
        ("segment_then_classify", 1),
        ("isnet", 0),
        ("isnet", 1),
    ]
    stc = {seed: d for s, seed, _, d in runs if s.name == "segment_then_classify"}
    for _, seed, tcfg, _ in runs[2:]:
        assert tcfg.method_params["teacher"] == str(stc[seed] / "best_model.pt")
        assert tcfg.seed == seed
    moved = plan(tmp_path / "b")
    assert [d.name for *_, d in moved] == [d.name for *_, d in runs]
    retaught = plan(tmp_path / "a", epochs=3)  # every model changes, the students with them
    assert all(a[3] != b[3] for a, b in zip(runs, retaught, strict=True))


def test_a_methods_own_training_settings_change_only_its_models(tmp_path):
    """A method's ``train`` block overrides the study's for that method alone: its models get
    the setting and a folder of their own; its teacher and the other methods keep the folders
    (and so the trained models) they have without it."""
    from classification.train import TrainConfig
    from pipeline.study import Fold, planned_runs

    def plan(isnet_train):
        isnet = {"name": "isnet", "params": {"teacher": "segment_then_classify"}}
        methods = ["segment_then_classify", "standard", {**isnet, "train": isnet_train}]
        cfg = StudyConfig.from_dict({**_study_def(), "methods": methods})
        fold = Fold("main", ("a",), pd.DataFrame(), pd.DataFrame(), ())
        return list(planned_runs(cfg, fold, TrainConfig(epochs=40), tmp_path))

    plain, cosine = plan({}), plan({"lr_schedule": "cosine", "epochs": 60})
    assert [d for *_, d in plain[:2]] == [d for *_, d in cosine[:2]]  # teacher, standard kept
    assert plain[2][3] != cosine[2][3]
    assert (plain[2][2].lr_schedule, plain[2][2].epochs) == ("constant", 40)
    assert (cosine[2][2].lr_schedule, cosine[2][2].epochs) == ("cosine", 60)
    assert cosine[2][2].method_params["teacher"] == str(plain[0][3] / "best_model.pt")


def test_recipe_overlay_sets_the_three_seed_isnet_study(tmp_path):
    """`--overlay configs/study_isnet_recipe.json` (or MONAI's list of config files) gives the
    documented 3-seed study: the teacher + background-swap ISNet at P 0.5 beside its P 0
    ablation, both with a random gamma and 60 epochs, as the bias-free reference; the standard
    model and the teachers at the study's 40 epochs; the rest of configs/study.json is kept."""
    from monai.bundle import ConfigParser

    from pipeline.cli import study_config_files

    base = ROOT / "configs" / "study.json"
    files = study_config_files(base, overlays=[ROOT / "configs" / "study_isnet_recipe.json"])
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    cfg = parser.get_parsed_content("study")
    shipped = StudyConfig.from_dict(_study_def())
    assert cfg.seeds == (0, 1, 2) and cfg.train["epochs"] == 40
    assert cfg.synthetic == shipped.synthetic and cfg.masks == shipped.masks
    isnets = {m.display: m.params for m in cfg.methods if m.name == "isnet"}
    assert len(isnets) == 2
    for params in isnets.values():
        assert params["teacher"] == "segment_then_classify" and params["swap_background"] is True
    assert sorted(p["P"] for p in isnets.values()) == [0.0, 0.5]
    (reference,) = [m for m in cfg.methods if m.train_data == "no_markers"]
    recipe = {"augment": "intensity+gamma", "epochs": 60}
    assert all(m.train == recipe for m in cfg.methods if m.name == "isnet")
    assert reference.train == {**recipe, "augment": "full+gamma"}
    assert all(not m.train for m in cfg.methods if m.name == "segment_then_classify")
    # --quick comes before the overlay; a missing overlay is named before any work
    assert study_config_files(base, quick=True)[1].name == "study_quick.json"
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["study", "run", str(base), "--overlay", "nosuch.json", "--out", str(out)]
    )
    assert res.exit_code == 2 and "study config not found: nosuch.json" in res.output
    assert not out.exists()


def test_trained_models_finds_one_finished_folder_per_seed_and_refuses_two(tmp_path):
    """pipeline.study.trained_models (the diagnostics' way to a study's models): finished
    folders of exactly that label, in seed order (10 after 2); an unfinished folder and a label
    that only starts the same are left out; two finished configs of one seed are refused by
    name."""
    from pipeline.study import trained_models

    def folder(name, done=True):
        d = tmp_path / "models" / "main" / name
        d.mkdir(parents=True)
        if done:
            (d / "done.json").write_text("{}")
        return d

    s10, s2 = (
        folder("isnet-stochastic-seed10-aaaaaaaaaa"),
        folder("isnet-stochastic-seed2-bbbbbbbbbb"),
    )
    folder("isnet-stochastic-seed3-cccccccccc", done=False)
    folder("isnet-stochastic-60ep-seed0-dddddddddd")
    assert trained_models(tmp_path, "isnet-stochastic") == [s2, s10]
    with pytest.raises(ValueError, match="no finished model of method 'rrr'"):
        trained_models(tmp_path, "rrr")
    again = folder("isnet-stochastic-seed2-eeeeeeeeee")
    with pytest.raises(ValueError, match="more than one model") as err:
        trained_models(tmp_path, "isnet-stochastic")
    assert str(again) in str(err.value) and str(s2) in str(err.value)


def test_paired_tests_pooled_over_seeds_average_the_per_seed_differences():
    """The study's seed-pooled paired test: one row per comparison and dataset, the mean of
    the per-seed differences, on the same data as the per-seed rows (fabricated predictions:
    nothing is trained)."""
    from pipeline.study import EvalSet, Fold, Predictions, _paired_tests

    rng = np.random.default_rng(0)
    n, classes = 90, ["normal", "pneumonia", "covid"]
    labels = np.arange(n) % 3
    frame = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(n)]})
    fold = Fold("all", ("a",), frame, frame, (EvalSet("site-x", "external", frame),))
    methods = [{"name": "standard"}, {"name": "isnet", "params": {"variant": "selective"}}]
    cfg = StudyConfig.from_dict({**_study_def(), "methods": methods, "seeds": [0, 1, 2]})

    def probs(signal: float) -> np.ndarray:
        logits = rng.normal(size=(n, 3)) + signal * np.eye(3)[labels]
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    preds = {
        ("all", m, s, "site-x"): Predictions(probs(sig), labels, {}, [])
        for s in (0, 1, 2)
        for m, sig in (("standard", 0.5), ("isnet-selective", 1.5))
    }
    per_seed = _paired_tests(cfg, [fold], preds, classes)
    pooled = _paired_tests(cfg, [fold], preds, classes, pooled=True)
    assert list(per_seed["seed"]) == [0, 1, 2] and "seed" not in pooled.columns
    (row,) = pooled.to_dict("records")
    assert (row["isnet"], row["comparator"], row["n_seeds"]) == ("isnet-selective", "standard", 3)
    assert row["difference"] == pytest.approx(per_seed["difference"].mean())
    assert row["ci_low"] > 0  # a large, consistent difference
