"""The course where readers use it: JupyterLab driven in a real Chromium, and the static site.

JupyterLab runs on 127.0.0.1 (a free port, a token, no browser of its own, temporary settings and
runtime folders) over a copy of the notebooks, so that nothing it saves touches the committed ones.
Chromium is Debian's (/usr/bin/chromium, which .ci/run installs when it is missing); without it,
or without Playwright, these tests are skipped with a message that says so. Every server is shut
down and every process it started is killed, also when a test fails. Screenshots go to
build/screenshots/.
"""

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ddpm_lib.checkpoint import load_model
from ddpm_lib.classifier import load_classifier, predict
from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.sampling import sample
from ddpm_lib.scrubber import read_scrubber
from ddpm_lib.solvers import SOLVERS

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
sys.path.insert(0, str(ROOT / "scripts"))
from headless import ARGS, CHROMIUM, served  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does it where it can)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need Playwright for Python: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def offline_page(browser, base: str):
    """A page that may load only from ``base``: no CDN, no telemetry, nothing from the outside."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
    return page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(folder: Path) -> list[int]:
    """PIDs whose command line names ``folder``: the server and the kernels it started (their connection files live there)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except OSError:
            pass  # gone meanwhile
    return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of the notebooks; yields its base URL and token."""
    home = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", home / "notebooks", ignore=shutil.ignore_patterns("*.pt", "*.gif", ".ipynb_checkpoints"))
    for folder in ("checkpoints", "docs"):  # what the notebooks read, read-only
        (home / folder).symlink_to(ROOT / folder)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, DDPM_SMOKE="1")
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR"):
        env[name] = str(home / ".jupyter" / name.lower())
    settings = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # every cell in the page
    (settings / "apputils-extension").mkdir()
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0"]
    command += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}", "--expose-app-in-browser"]
    command += ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
    command += ["--allow-root"] if os.geteuid() == 0 else []
    log = (home / "server.log").open("w")
    server = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(home / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield base, token
    finally:
        try:  # the server's own shutdown, which stops its kernels first
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        deadline = time.monotonic() + 10
        while (left := processes_under(home)) and time.monotonic() < deadline:  # a kernel that outlived its server
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        log.close()
        assert not processes_under(home), "processes of the JupyterLab test were left behind"


def run_cells(page, base: str, token: str, notebook: str, timeout_s: float, through: str) -> None:
    """Open ``notebook`` in JupyterLab, run its cells from the top through the first one whose source contains
    ``through`` (what the test needs; nbval runs them all), and wait until the kernel is done."""
    page.goto(f"{base}/lab/tree/notebooks/{notebook}?reset&token={token}")  # reset: not the previous test's open notebooks
    current = f"window.jupyterapp?.shell.currentWidget?.context?.path === 'notebooks/{notebook}'"
    page.wait_for_function(
        f"() => {current} && window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'", timeout=90_000
    )
    # Clear the committed outputs first: their execution counts would otherwise pass for this run's.
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    cleared = (
        "() => window.jupyterapp.shell.currentWidget.content.widgets.every(c => c.model.type !== 'code' || c.model.executionCount === null)"
    )
    page.wait_for_function(cleared)
    last = page.evaluate(
        "(text) => window.jupyterapp.shell.currentWidget.content.widgets.findIndex(c => c.model.sharedModel.getSource().includes(text))",
        through,
    )
    assert last >= 0, f"no cell of {notebook} contains {through!r}"
    page.evaluate(
        """(last) => {
        const notebook = window.jupyterapp.shell.currentWidget.content;
        notebook.activeCellIndex = last + 1;  // past the last: run-all-above runs the cells before it
        window.jupyterapp.commands.execute(last + 1 < notebook.widgets.length ? 'notebook:run-all-above' : 'notebook:run-all-cells');
    }""",
        last,
    )
    done = """(last) => {
        const w = window.jupyterapp.shell.currentWidget, kernel = w.sessionContext.session?.kernel;
        const cells = w.content.widgets.slice(0, last + 1).filter(c => c.model.type === 'code');
        const ran = cells.every(c => c.model.executionCount !== null && !c.promptNode.textContent.includes('*'));
        const failed = document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
        return kernel?.status === 'idle' && (ran || failed !== null);
    }"""
    page.wait_for_function(done, arg=last, timeout=timeout_s * 1000, polling=500)


def errors_shown(page) -> list[str]:
    return [e.inner_text()[:500] for e in page.query_selector_all('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]


def drag_widget_slider(page, name: str, keys: list[str]) -> tuple[str, str]:
    """Move the notebook's only timestep slider with the keyboard; return the readout before and after,
    after checking that the picture below it changed. Saves a screenshot of the widget."""
    widget = page.locator(".widget-vbox:has(.widget-slider)").first
    try:
        widget.wait_for(state="visible", timeout=60_000)
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / f"{name}_failed.png", full_page=True)
        raise
    widget.scroll_into_view_if_needed()
    image, readout = widget.locator("img").first, widget.locator(".widget-readout").first
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    before, picture = readout.inner_text(), image.screenshot()
    widget.locator(".noUi-handle").first.focus()
    for key in keys:
        page.keyboard.press(key)
    page.wait_for_function("([r, v]) => r.textContent.trim() !== v", arg=[readout.element_handle(), before])
    page.wait_for_timeout(300)  # the kernel renders the new frame and sends it back
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.screenshot() != picture, f"{name}: the slider moved but the picture did not change"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    widget.screenshot(path=SCREENSHOTS / f"{name}.png")
    return before, readout.inner_text()


@pytest.mark.parametrize(
    "notebook, through, name, keys, before, after",
    [  # arrows move by 1, pages by 5: from the clean digits up into the noise, and from pure noise down toward the digits
        ("01_forward_process.ipynb", "forward_explorer(", "jupyterlab_forward_process", ["ArrowRight"] * 3 + ["PageUp"] * 40, "0", "203"),
        ("06_sampling.ipynb", "trajectory_viewer(", "jupyterlab_reverse_process", ["ArrowRight"] * 2 + ["PageUp"] * 2, "0", "12"),
    ],
)
def test_a_timestep_slider_in_jupyterlab(browser, lab, notebook, through, name, keys, before, after):
    base, token = lab
    page = offline_page(browser, base)
    run_cells(page, base, token, notebook, timeout_s=400, through=through)
    assert errors_shown(page) == []
    assert drag_widget_slider(page, name, keys) == (before, after)
    page.close()


@pytest.fixture(scope="module")
def site_server(tmp_path_factory):
    """The built site served on 127.0.0.1, with no kernel anywhere."""
    import build_site

    site = tmp_path_factory.mktemp("served") / "site"
    build_site.build(site)
    with served(site) as base:
        yield base, site


def test_the_site_typesets_its_math_with_nothing_from_outside(browser, site_server):
    base, _ = site_server
    page = offline_page(browser, base)  # every request outside 127.0.0.1 fails
    outside, missing = [], []
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "about:")) else outside.append(r.url))
    # A font may be missing: the hidden MathML that MathJax adds for screen readers names the TeX fonts, which the
    # pinned package does not ship (what readers see is drawn in STIX-Web). A script, a style sheet or an image may not.
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 and r.request.resource_type != "font" else None)
    page.goto(f"{base}/notebooks/01_forward_process.html")
    typeset = "() => window.MathJax?.Hub?.queue?.running === 0 && window.MathJax.Hub.queue.pending === 0"
    page.wait_for_function(typeset + " && document.querySelectorAll('.MathJax, .MathJax_Display').length > 50", timeout=60_000)
    shown = page.inner_text("body")
    assert "Towards" in shown and "\\mathcal" not in shown and "$" not in shown.split("Towards", 1)[1][:60]  # no raw TeX left
    assert page.locator(".MathJax_Error, .merror").count() == 0  # nothing MathJax could not parse
    assert outside == [] and missing == [], (outside, missing)  # nothing asked of the web, no code the site lacks
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".MathJax_Display").first.screenshot(path=SCREENSHOTS / "site_math.png")
    page.close()


@pytest.mark.parametrize("notebook, keys", [("01_forward_process", ["ArrowRight"] * 3), ("08_guidance", ["ArrowRight"] * 2)])
def test_a_kernel_free_scrubber_on_the_site(browser, site_server, notebook, keys):
    base, site = site_server
    page = offline_page(browser, base)
    page.goto(f"{base}/notebooks/{notebook}.html")
    root = page.locator(".ddpm-scrubber").first
    root.scroll_into_view_if_needed()
    assert root.locator(".ddpm-static").count() == 0  # the script ran: the static picture made way for the inputs
    scrubber = read_scrubber((site / "notebooks" / f"{notebook}.html").read_text())  # the page's first, as served
    first = root.locator("input[type=range]").first
    start = int(first.input_value())
    first.focus()
    for key in keys:
        page.keyboard.press(key)
    moved = int(first.input_value())
    assert moved == min(start + len(keys), len(next(iter(scrubber.axes.values()))) - 1) and moved != start
    index = (moved, *scrubber.start[1:])
    shown = root.locator("img").first.get_attribute("src")
    assert shown == f"data:image/{scrubber.image_format};base64," + base64.b64encode(scrubber.frames[index]).decode()
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", root.locator("img").first.element_handle())
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    root.screenshot(path=SCREENSHOTS / f"site_{notebook}.png")
    page.close()


# --- The live sampler: the shipped models in the browser (onnxruntime-web, a web worker, DDIM in JavaScript) ---


@pytest.fixture(scope="module")
def sampler_page(browser, site_server):
    """The served sampler page, offline; yields (page, requests that left 127.0.0.1)."""
    base, site = site_server
    if not (site / "sampler.html").is_file():
        pytest.skip("the site was built without the live sampler: npm could not install onnxruntime-web (see make site's message)")
    page = offline_page(browser, base)
    outside = []
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "about:", "blob:")) else outside.append(r.url))
    page.goto(f"{base}/sampler.html")
    yield page, outside
    page.close()


def judged(values: list[float], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's classifier on n browser samples (flat, [-1, 1]): (top probability, digit), each (n,)."""
    x = torch.tensor(values, dtype=torch.float32).reshape(n, 1, 28, 28)
    probs = predict(load_classifier(ROOT / "checkpoints" / "mnist_classifier.pt"), x)[1]
    return probs.max(dim=1)


def press_sample(page, timeout_s: float = 120) -> list[float]:
    page.evaluate("() => { document.body.dataset.state = 'running'; }")
    page.click("#sample")
    page.wait_for_function("() => document.body.dataset.state !== 'running'", timeout=timeout_s * 1000)
    assert page.evaluate("() => document.body.dataset.state") == "done", page.inner_text("#progress")
    return page.evaluate("() => Array.from(window.ddpmSampler.frames().at(-1).x_t)")


def test_the_live_sampler_draws_digits_offline_and_its_slider_scrubs_them(sampler_page):
    page, outside = sampler_page
    values = press_sample(page)
    top, _ = judged(values, 16)
    assert (top >= 0.9).sum() >= 10, top  # digits, as the course's classifier sees them (DDIM-20: 87% confident)
    assert "16 digits, 20 DDIM steps" in page.inner_text("#progress")
    picture = page.locator("#x0").screenshot()
    slider = page.locator("#t-slider")
    slider.focus()
    for _ in range(15):
        page.keyboard.press("ArrowLeft")  # back toward the noise
    assert page.inner_text("#t-readout").startswith("t = ") and page.locator("#x0").screenshot() != picture
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "site_sampler.png", full_page=True)
    assert outside == [], outside


def test_the_live_sampler_asks_the_cfg_model_for_a_digit(sampler_page):
    page, outside = sampler_page
    page.select_option("#model", "mnist_cfg")
    page.select_option("#digit", "7")
    page.fill("#w", "1")
    _, digit = judged(press_sample(page), 16)
    assert (digit == 7).sum() >= 14, digit  # w = 1: 99% drawn as asked (notebook 8)
    assert outside == [], outside


def test_the_guidance_page_embeds_the_sampler_with_the_class_conditional_model(browser, site_server):
    base, site = site_server
    if not (site / "sampler.html").is_file():
        pytest.skip("the site was built without the live sampler: npm could not install onnxruntime-web (see make site's message)")
    page = offline_page(browser, base)
    page.goto(f"{base}/notebooks/08_guidance.html")
    page.locator("iframe").first.scroll_into_view_if_needed()  # it loads lazily
    frame = page.frame_locator("iframe").first
    frame.locator("body[data-state=idle]").wait_for(timeout=30_000)  # the page's script has read its parameters
    assert frame.locator("#model").input_value() == "mnist_cfg" and frame.locator("#digit").is_visible()
    assert not frame.locator("h1").is_visible()  # embedded: the page's own heading and navigation stay out
    page.close()


def test_opened_as_a_file_the_sampler_page_says_how_to_serve_it(browser, site_server):
    _, site = site_server
    if not (site / "sampler.html").is_file():
        pytest.skip("the site was built without the live sampler: npm could not install onnxruntime-web (see make site's message)")
    page = browser.new_page()  # file:// is not the network: nothing to block
    page.goto((site / "sampler.html").as_uri())
    assert "python -m http.server -d site" in page.inner_text("#progress")  # Chromium runs no worker from a file
    page.close()


@pytest.mark.parametrize(
    "model, labels, w, solver, steps",
    [
        ("mnist_ddpm", None, 0.0, "ddim", 20),
        ("mnist_cfg", [3, 7, 0, 9], 2.0, "ddim", 20),
        ("mnist_ddpm", None, 0.0, "dpmpp2m", 10),
        ("mnist_cfg", [1, 4, 4, 8], 1.0, "dpmpp3m", 10),  # order 1, 2, 3, and 2 again on the second-to-last step
        ("mnist_flow", None, 0.0, "ddim", 10),  # the linear path's uniform grid, from the export
    ],
)
def test_the_browser_draws_what_the_python_sampler_draws_from_the_same_noise(sampler_page, model, labels, w, solver, steps):
    page, _ = sampler_page
    unet, diffusion = load_model(ROOT / "checkpoints" / f"{model}.pt")
    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    asked = None if labels is None else torch.tensor(labels)
    expected = sample(guided(Denoiser(unet, diffusion), asked, guidance=w), x_T.shape, SOLVERS[solver](steps), x_T=x_T)
    options = {"model": model, "xT": x_T.flatten().tolist(), "labels": labels, "w": w, "steps": steps, "solver": solver}
    got = torch.tensor(page.evaluate("async (o) => Array.from(await window.ddpmSampler.run(o))", options)).reshape(x_T.shape)
    assert (got - expected).abs().max() <= 1e-3, (got - expected).abs().max()


@pytest.fixture(scope="module")
def flow_in_the_site(sampler_page, site_server, flow_checkpoint):
    """The test's linear-flow checkpoint exported beside the shipped models in the served site (models/flow.*), and a
    copy of mnist_ddpm whose metadata names a parametrization no page knows (models/unknown.*)."""
    from ddpm_lib.onnx_export import export_onnx, read_metadata

    _, site = site_server
    export_onnx(flow_checkpoint, site / "models" / "flow.onnx")
    (site / "models" / "flow.json").write_text(json.dumps(read_metadata(site / "models" / "flow.onnx")))
    shutil.copy2(site / "models" / "mnist_ddpm.onnx", site / "models" / "unknown.onnx")
    meta = json.loads((site / "models" / "mnist_ddpm.json").read_text())
    (site / "models" / "unknown.json").write_text(json.dumps({**meta, "prediction": "score"}))
    return sampler_page


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "dpmpp3m"])
def test_the_browser_samples_a_linear_flow_model_as_python_does(flow_in_the_site, flow_checkpoint, solver):
    page, outside = flow_in_the_site
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sample(Denoiser.from_checkpoint(flow_checkpoint), x_T.shape, SOLVERS[solver](8), x_T=x_T)
    options = {"model": "flow", "xT": x_T.flatten().tolist(), "steps": 8, "solver": solver}
    got = torch.tensor(page.evaluate("async (o) => Array.from(await window.ddpmSampler.run(o))", options)).reshape(x_T.shape)
    assert (got - expected).abs().max() <= 1e-3, (got - expected).abs().max()
    assert outside == [], outside


def test_the_sampler_page_refuses_a_parametrization_it_does_not_know_with_a_message(flow_in_the_site):
    page, _ = flow_in_the_site
    page.evaluate("() => document.getElementById('model').add(new Option('unknown', 'unknown'))")
    page.select_option("#model", "unknown")
    page.evaluate("() => { document.body.dataset.state = 'running'; }")
    page.click("#sample")
    page.wait_for_function("() => document.body.dataset.state !== 'running'", timeout=60_000)
    assert page.evaluate("() => document.body.dataset.state") == "error"
    shown = page.inner_text("#progress")
    assert "this model's parametrization score is unknown to this page (it knows eps, x0, v, velocity)" in shown, shown
    page.select_option("#model", "mnist_ddpm")
