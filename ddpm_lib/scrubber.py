"""Kernel-free scrubbers: a widget's frames, precomputed, behind plain HTML range inputs.

A live ipywidgets slider needs a running kernel. Where there is none (the static course site,
nbviewer and other renderers that run an output's scripts) the HTML this module writes replaces its
labelled static picture with one range input per control and swaps precomputed PNG frames as they
move. Where scripts are stripped as well (GitHub), the labelled static picture is what stays.

The frames travel inside the HTML as JSON: ``axes`` (each control's name and its values, in order),
``frames`` (base64 images of one ``format``, row-major over the axes: the last axis varies fastest) and ``start`` (an
index per axis). :func:`read_scrubber` reads them back, for tests and for the site's checks.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import uuid
from collections.abc import Callable, Hashable, Sequence
from html.parser import HTMLParser
from typing import NamedTuple

OUTPUT_BUDGET = 1_000_000  # characters one scrubber's output may take in a notebook, frames in base64 included: about 1 MB

# Runs once where the output is shown: drop the static picture, add a range input per axis and show
# the frame at the inputs' indices. No libraries; keyboard arrows move a focused input by one value.
_SCRIPT = """(function () {
  var root = document.getElementById("%(id)s");
  var data = JSON.parse(root.querySelector("script.ddpm-frames").textContent);
  root.querySelectorAll(".ddpm-static").forEach(function (node) { node.remove(); });
  var inputs = [], labels = [], image = document.createElement("img");
  data.axes.forEach(function (axis, a) {
    var row = document.createElement("label"), input = document.createElement("input"), text = document.createElement("span");
    row.style.display = "block";
    input.type = "range"; input.min = 0; input.max = axis.values.length - 1; input.step = 1; input.value = data.start[a];
    input.setAttribute("aria-label", axis.name);
    input.addEventListener("input", show);
    text.style.marginLeft = "0.5em";
    row.append(axis.name + " ", input, text);
    root.insertBefore(row, root.querySelector("script.ddpm-frames"));
    inputs.push(input); labels.push(text);
  });
  root.insertBefore(image, root.querySelector("script.ddpm-frames"));
  function show() {
    var k = 0;
    data.axes.forEach(function (axis, a) {
      var i = Number(inputs[a].value);
      k = k * axis.values.length + i;
      labels[a].textContent = axis.name + " = " + axis.values[i];
    });
    image.src = "data:image/" + data.format + ";base64," + data.frames[k];
    image.alt = labels.map(function (label) { return label.textContent; }).join(", ");
    root.dataset.frame = k;
  }
  show();
})();"""


def scrubber_html(
    axes: dict[str, Sequence[float]],
    frames: dict[tuple[int, ...], bytes],
    start: tuple[int, ...],
    static_png: bytes,
    static_text: str,
    image_format: str = "webp",
) -> str:
    """The HTML of a kernel-free scrubber.

    ``axes`` maps each control's name to its values, in the order the range input steps through
    them; ``frames[(i, j, ...)]`` is the image (``image_format``: webp or png) shown when control a sits at its index ``i_a`` (every
    combination must be there); ``start`` are the indices shown first. ``static_png`` with
    ``static_text`` below it is what a reader sees where scripts do not run.
    """
    if image_format not in ("webp", "png"):
        raise ValueError(f"image_format must be one of 'webp', 'png', got {image_format!r}")
    names = list(axes)
    shape = [len(axes[name]) for name in names]
    if not all(shape):
        raise ValueError(f"every axis needs at least one value, got {dict(zip(names, shape, strict=True))}")
    if len(start) != len(names) or not all(0 <= i < n for i, n in zip(start, shape, strict=True)):
        raise ValueError(f"start must be an index per axis within {shape}, got {start}")
    missing = [k for k in itertools.product(*map(range, shape)) if k not in frames]
    if missing:
        raise ValueError(f"frames are missing for {len(missing)} index combinations, the first {missing[0]}")
    data = {
        "axes": [{"name": name, "values": list(axes[name])} for name in names],
        "frames": [base64.b64encode(frames[k]).decode() for k in itertools.product(*map(range, shape))],
        "start": list(start),
        "format": image_format,
    }
    element = f"ddpm-scrubber-{uuid.uuid4().hex}"
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # nothing in it may close the script element
    return (
        f'<div class="ddpm-scrubber" id="{element}">'
        f'<img class="ddpm-static" alt="{html.escape(static_text)}" src="data:image/png;base64,{base64.b64encode(static_png).decode()}">'
        f'<p class="ddpm-static"><em>{html.escape(static_text)}</em></p>'
        f'<script type="application/json" class="ddpm-frames">{payload}</script>'
        f"<script>{_SCRIPT % {'id': element}}</script>"
        "</div>"
    )


def encoded_size(png_bytes: int) -> int:
    """Characters that ``png_bytes`` bytes of PNG take in base64."""
    return 4 * -(-png_bytes // 3)


def fit_frames(candidates: Sequence[Hashable], encode: Callable[[Hashable], bytes], budget: int, most: int) -> dict[Hashable, bytes]:
    """Evenly spaced ``candidates`` (the first and the last always among them, at most ``most``) and
    their frames ``encode(c)``, as many as fit in ``budget`` characters of base64."""
    cache: dict[Hashable, bytes] = {}

    def pick(k: int) -> list[Hashable]:
        n = len(candidates)
        return [candidates[round(i * (n - 1) / (k - 1))] for i in range(k)] if k > 1 else [candidates[-1]]

    def cost(chosen: list[Hashable]) -> int:
        return sum(encoded_size(len(cache[c] if c in cache else cache.setdefault(c, encode(c)))) for c in chosen)

    k = min(len(candidates), most)
    probe = pick(min(k, 9))
    k = max(min(k, 2), min(k, int(budget * len(probe) / cost(probe))))  # from the probe's mean frame
    while (total := cost(chosen := pick(k))) > budget:
        if k <= 2:
            raise ValueError(f"even {k} frames take {total:,} characters, over the budget of {budget:,}: show smaller pictures")
        k = max(2, min(k - 1, int(k * budget / total)))
    return {c: cache[c] for c in chosen}


class Scrubber(NamedTuple):
    """What :func:`read_scrubber` finds in a scrubber's HTML."""

    axes: dict[str, list]  # each control's name and its values
    frames: dict[tuple[int, ...], bytes]  # an index per axis -> the encoded image
    start: tuple[int, ...]  # the indices shown first
    image_format: str  # of the frames: webp or png
    static_png: bytes  # the picture shown where scripts do not run


class _Finder(HTMLParser):
    """The first scrubber's frame data and static picture, wherever its attributes sit."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.data, self.static, self._in_frames = None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "img" and "ddpm-static" in classes and self.static is None:
            self.static = attrs.get("src", "")
        self._in_frames = tag == "script" and "ddpm-frames" in classes and self.data is None

    def handle_data(self, data):
        if self._in_frames:
            self.data = data
            self._in_frames = False


def read_scrubber(text: str) -> Scrubber:
    """The (first) scrubber that :func:`scrubber_html` wrote into ``text``, however a renderer re-serialised it."""
    finder = _Finder()
    finder.feed(text)
    if finder.data is None or not (finder.static or "").startswith("data:image/png;base64,"):
        raise ValueError("no kernel-free scrubber in this HTML")
    data = json.loads(finder.data)
    axes = {axis["name"]: axis["values"] for axis in data["axes"]}
    keys = itertools.product(*(range(len(values)) for values in axes.values()))
    frames = {k: base64.b64decode(frame) for k, frame in zip(keys, data["frames"], strict=True)}
    return Scrubber(axes, frames, tuple(data["start"]), data["format"], base64.b64decode(finder.static.split(",", 1)[1]))
