"""The static course site (make site): every page there, in order, no broken link or image, small enough."""

import base64
import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from ddpm_lib.scrubber import OUTPUT_BUDGET, read_scrubber

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_site  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


class Page(HTMLParser):
    """The links, image sources, element ids and scrubbers of one HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.images, self.scripts, self.ids = [], [], [], set()
        self.feed(text)
        self.scrubbers = [re.split(r"</script>\s*</div>", part)[0] for part in text.split('<div class="ddpm-scrubber"')[1:]]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "iframe" and attrs.get("src"):
            self.links.append(attrs["src"])
        elif tag == "script" and attrs.get("src"):
            self.links.append(attrs["src"])
            self.scripts.append(attrs["src"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "site"
    build_site.build(out)
    return out


@pytest.fixture(scope="module")
def pages(site):
    return {path.relative_to(site).as_posix(): Page(path.read_text()) for path in site.rglob("*.html")}


def test_every_notebook_has_a_page_in_order_with_previous_and_next_links(pages):
    names = [f"notebooks/{p.stem}.html" for p in NOTEBOOKS]
    assert set(names) <= set(pages) and "index.html" in pages
    for i, name in enumerate(names):
        local = [link for link in pages[name].links if link.endswith(".html")]
        assert "../index.html" in local
        if i > 0:
            assert f"{NOTEBOOKS[i - 1].stem}.html" in local
        if i + 1 < len(names):
            assert f"{NOTEBOOKS[i + 1].stem}.html" in local
    index_links = pages["index.html"].links
    assert [link for link in index_links if link.startswith("notebooks/")][: len(names)] == names  # the table of contents


def test_no_link_or_image_is_broken(site, pages):
    for name, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # a link to the web (a paper, a project), followed only if the reader clicks it
            target = (site / name).parent / unquote(parts.path) if parts.path else site / name
            assert target.resolve().is_file(), f"{name}: broken link {link}"
            if parts.fragment and target.suffix == ".html":
                ids = pages[target.resolve().relative_to(site.resolve()).as_posix()].ids
                assert {parts.fragment, unquote(parts.fragment)} & ids, f"{name}: no anchor for {link}"  # as written, or decoded
        for src in page.images:
            if src.startswith("data:"):
                header, payload = src.split(",", 1)
                Image.open(io.BytesIO(base64.b64decode(payload))).verify()  # raises on a broken image
            else:
                assert ((site / name).parent / unquote(src)).is_file(), f"{name}: missing image {src}"


def test_math_is_typeset_by_the_site_s_own_mathjax_and_figures_are_inline(site, pages):
    first = pages["notebooks/01_forward_process.html"]
    assert first.scripts[0] == f"../mathjax/MathJax.js?config={build_site.MATHJAX_CONFIG}"
    assert pages["index.html"].scripts[0] == f"mathjax/MathJax.js?config={build_site.MATHJAX_CONFIG}"
    for part in ("config/TeX-AMS-MML_HTMLorMML-full.js", "extensions/Safe.js", "fonts/HTML-CSS/STIX-Web/woff"):
        assert (site / "mathjax" / part).exists(), part  # what that configuration loads (tests/test_browser.py watches it typeset)
    assert len([src for src in first.images if src.startswith("data:image/png")]) >= 3


def test_the_index_and_the_sampling_and_guidance_pages_point_at_the_live_sampler(site, pages):
    if not (site / "sampler.html").is_file():
        pytest.skip("the site was built without the live sampler: npm could not install onnxruntime-web")
    assert "sampler.html" in pages["index.html"].links
    for stem, model in (("06_sampling", "mnist_ddpm"), ("08_guidance", "mnist_cfg"), ("10_flow_matching", "mnist_flow")):
        assert "../sampler.html" in pages[f"notebooks/{stem}.html"].links, stem
        assert f"../sampler.html?embed&model={model}" in pages[f"notebooks/{stem}.html"].links, stem  # embedded, with its model
    assert "../sampler.html" not in pages["notebooks/01_forward_process.html"].links
    assert re.search(r"16 digits, 20 DDIM steps, mnist_ddpm</td><td>[0-9.]+ s", (site / "sampler.html").read_text())  # make benchmark's


def test_no_page_loads_anything_from_outside_the_site(site, pages):
    for name, page in pages.items():
        assert all(not urlsplit(src).scheme and not src.startswith("//") for src in page.scripts), (name, page.scripts)
        assert not re.search(r"""import\(\s*["']https?:|url\(\s*["']?https?:""", (site / name).read_text()), (
            name
        )  # nor from a script or CSS


def test_every_slider_of_the_course_has_a_kernel_free_scrubber_of_about_a_megabyte(site, pages):
    viewers = {
        "01_forward_process": 1,
        "02_noise_schedules": 1,
        "03_reverse_process": 1,
        "06_sampling": 1,
        "08_guidance": 1,
        "09_score_and_ode": 1,
        "10_flow_matching": 1,
    }
    for stem, count in viewers.items():
        page = pages[f"notebooks/{stem}.html"]
        assert len(page.scrubbers) == count, stem
        for html in page.scrubbers:
            scrubber = read_scrubber(html)
            assert len(html) <= OUTPUT_BUDGET and len(scrubber.frames) >= 5, stem
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    live = sum(f.stat().st_size for folder in ("ort", "models") if (site / folder).is_dir() for f in (site / folder).rglob("*"))
    assert live < 26 * 2**20, f"the live sampler's runtime and models take {live / 2**20:.1f} MiB"  # 14 MB of WASM, three 3.4 MB models
    assert size - live < 40 * 2**20, f"the site takes {(size - live) / 2**20:.1f} MiB besides the live sampler"


def test_the_committed_notebooks_carry_no_widget_state_for_the_sliders():
    # With it, renderers without a kernel draw the frozen widget instead of its kernel-free scrubber.
    view = "application/vnd.jupyter.widget-view+json"
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        outputs = [o for cell in nb["cells"] for o in cell.get("outputs", []) if view in o.get("data", {})]
        sliders = [o["data"][view]["model_id"] for o in outputs if "ddpm-scrubber" in "".join(o["data"].get("text/html", ""))]
        assert not set(sliders) & set(state), path.name
        assert all(o["data"][view]["model_id"] in state for o in outputs if o["data"][view]["model_id"] not in sliders), path.name
