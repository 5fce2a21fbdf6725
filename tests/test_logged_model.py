"""A study's logged model is a self-describing MLflow pyfunc model: named after its method, with
a signature, an input example, the class names and the model card, the project as a pip
requirement, registered (one registered model per method); and it loads with
``mlflow.pyfunc.load_model`` in a process where only the *installed* package is importable,
from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from classification.model_card import read_model_card
from pipeline.tracking import StudyTracker, project_requirements, registered_name
from tests.test_packaging import install_outside

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import numpy as np
import mlflow, mlflow.pyfunc
import pipeline
mlflow.set_tracking_uri(sys.argv[1])
out = {"pkg": pipeline.__file__}
for uri in (f"models:/{sys.argv[2]}", f"models:/{sys.argv[3]}/1"):
    model = mlflow.pyfunc.load_model(uri)
    x = np.random.default_rng(0).random((2, 1, 80, 72)).astype(np.float32)
    out[uri] = model.predict(x).to_dict(orient="list")
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_logged_model_loads_with_only_the_installed_package(tmp_path) -> None:
    folder = ROOT / "models"  # the shipped default classifier (model.pt + model.json)
    card = read_model_card(folder / "model.pt")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    train_df = pd.DataFrame(
        {
            "image": ["a.dcm", "b.dcm"],
            "label": ["covid", "normal"],
            "site": "s",
            "patient_id": ["p1", "p2"],
            "split": "train",
            "mask": "",
            "bias": "",
        }
    )
    with (
        StudyTracker("pyfunc", {}, tracking_uri=uri) as study,
        study.training_run(card.method, 0, {}, train_df) as tr,
    ):
        model_id = tr.log_pyfunc_model(folder, name=card.method)
    client = MlflowClient(uri)
    logged = client.get_logged_model(model_id)
    assert logged.name == card.method and logged.tags["classes"] == ",".join(card.classes)
    (version,) = client.search_model_versions(f"name='{registered_name(card.method)}'")
    assert version.model_id == model_id or version.source == f"models:/{model_id}"
    import mlflow.models

    where = Path(logged.artifact_location.removeprefix("file://"))
    info = mlflow.models.Model.load(where / "MLmodel")
    spec = info.signature.inputs.to_dict()[0]
    assert spec["type"] == "tensor" and list(spec["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    assert [c["name"] for c in info.signature.outputs.to_dict()][-1] == "label"
    assert info.metadata["classes"] == list(card.classes)
    assert info.metadata["model_card"]["method"] == card.method
    assert project_requirements()[0] in (where / "requirements.txt").read_text()
    assert (where / "input_example.json").is_file()

    # install from a copy of the source into a private folder; load from elsewhere
    site = install_outside(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, uri, model_id, registered_name(card.method)],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(s for s in res.stdout.splitlines() if s.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out.pop("pkg").startswith(str(site))  # not the checkout
    for preds in out.values():
        probs = np.array([preds[f"prob_{c}"] for c in card.classes]).T
        assert probs.shape == (2, 3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert set(preds["label"]) <= set(card.classes)
