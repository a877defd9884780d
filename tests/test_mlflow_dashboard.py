"""The MLflow dashboard in headless Chromium: `mlflow server` on a real lifecycle's store (the
tiny lifecycle: data -> pretrain -> eval). herd's link opens the lifecycle run as model training,
the run lists its child runs, and the pretraining run's loss chart renders. Screenshots are kept
in $HERD_TEST_ARTIFACTS (default runs/test-artifacts)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from flows.tracking import dashboard_url
from tests.mlflow_server import mlflow_server
from tests.test_serve_chat_page import browser  # noqa: F401 - the headless Chromium fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("HERD_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))


def page_text(b) -> str:
    return b.js("document.body ? document.body.innerText : ''") or ""


def open_page(b, url: str, ready: str, timeout: float = 120) -> str:
    """Navigate, then wait until the page's JS expression `ready` is truthy; returns the page text."""
    b.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b.js(f"(() => {{ try {{ return !!({ready}); }} catch (e) {{ return false; }} }})()"):
            return page_text(b)
        time.sleep(0.5)
    raise AssertionError(f"{url}: not ready ({ready}) after {timeout}s:\n{page_text(b)[:2000]}")


def screenshot(b, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"]))
    return path


def test_lifecycle_run_opens_as_model_training_with_children_and_loss_chart(tmp_path, browser):  # noqa: F811 (the fixture is imported)
    from mlflow import MlflowClient

    from flows.lifecycle.run import run_lifecycle

    store = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_lifecycle(
        REPO / "configs" / "lifecycle" / "tiny.yaml", workdir=str(tmp_path / "runs"), tracking_uri=store
    )
    client = MlflowClient(store)
    exp = client.get_run(res.parent_run_id).info.experiment_id
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    children = {
        r.data.tags["herd.stage"]: r
        for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    }
    assert set(children) == {"data", "pretrain", "eval"}

    browser.call("Page.enable")
    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
    with mlflow_server(tmp_path / "server", backend=store) as url:
        # The lifecycle run's page, from the link `herd run` prints: its child runs are listed.
        text = open_page(
            browser,
            dashboard_url(url, exp, res.parent_run_id),
            "(t => t.includes('Child runs') && !t.includes('Child runs loading') && "
            "['data', 'pretrain', 'eval'].every(n => t.slice(t.lastIndexOf('Child runs')).includes(n)))"
            "(document.body.innerText)",
        )
        shot = screenshot(browser, "mlflow-lifecycle-run.png")
        child_list = text.rsplit("Child runs", 1)[1].split("Source", 1)[0]
        assert {"data", "pretrain", "eval"} <= {n.strip(" ,\n") for n in child_list.split()}
        assert "lifecycle-tiny" in text and "Model metrics" in text
        # The experiment: the runs table (model training), not the GenAI traces overview.
        text = open_page(
            browser,
            dashboard_url(url, exp),
            "document.body.innerText.includes('matching runs') && document.body.innerText.includes('lifecycle-tiny')",
        )
        assert "Run Name" in text and "Detect Issues" not in text
        # The pretraining run's metric charts: the loss chart is drawn (a plotly plot with a trace).
        pretrain = children["pretrain"].info.run_id
        assert "loss" in children["pretrain"].data.metrics
        open_page(
            browser,
            f"{dashboard_url(url, exp, pretrain).replace('?', '/model-metrics?')}",
            "[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')].some(card => "
            "card.innerText.split('\\n')[0] === 'loss' && "
            "card.querySelectorAll('.js-plotly-plot g.trace').length > 0)",
        )
        charts = browser.js("document.querySelectorAll('.js-plotly-plot').length")
        loss_shot = screenshot(browser, "mlflow-pretrain-loss.png")
    print(
        f"lifecycle run page lists child runs {sorted(children)}; pretrain run: {charts} metric charts; "
        f"screenshots {shot}, {loss_shot}"
    )
    assert charts >= 1 and shot.stat().st_size > 10_000 and loss_shot.stat().st_size > 10_000
