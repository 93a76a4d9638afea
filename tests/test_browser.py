"""The web surfaces in a real browser: the MLflow UI as the README starts it (`dynaprompt ui`), and the
self-contained report.

Debian's chromium (bin/setup installs it) driven by the playwright package; `playwright install` is never run.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from dynaprompt.ui import WORKFLOW_STORAGE_KEY

from .conftest import free_port, sweep_params

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
pytestmark = [pytest.mark.slow, pytest.mark.browser]
EXPERIMENT_TAB = re.compile(r"#/experiments/\d+/(\w+)")  # MLflow's route to one of an experiment's tabs


@pytest.fixture(scope="module")
def driver():
    """Playwright, for Debian's chromium."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed (bin/setup installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(driver):
    launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def swept(prefect_server, image_root, tmp_path_factory):
    """A small sweep, logged to MLflow, as `dvc repro` would log it."""
    from flows.sweep import run_sweep

    root = tmp_path_factory.mktemp("ui")
    params = sweep_params(image_root, root, datasets=["toy-a"], methods=["tpt", "online_tpt", "dynaprompt"])
    outcome = run_sweep(str(params))
    return root, params, outcome


@pytest.fixture(scope="module")
def dynaprompt_ui(swept):
    """`dynaprompt ui` as the README starts it, on a free loopback port: its base URL and what it printed."""
    _, params, _ = swept
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([sys.executable, "-m", "dynaprompt.cli", "ui", "--params", str(params), "--port",
                               str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(server.pid, signal.SIGTERM)
        pytest.fail(f"dynaprompt ui did not start: {server.communicate(timeout=60)[1]}")
    printed = server.stdout.readline()
    yield url, printed
    os.killpg(server.pid, signal.SIGTERM)  # it stops mlflow ui (its own process group) on the way out
    assert server.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def mlflow_ui(dynaprompt_ui):
    """The MLflow UI's base URL (behind `dynaprompt ui`'s front)."""
    return dynaprompt_ui[0]


def fresh_profile(driver, folder):
    """A browser profile that never saw MLflow: its own empty folder, so no stored workflow and no cookies."""
    return driver.chromium.launch_persistent_context(str(folder), executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                                                     viewport={"width": 1600, "height": 1000})


def api(url: str, path: str, body: dict) -> dict:
    """POST to MLflow's REST API."""
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def experiment_id(url: str) -> str:
    found = urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=test", timeout=30)
    return json.loads(found.read())["experiment"]["experiment_id"]


def runs_link(url: str, experiment: str) -> str:
    """The link `dynaprompt ui` prints: the experiment's runs, in MLflow's model-training view."""
    return f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def test_the_root_page_opens_the_experiments_runs_in_a_fresh_browser(driver, dynaprompt_ui, swept, tmp_path):
    """The URL anyone would type, in a browser profile that never saw MLflow: the runs at once, not the GenAI
    overview; unfolding the sweep (a click in the runs table) shows its children as dataset/method/ordering."""
    url, printed = dynaprompt_ui
    experiment = experiment_id(url)
    assert f"{runs_link(url, experiment)}\n" in printed  # the link `dynaprompt ui` prints
    names = sorted(run["info"]["run_name"] for run in api(url, "runs/search", {
        "experiment_ids": [experiment], "filter": "tags.kind = 'run'", "max_results": 100})["runs"])
    assert len(names) == swept[2]["runs"] and all(re.fullmatch(r"toy-a/[a-z_]+/[a-z]+-\d+", n) for n in names)
    context = fresh_profile(driver, tmp_path / "profile")
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(f"{url}/")
        page.get_by_role("heading", name="Runs").wait_for(timeout=60000)
        assert f"#/experiments/{experiment}/runs" in page.url and "workflowType=machine_learning" in page.url
        assert page.get_by_text("Traces 0").count() == 0
        page.get_by_text(re.compile(r"^sweep \d{8}-\d{6}")).first.wait_for(timeout=30000)  # the parent's row
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # unfold the sweep
        for name in names:
            page.get_by_text(name, exact=True).first.wait_for(timeout=30000)
        # a link into the app keeps its route: only a URL without one lands on the runs
        page.goto(f"{url}/#/experiments")
        page.get_by_role("link", name="test", exact=True).first.wait_for(timeout=60000)
        assert "#/experiments" in page.url and "/runs" not in page.url
    finally:
        context.close()


def test_the_printed_link_opens_the_experiment_on_its_runs_with_children_nested(browser, mlflow_ui, swept):
    _, _, outcome = swept
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(runs_link(mlflow_ui, experiment_id(mlflow_ui)))
    page.get_by_role("heading", name="Runs").wait_for(timeout=60000)
    assert "/runs" in page.url and "traces" not in page.url and "overview" not in page.url
    page.get_by_text(re.compile(r"^sweep \d{8}-\d{6}")).first.wait_for(timeout=30000)  # the parent's row
    matching = page.get_by_text(re.compile(r"[1-9]\d* matching runs"))
    matching.wait_for(timeout=30000)
    assert matching.inner_text().startswith(f"{outcome['runs'] + 1} matching")  # the sweep + its children
    assert page.get_by_text("toy-a/dynaprompt/shuffle-0").count() == 0  # children are nested, folded
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # unfold the sweep
    page.get_by_text("toy-a/dynaprompt/shuffle-0").first.wait_for(timeout=30000)
    page.close()


def opened_tab(page) -> str:
    """The experiment's tab MLflow settles on (runs, overview, traces, ...) once its redirect has run."""
    page.wait_for_function("pattern => new RegExp(pattern).test(location.hash)", arg=EXPERIMENT_TAB.pattern,
                           timeout=60000)
    return EXPERIMENT_TAB.search(page.url).group(1)


@pytest.mark.parametrize("path", ["the experiment's link", "a click in the experiments list"])
def test_every_path_into_the_experiment_opens_its_runs_in_a_fresh_browser(driver, dynaprompt_ui, path, tmp_path):
    """`/#/experiments/<id>` (the link a colleague pastes) and a click on the experiment in MLflow's own list, in
    a profile that never chose a workflow: the runs table (the sweep's row), not the GenAI Overview or Traces."""
    url, _ = dynaprompt_ui
    experiment = experiment_id(url)
    context = fresh_profile(driver, tmp_path / "profile")
    try:
        page = context.pages[0] if context.pages else context.new_page()
        if path == "the experiment's link":
            page.goto(f"{url}/#/experiments/{experiment}")
        else:
            page.goto(f"{url}/#/experiments")
            link = page.get_by_role("link", name="test", exact=True).first
            link.wait_for(timeout=60000)
            assert "workflowType" not in (link.get_attribute("href") or "")  # MLflow's own link, not ours
            link.click()
        assert opened_tab(page) == "runs", page.url
        page.get_by_role("heading", name="Runs").wait_for(timeout=60000)
        page.get_by_text(re.compile(r"^sweep \d{8}-\d{6}")).first.wait_for(timeout=30000)  # a run's name
        assert page.get_by_text("Traces 0").count() == 0 and page.get_by_text("Overview", exact=True).count() == 0
        # what MLflow's switch would have stored for "Model training": its links keep opening the runs
        assert page.evaluate("key => localStorage.getItem(key)", WORKFLOW_STORAGE_KEY) == '"machine_learning"'
    finally:
        context.close()


def test_a_browser_that_chose_genai_keeps_its_choice(driver, dynaprompt_ui, tmp_path):
    """The script sets the workflow only where none was chosen: a user who picked GenAI in MLflow's switch keeps
    it, and the printed link still opens the runs (its route says workflowType)."""
    url, _ = dynaprompt_ui
    experiment = experiment_id(url)
    context = fresh_profile(driver, tmp_path / "profile")
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(f"{url}/#/experiments")
        page.evaluate("key => localStorage.setItem(key, JSON.stringify('genai'))", WORKFLOW_STORAGE_KEY)  # the switch
        for link, tabs in ((f"{url}/#/experiments/{experiment}", ("overview", "traces")),
                           (runs_link(url, experiment), ("runs",))):
            page.goto("about:blank")  # a new page load each time, so the app reads what is stored
            page.goto(link)
            assert opened_tab(page) in tabs, page.url
        assert page.evaluate("key => localStorage.getItem(key)", WORKFLOW_STORAGE_KEY) == '"genai"'
    finally:
        context.close()


def test_comparing_three_runs_plots_the_block_metric(browser, mlflow_ui, swept):
    experiment = experiment_id(mlflow_ui)
    found = api(mlflow_ui, "runs/search", {"experiment_ids": [experiment], "filter": "tags.kind = 'run'",
                                            "max_results": 3})["runs"]
    ids = json.dumps([run["info"]["run_id"] for run in found]).replace(" ", "")
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments=[\"{experiment}\"]")
    page.get_by_text("Comparing 3 Runs").wait_for(timeout=60000)
    page.get_by_role("link", name="accuracy_block4").first.click()
    page.wait_for_url("**/metric**", timeout=30000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30000)
    assert page.get_by_text("Step").count() >= 1  # the x axis is the block index
    # one curve per run (plotly may draw a line and a marker trace for each): count the runs the traces belong to
    names = page.locator(".js-plotly-plot").first.evaluate("plot => plot.data.map(trace => trace.name)")
    assert len(set(names)) == 3, names
    page.close()


def test_a_second_sweep_adds_no_duplicate_runs(mlflow_ui, swept):
    from flows.sweep import run_sweep

    _, params, outcome = swept
    experiment = experiment_id(mlflow_ui)
    again = run_sweep(str(params))
    assert again["computed"] == 0
    runs = api(mlflow_ui, "runs/search", {"experiment_ids": [experiment], "max_results": 1000})["runs"]
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
    assert len(children) == outcome["runs"]
    fingerprints = [t["value"] for r in children for t in r["data"]["tags"] if t["key"] == "fingerprint"]
    assert len(fingerprints) == len(set(fingerprints))


def test_the_report_loads_whole_and_offline(browser, tmp_path):
    """report.html: every image decoded, no failed or external request, no console error."""
    from dynaprompt.config import settings_from_params
    from stages.report import build_report

    from .test_report import params as report_params
    from .test_report import write_results

    write_results(tmp_path)
    build_report(settings_from_params(report_params(tmp_path)))
    page = browser.new_page()
    errors, failed, external = [], [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.on("request", lambda request: external.append(request.url)
            if not request.url.startswith(("file:", "data:")) else None)
    page.goto((tmp_path / "reports" / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = page.locator("img")
    assert images.count() >= 8
    decoded = images.evaluate_all("els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert all(decoded), decoded
    alts = images.evaluate_all("els => els.map(e => e.alt)")
    assert all(alt and not alt.startswith("figures/") for alt in alts), alts
    assert errors == [] and failed == [] and external == []
    page.close()


def test_every_figure_of_the_report_reads_at_a_1280_px_window(browser, tmp_path):
    """Shown at 1280 px, no figure is scaled up (blur) and none so far down that its smallest text (which the
    PNG records, at the dpi it records) falls below 9 pt, i.e. 12 CSS px."""
    from PIL import Image

    from dynaprompt.config import settings_from_params
    from stages.report import build_report
    from stages.reporting.figures import MIN_FONT_KEY

    from .test_report import params as report_params
    from .test_report import write_results

    write_results(tmp_path)
    build_report(settings_from_params(report_params(tmp_path)))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((tmp_path / "reports" / "report.html").as_uri())
    page.wait_for_load_state("load")
    shown = page.locator("img").evaluate_all("els => els.map(e => ({alt: e.alt.slice(0, 40), src: e.src, "
                                             "natural: e.naturalWidth, width: e.getBoundingClientRect().width, "
                                             "column: e.parentElement.getBoundingClientRect().width}))")
    page.close()
    assert len(shown) >= 8
    for figure in shown:
        with Image.open(io.BytesIO(base64.b64decode(figure["src"].split(",", 1)[1]))) as png:
            smallest, dpi = float(png.info.get(MIN_FONT_KEY, 0)), png.info["dpi"][0]
        scale = figure["width"] / figure["natural"]
        text_px = smallest * dpi / 72 * scale
        assert scale <= 1.0 + 1e-6, figure["alt"]  # drawn at least as wide as it is shown
        assert figure["width"] <= figure["column"] + 0.5, figure["alt"]
        assert text_px >= 12.0, (figure["alt"], smallest, round(scale, 3), round(text_px, 1))


def test_dvc_plots_render_offline_from_the_plot_data(browser, tmp_path):
    """`dvc plots show` with bin/plots-template's template: the charts draw with no request leaving the page."""
    import yaml

    from dynaprompt.config import settings_from_params
    from stages.report import build_report

    from .conftest import ROOT
    from .test_report import params as report_params
    from .test_report import write_results

    template = ROOT / ".dvc" / "plots" / "offline.html"
    if not template.is_file():
        subprocess.run(["bash", str(ROOT / "bin" / "plots-template")], check=True, timeout=300)
    write_results(tmp_path)
    build_report(settings_from_params(report_params(tmp_path)))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["plots"]
    project = tmp_path / "project"
    (project / "reports").mkdir(parents=True)
    shutil.copytree(tmp_path / "reports" / "plots", project / "reports" / "plots")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{p: {k: v for k, v in c.items() if k != "cache"}}
                                                                for entry in stages for p, c in entry.items()]}))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out", "--html-template",
                            str(template)], cwd=project, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    page = browser.new_page()
    external, errors = [], []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("file:", "data:", "blob:"))
            else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto((project / "out" / "index.html").as_uri())
    page.wait_for_timeout(3000)
    assert page.locator(".vega-embed canvas, .vega-embed svg").count() >= 4  # every declared plot drew
    assert external == [] and errors == []
    page.close()
