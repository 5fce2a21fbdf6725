"""Screenshot the MLflow UI of a study's store with headless Chromium (Debian's packages).

Usage (any Python with ``pip install playwright``; Chromium from ``apt-get install
chromium-headless-shell`` or ``chromium``; the project's venv provides ``mlflow``)::

    python scripts/mlflow_screenshot.py STORE_URI EXPERIMENT OUT_PREFIX [--mlflow .venv/bin/mlflow]
        [--report outputs/study/report.html]
    python scripts/mlflow_screenshot.py --html results/index.html --png OUT.png \
        [--width 1200] [--height 1400]

Starts ``mlflow ui`` on a free localhost port, opens the experiment in the "Model training" view,
expands the run tree and writes ``OUT_PREFIX_runs.png``; then the first evaluation run's page
(``OUT_PREFIX_eval_run.png``, overview) and its ``heatmaps.png`` artifact opened in the
Artifacts tab (``OUT_PREFIX_eval_heatmaps.png``), the experiment's logged models
(``OUT_PREFIX_models.png``), the model registry (``OUT_PREFIX_registry.png``: one registered model
per method) and the newest study (parent) run's page: its description (the conclusion) and its
headline metrics, which method is best on the external site (``OUT_PREFIX_study_run.png``). With
``--report``, also the top of the report with its conclusion (``OUT_PREFIX_report.png``).

``--html`` screenshots one local HTML file instead (e.g. a batch run's ``index.html``): the top
``--height`` pixels of the page at ``--width``, no MLflow involved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium-headless-shell")


def _shoot_heatmaps(page, base: str, exp_id: str, run_id: str, png: str) -> None:
    """The run's Artifacts tab with ``heatmaps.png`` selected (its preview on the right)."""
    page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}/artifacts")
    page.wait_for_timeout(3000)
    with contextlib.suppress(Exception):
        page.get_by_text("heatmaps.png", exact=True).first.click(timeout=5000)
        page.wait_for_timeout(3000)
    page.screenshot(path=png)


def _api(base: str, path: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _launch(pw):
    """Headless Chromium (the system's) through Playwright."""
    return pw.chromium.launch(
        executable_path=_browser(),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )


def shoot_html(html: str, png: str, width: int, height: int) -> None:
    """Screenshot the top ``width`` x ``height`` px of the local file ``html`` into ``png``."""
    with sync_playwright() as pw:
        browser = _launch(pw)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_timeout(1500)
        page.screenshot(path=png)
        browser.close()
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uri", nargs="?")
    ap.add_argument("experiment", nargs="?")
    ap.add_argument("prefix", nargs="?")
    ap.add_argument("--mlflow", default=".venv/bin/mlflow")
    ap.add_argument("--report", default=None, help="report.html to screenshot (its top)")
    ap.add_argument("--html", default=None, help="a local HTML file to screenshot instead")
    ap.add_argument("--png", default=None, help="with --html: the PNG to write")
    ap.add_argument("--width", type=int, default=1200, help="with --html: viewport width")
    ap.add_argument("--height", type=int, default=1400, help="with --html: viewport height")
    args = ap.parse_args()
    if args.html:
        if not args.png:
            ap.error("--html needs --png")
        shoot_html(args.html, args.png, args.width, args.height)
        return
    if not (args.uri and args.experiment and args.prefix):
        ap.error("give STORE_URI EXPERIMENT OUT_PREFIX (or --html FILE --png OUT)")

    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [args.mlflow, "ui", "--backend-store-uri", args.uri, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        name = urllib.parse.quote(args.experiment)
        exp_id = _api(base, f"experiments/get-by-name?experiment_name={name}")["experiment"][
            "experiment_id"
        ]
        runs = _api(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 500})["runs"]
        eval_run = next(
            r for r in runs if any(t["key"] == "eval.dataset" for t in r["data"].get("tags", []))
        )
        parents = [
            r
            for r in runs
            if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))
        ]
        study_run = max(parents, key=lambda r: int(r["info"]["start_time"]))
        with sync_playwright() as pw:
            browser = _launch(pw)
            page = browser.new_page(viewport={"width": 1700, "height": 1000})
            page.goto(f"{base}/#/experiments/{exp_id}/runs")
            page.wait_for_timeout(5000)
            toggle = page.get_by_text("Model training", exact=True)
            if toggle.count():
                toggle.first.click()
                page.wait_for_timeout(2000)
            page.goto(f"{base}/#/experiments/{exp_id}/runs")
            page.wait_for_timeout(4000)
            with contextlib.suppress(Exception):  # the assistant side panel, if shown
                page.get_by_role("button", name="Close").first.click(timeout=2000)
            # expand the nested run tree (study -> training -> evaluation): click the "+"
            # expanders one at a time (each click re-renders the rows)
            plus = "button[data-component-id*='runnamecellrenderer']:has(path[d^='M7.25 7.25V4.5'])"
            for _ in range(40):
                if not page.locator(plus).count():
                    break
                with contextlib.suppress(Exception):
                    page.locator(plus).first.click(timeout=2000)
                page.wait_for_timeout(700)
            page.screenshot(path=f"{args.prefix}_runs.png")
            run_id = eval_run["info"]["run_id"]
            page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
            page.wait_for_timeout(8000)  # the parent/child run links load last
            page.screenshot(path=f"{args.prefix}_eval_run.png")
            _shoot_heatmaps(page, base, exp_id, run_id, f"{args.prefix}_eval_heatmaps.png")
            page.goto(f"{base}/#/experiments/{exp_id}/models")
            page.wait_for_timeout(4000)
            page.screenshot(path=f"{args.prefix}_models.png")
            page.goto(f"{base}/#/models")
            page.wait_for_timeout(4000)
            with contextlib.suppress(Exception):  # "new model registry UI" announcement
                page.get_by_role("dialog").get_by_role("button", name="Close").click(timeout=3000)
            page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
            page.screenshot(path=f"{args.prefix}_registry.png")
            page.goto(f"{base}/#/experiments/{exp_id}/runs/{study_run['info']['run_id']}")
            page.wait_for_timeout(4000)
            page.screenshot(path=f"{args.prefix}_study_run.png", full_page=True)
            if args.report:
                report = browser.new_page(viewport={"width": 1150, "height": 1100})
                report.goto(Path(args.report).resolve().as_uri())
                report.wait_for_timeout(1500)
                report.screenshot(path=f"{args.prefix}_report.png")
            browser.close()
        print(
            f"wrote {args.prefix}_runs.png, _eval_run.png, _eval_heatmaps.png, _models.png, "
            "_registry.png, _study_run.png"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
