"""Build the static course site (make site): the committed notebooks as HTML pages, not re-executed.

    python scripts/build_site.py            # into site/
    python scripts/build_site.py --out DIR

One page per notebook, in order, with previous and next links; an index page from the README's
front matter (everything before its "Data" section); the docs as pages too. nbconvert renders
everything, markdown included, with JupyterLab's own template, so the pages look like the notebooks
and TeX is typeset by MathJax 2.7.9, copied into the site from the pinned jupyter-server-mathjax
package, so the site loads nothing from outside. Links between the project's files are rewritten to their pages;
figures they point at are copied. The notebooks carry no widget state, so every slider shows its
kernel-free version (see ddpm_lib.scrubber).

The live sampler (sampler.html) runs the shipped models in the reader's browser: they are exported to
ONNX (cached in build/onnx by their SHA-256), and onnxruntime-web, pinned in scripts/site_npm, comes
from the npm registry by ``npm ci`` into build/site-npm. Without npm or the registry the site is built
without that page, and says so.
"""

import argparse
import hashlib
import html
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jupyter_server_mathjax
import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the library from this tree
from ddpm_lib.onnx_export import FORMAT, export_onnx, read_metadata  # noqa: E402
from ddpm_lib.solvers import SOLVERS  # noqa: E402

SAMPLER_MODELS = ["mnist_ddpm", "mnist_cfg", "mnist_flow"]  # checkpoints/<name>.pt, sampled live on sampler.html
SAMPLER_PAGES = {  # the notebooks whose pages embed the live sampler (before their summary): its model there, and what it offers
    "notebooks/06_sampling.ipynb": ("mnist_ddpm", "draw digits with DDIM or DPM-Solver++ and scrub their trajectory"),
    "notebooks/08_guidance.ipynb": ("mnist_cfg", "ask the class-conditional model for a digit, with the guidance weight w you choose"),
    "notebooks/10_flow_matching.ipynb": ("mnist_flow", "draw digits from the flow-matching model with Euler's method in a few steps"),
}
RUNTIME = ["ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]  # onnxruntime-web's plain WASM build
DOCS = ["docs/cli.md", "docs/experiments.md", "docs/benchmarks.md", "docs/quality.md", "docs/guidance.md", "checkpoints/README.md"]
# MathJax's own files that typeset TeX (the notebooks' input) into HTML-CSS: 7 of its 12 MB (no SVG output,
# no MathML or AsciiMath input, no translations).
MATHJAX = Path(jupyter_server_mathjax.__file__).parent / "static"
MATHJAX_PARTS = ["MathJax.js", "config", "extensions", "jax/element", "jax/input/TeX", "jax/output/HTML-CSS", "fonts", "LICENSE"]
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
NAV_STYLE = (
    "<style>.ddpm-nav{display:flex;gap:1.5em;justify-content:space-between;max-width:1100px;margin:1em auto;"
    "padding:0.5em 1em;font-family:sans-serif;border-bottom:1px solid #ddd}.ddpm-nav.bottom{border-top:1px solid #ddd;"
    "border-bottom:none}.ddpm-live{max-width:1100px;margin:1em auto;padding:0.6em 1em;font-family:sans-serif;"
    "background:#eef5ff;border-left:4px solid #1e88e5}</style>"
)


def page_of(path: str) -> str:
    """The site path of a project file: README.md -> index.html, notebooks/x.ipynb -> notebooks/x.html."""
    if path == "README.md":
        return "index.html"
    return re.sub(r"\.(ipynb|md)$", ".html", path)


def title_of(nb: nbformat.NotebookNode) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (found := re.search(r"^#\s+(.+)$", cell.source, flags=re.M)):
            return found.group(1).strip()
    return "ddpm-notebooks"


def front_matter(readme: str) -> str:
    """The README up to its first section after "Two commands" (the data, the CLI, the results ...)."""
    return readme[: readme.index("\n## Data\n")]


def rewrite_links(text: str, source: str, pages: set[str], copies: set[str]) -> str:
    """Point href and src attributes of the page made from ``source`` at pages of the site; collect
    the project files (figures) they name that must be copied beside them."""

    def rewrite(match: re.Match) -> str:
        attribute, target = match.group(1), html.unescape(match.group(2))
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target):  # http:, data:, mailto:, an anchor, or absolute
            return match.group(0)
        path, _, fragment = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if resolved in pages:
            new = relative(page_of(resolved), page_of(source)) + ("#" + fragment if fragment else "")
            return f'{attribute}="{html.escape(new)}"'
        if (ROOT / resolved).is_file():
            copies.add(resolved)
        return match.group(0)

    return re.sub(r'\b(href|src)="([^"]*)"', rewrite, text)


def relative(target: str, page: str) -> str:
    """The site path ``target`` as a link from the page ``page``."""
    return posixpath.relpath(target, posixpath.dirname(page) or ".")


def nav_links(source: str, sources: list[str]) -> list[tuple[str, str]]:
    """(text, href) of the bar on the page of ``source``: home, and for a notebook the previous and the next one."""
    home = ("ddpm-notebooks: the course", relative("index.html", page_of(source)))
    if not source.endswith(".ipynb"):
        return [home]
    notebooks = [s for s in sources if s.endswith(".ipynb")]
    i = notebooks.index(source)
    previous = (f"← {Path(notebooks[i - 1]).stem}", relative(page_of(notebooks[i - 1]), page_of(source))) if i else ("", "")
    following = (
        (f"{Path(notebooks[i + 1]).stem} →", relative(page_of(notebooks[i + 1]), page_of(source))) if i + 1 < len(notebooks) else ("", "")
    )
    return [previous, home, following]


def nav(links: list[tuple[str, str]], bottom: bool = False) -> str:
    items = "".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' if href else "<span></span>" for text, href in links)
    return f'<nav class="ddpm-nav{" bottom" if bottom else ""}">{items}</nav>'


def with_sampler(page: str, href: str, model: str, offers: str) -> str:
    """``page`` with the live sampler embedded before its summary (at the top if it has none)."""
    frame = (
        f'<div class="ddpm-live"><p><b>Try it in your browser.</b> The live sampler: {offers}. '
        f'<a href="{href}">Open it on its own page</a>.</p><iframe src="{href}?embed&amp;model={model}" title="The live sampler" '
        'loading="lazy" style="width:100%;height:760px;border:0"></iframe></div>'
    )
    summary = re.search(r'<h2 id="Summary"', page)
    at = summary.start() if summary else page.index("<body") + page[page.index("<body") :].index(">") + 1
    return page[:at] + frame + page[at:]


def with_nav(page: str, top: str, bottom: str) -> str:
    page = page.replace("</head>", NAV_STYLE + "</head>", 1)
    page = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + top, page, count=1)
    return page.replace("</body>", bottom + "</body>", 1)


def runtime() -> Path | None:
    """onnxruntime-web's dist folder, installed by ``npm ci`` from scripts/site_npm's lock file; None (with a
    message) where npm or the registry cannot be had."""
    folder = ROOT / "build" / "site-npm"
    pinned = json.loads((ROOT / "scripts" / "site_npm" / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    installed = folder / "node_modules" / "onnxruntime-web"
    if not (installed / "package.json").is_file() or json.loads((installed / "package.json").read_text())["version"] != pinned:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(ROOT / "scripts" / "site_npm" / name, folder / name)
        try:
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=folder, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"the live sampler is left out: npm could not install onnxruntime-web {pinned} ({e})", file=sys.stderr)
            return None
    return installed / "dist"


def exported_model(name: str) -> Path:
    """checkpoints/<name>.pt as ONNX, exported once per version of the checkpoint (build/onnx/<name>-<sha>.onnx)."""
    checkpoint = ROOT / "checkpoints" / f"{name}.pt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    out = ROOT / "build" / "onnx" / f"{name}-{digest}.onnx"
    try:
        if read_metadata(out)["format"] == FORMAT:
            return out
    except (OSError, ValueError):
        pass  # not exported yet, or by an older ddpm_lib
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(checkpoint, out, overwrite=True)
    return out


def measured_speed() -> str:
    """The "browser" section of docs/benchmarks.md (make benchmark) as HTML for the sampler page; "" before it exists."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    begin, end = "<!-- browser: begin -->", "<!-- browser: end -->"
    if begin not in text or end not in text:
        return ""
    lines = text[text.index(begin) + len(begin) : text.index(end)].strip().splitlines()
    intro = next(line for line in lines if line.startswith("Measured by"))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ") and "---" not in line]
    cells = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)} s</td></tr>" for a, b in rows[1:])
    intro = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(intro, quote=False))
    return f'<h2>How fast</h2><p class="measured">{intro}</p><table class="measured">{cells}</table>'


def solver_options() -> str:
    """The sampler page's solver menu: the solvers of ddpm_lib's registry that worker.js runs too."""
    return "".join(f'<option value="{name}">{html.escape(cls.title)}</option>' for name, cls in SOLVERS.items() if cls.in_browser)


def add_sampler(tmp: Path, dist: Path) -> None:
    """sampler.html, its scripts, the runtime and the models, into the site being built in ``tmp``."""
    shutil.copytree(ROOT / "scripts" / "site_sampler", tmp / "sampler", ignore=shutil.ignore_patterns("*.html"))
    (tmp / "ort").mkdir()
    for name in RUNTIME:
        shutil.copy2(dist / name, tmp / "ort" / name)
    (tmp / "models").mkdir()
    for name in SAMPLER_MODELS:
        model = exported_model(name)
        shutil.copy2(model, tmp / "models" / f"{name}.onnx")
        # onnxruntime-web cannot read the metadata inside the model (microsoft/onnxruntime#16547): the page reads this copy
        (tmp / "models" / f"{name}.json").write_text(json.dumps(read_metadata(model)))
    page = (ROOT / "scripts" / "site_sampler" / "sampler.html").read_text().replace("<!-- measured -->", measured_speed())
    page = re.sub(r"<!-- solvers:[^>]*-->", solver_options(), page)
    links = [("ddpm-notebooks: the course", "index.html")]
    (tmp / "sampler.html").write_text(with_nav(page, nav(links), nav(links, bottom=True)))


def build(out: Path) -> list[Path]:
    """Write the site into ``out`` (replaced whole, only once it is complete); return its pages."""
    template = dict(template_name="site", extra_template_basedirs=[str(ROOT / "scripts" / "site_template")])
    exporter = HTMLExporter(**template, exclude_input_prompt=True, exclude_output_prompt=True)
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not notebooks:
        raise SystemExit("no notebooks in notebooks/: nothing to build")
    sources = ["README.md", *(f"notebooks/{p.name}" for p in notebooks), *DOCS]
    pages, copies = set(sources), set()
    dist = runtime()
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=out.parent))
    try:
        written = []
        for source in sources:
            if source.endswith(".ipynb"):
                nb = nbformat.read(ROOT / source, as_version=4)
                title = title_of(nb)
            else:
                text = (ROOT / source).read_text()
                text = front_matter(text) + _more(sources, dist is not None) if source == "README.md" else text
                nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])
                title = "ddpm-notebooks" if source == "README.md" else title_of(nb)
            exporter.mathjax_url = f"{relative('mathjax/MathJax.js', page_of(source))}?config={MATHJAX_CONFIG}"
            body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
            body = rewrite_links(body, source, pages, copies)
            links = nav_links(source, sources)
            path = tmp / page_of(source)
            path.parent.mkdir(parents=True, exist_ok=True)
            if dist is not None and source in SAMPLER_PAGES:
                body = with_sampler(body, relative("sampler.html", page_of(source)), *SAMPLER_PAGES[source])
            path.write_text(with_nav(body, nav(links), nav(links, bottom=True)))
            written.append(out / page_of(source))
        if dist is not None:
            add_sampler(tmp, dist)
            written.append(out / "sampler.html")
        for part in MATHJAX_PARTS:
            copy = shutil.copytree if (MATHJAX / part).is_dir() else shutil.copy2
            (tmp / "mathjax" / part).parent.mkdir(parents=True, exist_ok=True)
            copy(MATHJAX / part, tmp / "mathjax" / part)
        for copy in sorted(copies):
            (tmp / copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / copy, tmp / copy)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _more(sources: list[str], live: bool) -> str:
    docs = [s for s in sources if s.endswith(".md") and s != "README.md"]
    items = "\n".join(f"- [{s}]({s})" for s in docs)
    more = "\n## Sample the models in your browser\n\n" if live else ""
    if live:
        more += "[The live sampler](sampler.html) draws digits with the course's shipped models, in your browser.\n"
    reference = "The command line, the experiments and measurements behind the course, and the shipped models:"
    return f"{more}\n## Reference\n\n{reference}\n\n{items}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="the folder to write (replaced); default site/")
    out = parser.parse_args().out.resolve()
    pages = build(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(pages)} pages, {size / 2**20:.1f} MiB in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
