"""Evaluate a trained MNIST model under each sampler: quality (ddpm_lib.metrics) against cost.

``evaluate`` draws N samples per sampler setting with ``sampling.sample`` and scores them;
``scripts/evaluate.py`` and notebook 07 print the same table. Because a full table takes most of
an hour on a laptop CPU, rows can be cached in a JSON file keyed by the SHA-256 of the weights
(:func:`weights_sha256`), the setting, N and the seed: a cached row is reused only for exactly the
same weights and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from .classifier import MnistClassifier
from .denoiser import Denoiser
from .diffusion import DiffusionConfig
from .files import atomic_write
from .generate import draw_batches
from .metrics import GaussianStats, Quality, score
from .paths import VP, GaussianPath
from .solvers import DDIM, DDPM, SOLVERS, DPMSolverPP2M, DPMSolverPP3M, DPMSolverPP3MPublished, Heun, Solver

SETTINGS: tuple[Solver, ...] = (  # the rows of the main table, each a solver with its options
    DDPM(),
    DDPM(variance="beta"),
    DDIM(100),
    DDIM(50),
    DDIM(20),
    DDIM(10),
    DDIM(50, eta=1.0),
    *(Heun(k) for k in (3, 5, 10, 25)),  # 4, 8, 18 and 48 evaluations
    *(DPMSolverPP2M(k) for k in (5, 10, 20, 50)),
    *(DPMSolverPP3M(k) for k in (5, 10, 20)),
)

SEEDS = (0, 1, 2)  # the seeds of the comparisons with error bars (COMPARED)
COMPARED: tuple[Solver, ...] = (  # the settings the course compares with one another, each measured at every one of SEEDS
    *(DPMSolverPP3M(k) for k in (5, 8, 10, 20)),
    *(DPMSolverPP3MPublished(k) for k in (5, 8, 10, 20)),
    Heun(25),
    DDIM(50),
    DPMSolverPP3M(50),  # the ODE solved finely
    DDIM(50, eta=1.0),  # the same 50 steps with fresh noise in each
)
EQUAL_COST: tuple[Solver, ...] = (  # scripts/compare_paths.py's models at 10, 20 and 50 evaluations (Heun K steps: 2K - 2)
    *(DDIM(k) for k in (10, 20, 50)),
    *(Heun(k) for k in (6, 11, 26)),
)
PAIRED = (  # (a, b) of labels (Solver.label): the differences a - b, seed by seed (the same starting noise), that the course quotes
    *((f"DPM-Solver++(3M) {k}", f"DPM-Solver++(3M) as published {k}") for k in (5, 8, 10, 20)),
    ("DDIM 50", "DPM-Solver++(3M) 50"),  # Euler's error: 50 steps of DDIM against the ODE solved finely
    ("DDIM 50, eta 1", "DPM-Solver++(3M) 50"),  # the stochastic sampler against the ODE solved finely
)


@dataclass(frozen=True)
class Row:
    """The evaluation of one solver."""

    label: str  # the solver as tables name it (Solver.label)
    solver: Solver
    quality: Quality
    seconds_per_image: float  # sampling wall time / N, the classifier's time excluded
    seed: int
    bf16: bool  # whether the U-Net ran under bf16 autocast

    def to_dict(self) -> dict:
        """The row as docs/quality.json holds it, the solver as :func:`setting_key` names it."""
        quality = dataclasses.asdict(self.quality)
        return {"setting": setting_key(self.label, self.solver), "quality": quality, "seconds_per_image": self.seconds_per_image,
                "seed": self.seed, "bf16": self.bf16}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        setting = d["setting"]
        solver = SOLVERS[setting["sampler"]]
        options = {f.name: setting[f.name] for f in dataclasses.fields(solver)}  # steps, and eta or variance where it has them
        quality = Quality(**{**d["quality"], "counts": tuple(d["quality"]["counts"])})
        return cls(setting["label"], solver(**options), quality, d["seconds_per_image"], d["seed"], d["bf16"])


def setting_key(label: str, solver: Solver) -> dict:
    """A solver as docs/quality.json names it in its keys and rows, in the form the cache has had from its first row."""
    options = {"eta": getattr(solver, "eta", 0.0), "variance": getattr(solver, "variance", "beta_tilde")}
    return {"label": label, "sampler": solver.name, "steps": solver.steps, **options}


def config_repr(diffusion: DiffusionConfig) -> str:
    """The config as the cache names it: its repr, without the path where that is the VP path, so that a model of the VP
    path keeps the fingerprint it had before configs recorded a path (and the rows cached for it stay valid)."""
    fields = {f.name: getattr(diffusion, f.name) for f in dataclasses.fields(diffusion)}
    if fields["path"] == VP.name:
        del fields["path"]
    return f"{type(diffusion).__name__}({', '.join(f'{name}={value!r}' for name, value in fields.items())})"


def weights_sha256(model: torch.nn.Module, diffusion: DiffusionConfig) -> str:
    """A fingerprint of what decides the samples: the diffusion config and every weight, bit for bit.

    A training snapshot and the checkpoint exported from it share it, unlike their file bytes."""
    digest = hashlib.sha256(config_repr(diffusion).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def draw(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    solver: Solver,
    n: int,
    seed: int = 0,
    batch_size: int = 250,
    bf16: bool = False,
    labels: torch.Tensor | None = None,
    **guide,
) -> tuple[torch.Tensor, float]:
    """n samples (n, C, H, W) in [-1, 1] drawn with ``solver`` in batches, and the seconds it took.

    ``bf16`` runs the U-Net under bf16 autocast (see denoiser.Denoiser). Batches of 250 are the
    fastest on a 2-core CPU: larger ones fall out of its caches. ``labels`` (n,) and ``guide``
    (guidance, classifier, classifier_scale) steer the samples as in denoiser.guided.
    """
    c = model.config
    start = time.perf_counter()
    chw = (c.in_channels, c.image_size, c.image_size)
    images = draw_batches(Denoiser(model, diffusion, bf16=bf16), solver, chw, n, seed, batch_size, labels, **guide)
    return images, time.perf_counter() - start


@dataclass(frozen=True)
class Measurement:
    """How rows are drawn and kept, for :func:`evaluate` and ``guided_evaluation.guided_sweep`` alike."""

    n: int = 1000  # samples per row
    seed: int = 0  # seeds x_T and every step's noise
    bf16: bool = False  # the U-Net under bf16 autocast (see denoiser.Denoiser)
    cache: str | os.PathLike | None = None  # a JSON file of finished rows, read back and added to as rows finish
    model_id: str | None = None  # weights_sha256 of the weights that decide the samples: without it, nothing is cached
    any_precision: bool = False  # read a cached row of either precision, bf16 first (each row records its own)
    on_row: Callable[[Any], None] | None = None  # called with each row as it is ready

    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def row(self, key: list, compute: Callable[[], Any], from_dict: Callable[[dict], Any], to_dict: Callable[[Any], dict]) -> Any:
        """The row under ``[model_id, *key, precision]`` in the cache (of either precision if ``any_precision``), else
        ``compute()``, cached (as ``to_dict`` writes it) as soon as it is done; reported to ``on_row`` either way."""
        full = [self.model_id, *key, self.precision()]
        row = cached_row(self.cache, full, compute, from_dict, to_dict, read=either_precision(full) if self.any_precision else None)
        if self.on_row is not None:
            self.on_row(row)
        return row


MEASUREMENT = Measurement()  # 1000 samples from seed 0, the U-Net in fp32, nothing cached


def evaluate(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    classifier: MnistClassifier,
    reference: GaussianStats,
    settings: Iterable[Solver] = SETTINGS,
    measurement: Measurement = MEASUREMENT,
) -> list[Row]:
    """One :class:`Row` per solver in ``settings``, each from ``measurement.n`` samples drawn from ``measurement.seed``.

    With a cache and a model id (:func:`weights_sha256` of the model), rows already in the cache for this model,
    setting, n, seed and precision are read instead of recomputed (see :class:`Measurement`); with ``any_precision``
    a CPU without fast bf16 adds fp32 rows to a bf16 table.
    """
    m, path = measurement, diffusion.make_path()

    def compute(solver: Solver) -> Row:
        images, seconds = draw(model, diffusion, solver, m.n, m.seed, bf16=m.bf16)
        return Row(solver.label(path), solver, score(classifier, images, reference), seconds / m.n, m.seed, m.bf16)

    keys = [[setting_key(s.label(path), s), m.n, m.seed] for s in settings]
    return [m.row(key, lambda s=s: compute(s), Row.from_dict, Row.to_dict) for key, s in zip(keys, settings, strict=True)]


def cached_row(
    cache: str | os.PathLike | None,
    key: list,
    compute: Callable[[], Any],
    from_dict: Callable[[dict], Any],
    to_dict: Callable[[Any], dict],
    read: list[list] | None = None,
) -> Any:
    """The row stored under ``key`` (a list that starts with the model id) in the JSON file ``cache``, or under the
    first of the keys ``read`` found there when given; else ``compute()``, added to the file under ``key`` as soon as
    it is done. Without a cache or a model id, always ``compute()``."""
    if cache is None or key[0] is None:
        return compute()
    stored = read_cache(cache)
    for candidate in read or [key]:
        if json.dumps(candidate) in stored:
            return from_dict(stored[json.dumps(candidate)])
    row = compute()
    write_cache(cache, {**read_cache(cache), json.dumps(key): to_dict(row)})
    return row


def either_precision(key: list) -> list[list]:
    """``key`` (whose last item is "bf16" or "fp32") in both precisions, bf16 first: the course's tables were measured in bf16."""
    return [[*key[:-1], "bf16"], [*key[:-1], "fp32"]]


def read_cache(path: str | os.PathLike) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def write_cache(path: str | os.PathLike, entries: dict) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def ratio_up(ratio: float) -> str:
    """``ratio`` with two decimals, rounded up, so that a ratio over a target of 3 never reads as 3.00 or less."""
    return f"{math.ceil(round(ratio * 100, 6)) / 100:.2f}"


def markdown_table(rows: list[Row], floor: Quality, path: GaussianPath) -> str:
    """The rows and the real-data floor as a Markdown table; FD / floor is the Frechet distance over the floor's,
    rounded up to two decimals (:func:`ratio_up`); the last column is the U-Net's precision. Cost is counted in
    network evaluations: a row's seconds per image, kept in the cache, depend on the machine and what else it ran."""
    lines = [
        "| sampler | U-Net evals | Frechet distance | FD / floor | confident | class entropy | U-Net in |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| real training images (floor) | - | {floor.frechet:.2f} | 1.00 | {floor.confident:.1%} | {floor.entropy:.3f} | - |",
    ]
    for row in rows:
        q = row.quality
        lines.append(
            f"| {row.label} | {row.solver.evaluations(path)} | {q.frechet:.2f} | {ratio_up(q.frechet / floor.frechet)} "
            f"| {q.confident:.1%} | {q.entropy:.3f} | {'bf16' if row.bf16 else 'fp32'} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Spread:
    """One setting over several seeds: the mean and the sample standard deviation of each measure."""

    label: str
    solver: Solver
    seeds: tuple[int, ...]
    frechet: tuple[float, float]  # (mean, standard deviation)
    confident: tuple[float, float]
    entropy: tuple[float, float]
    bf16: bool


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (divided by n - 1) of ``values``."""
    values = torch.tensor(list(values), dtype=torch.float64)
    return values.mean().item(), values.std().item()


def spreads(rows: Iterable[Row]) -> list[Spread]:
    """The rows grouped by setting, in order of first appearance, each group as a :class:`Spread` over its seeds.

    A group must hold one precision (a comparison across precisions is not one of seeds) and at least two seeds.
    """
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    out = []
    for label, members in groups.items():
        if len({r.bf16 for r in members}) > 1 or len({r.seed for r in members}) < len(members) or len(members) < 2:
            raise ValueError(f"{label}: a spread needs two or more distinct seeds in one precision")

        qualities = [r.quality for r in members]
        out.append(
            Spread(
                label,
                members[0].solver,
                tuple(r.seed for r in members),
                mean_sd([q.frechet for q in qualities]),
                mean_sd([q.confident for q in qualities]),
                mean_sd([q.entropy for q in qualities]),
                members[0].bf16,
            )
        )
    return out


def spread_table(rows: Iterable[Row], path: GaussianPath) -> str:
    """The rows of several seeds as a Markdown table of mean +- standard deviation per setting (:func:`spreads`)."""
    lines = [
        "| sampler | U-Net evals | Frechet distance | confident | class entropy | seeds | U-Net in |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for s in spreads(rows):
        (fd, fd_sd), (conf, conf_sd), (ent, ent_sd) = s.frechet, s.confident, s.entropy
        lines.append(
            f"| {s.label} | {s.solver.evaluations(path)} | {fd:.3f} ± {fd_sd:.3f} | {conf:.1%} ± {100 * conf_sd:.1f} "
            f"| {ent:.3f} ± {ent_sd:.3f} | {', '.join(map(str, s.seeds))} | {'bf16' if s.bf16 else 'fp32'} |"
        )
    return "\n".join(lines)


def paired_table(rows: Iterable[Row], pairs: Iterable[tuple[str, str]]) -> str:
    """For each pair (a, b) of setting labels, the differences a - b of seeds that both rows have, as mean +- sample
    standard deviation: the same seed starts both samplers from the same noise, so its difference is more precise
    than the two spreads suggest. Pairs with fewer than two shared seeds are left out."""
    by = {(r.label, r.seed): r.quality for r in rows}
    lines = [
        "| a - b | Frechet distance | confident (points) | seeds |",
        "|---|---:|---:|---|",
    ]
    for a, b in pairs:
        seeds = sorted(seed for label, seed in by if label == a and (b, seed) in by)
        if len(seeds) < 2:
            continue
        fd, fd_sd = mean_sd(by[a, s].frechet - by[b, s].frechet for s in seeds)
        conf, conf_sd = mean_sd(100 * (by[a, s].confident - by[b, s].confident) for s in seeds)
        lines.append(f"| {a} - {b} | {fd:+.3f} ± {fd_sd:.3f} | {conf:+.1f} ± {conf_sd:.1f} | {', '.join(map(str, seeds))} |")
    return "\n".join(lines)


def class_count_table(rows: list[Row], floor: Quality) -> str:
    """The predicted-class histogram of each row and of the real-data floor as a Markdown table: images per digit."""
    lines = [
        "| sampler | " + " | ".join(str(d) for d in range(10)) + " | class entropy |",
        "|---|" + "---:|" * 11,
    ]
    for label, q in [("real training images (floor)", floor)] + [(row.label, row.quality) for row in rows]:
        lines.append(f"| {label} | " + " | ".join(str(c) for c in q.counts) + f" | {q.entropy:.3f} |")
    return "\n".join(lines)


def plot_class_counts(rows: list[Row], floor: Quality) -> plt.Figure:
    """The predicted-class histograms as a heatmap: one row per sampler (the floor on top), one column per digit.

    Each cell shows the number of images predicted as that digit; its colour is the share's difference
    from the real images' share of that digit, in percentage points (red: too few, blue: too many).
    """
    labels = ["real training images"] + [row.label for row in rows]
    qualities = [floor] + [row.quality for row in rows]
    counts = torch.tensor([q.counts for q in qualities], dtype=torch.float64)  # (rows, 10)
    shares = 100 * counts / counts.sum(dim=1, keepdim=True)
    excess = shares - shares[0]  # percentage points against the real images
    limit = max(excess.abs().max().item(), 1.0)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.4))
    image = ax.imshow(excess.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, row_counts in enumerate(counts.tolist()):
        for j, count in enumerate(row_counts):
            dark = abs(excess[i, j]) > 0.6 * limit
            ax.text(j, i, f"{count:.0f}", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(10), [str(d) for d in range(10)])
    ax.set_yticks(range(len(labels)), [f"{label}  (H = {q.entropy:.3f})" for label, q in zip(labels, qualities, strict=True)])
    ax.set_xlabel("digit the classifier sees")
    fig.colorbar(image, ax=ax, label="share - real share (points)")
    fig.suptitle(f"Images per predicted digit, {floor.n} per row (H: class entropy in nats, at most 2.303)")
    fig.tight_layout()
    return fig


def plot_quality(rows: list[Row], floor: Quality, path: GaussianPath) -> plt.Figure:
    """Frechet distance and confident share against U-Net evaluations per image, one marker per row.

    Each deterministic solver (DDIM with eta = 0, Heun, DPM-Solver++(2M) and (3M)) is a line through its step
    counts; every other row is a point.
    """
    fig, (ax_fd, ax_conf) = plt.subplots(1, 2, figsize=(10, 4.6))
    families = {"DDIM, eta = 0": ("ddim",), "Heun": ("heun",), "DPM-Solver++(2M)": ("dpmpp2m",), "DPM-Solver++(3M)": ("dpmpp3m",)}

    def cost(r: Row) -> int:
        return r.solver.evaluations(path)

    lines = {
        name: sorted(
            (r for r in rows if r.solver.name in kinds and not getattr(r.solver, "eta", 0)), key=lambda r: r.solver.evaluations(path)
        )
        for name, kinds in families.items()
    }
    others = [r for r in rows if not any(r in members for members in lines.values())]
    for ax, value, floor_value, name in (
        (ax_fd, lambda q: q.frechet, floor.frechet, "Frechet distance (classifier features)"),
        (ax_conf, lambda q: 100 * q.confident, 100 * floor.confident, "confidently classified (%)"),
    ):
        for (family, members), style in zip(lines.items(), ("o-", "s-", "^-", "v-"), strict=True):
            if members:
                ax.plot([r.solver.evaluations(path) for r in members], [value(r.quality) for r in members], style, label=family)
        for r, marker in zip(others, "DPXh", strict=False):
            ax.plot([r.solver.evaluations(path)], [value(r.quality)], marker, ls="none", label=r.label)
        ax.axhline(floor_value, color="gray", ls="--", label="real training images")
        ax.set(xscale="log", xlabel="U-Net evaluations per image", ylabel=name)
    ax_fd.axhline(3 * floor.frechet, color="gray", ls=":", label="3 x the floor (a reference point)")
    ax_conf.axhline(90, color="gray", ls=":", label="90% (a reference point)")
    ax_fd.set_yscale("log")
    ax_fd.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    for axis in (ax_fd.yaxis, ax_fd.xaxis, ax_conf.xaxis):  # 0.4 and 20 rather than 4 x 10^-1 and 2 x 10^1
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter() if axis is ax_fd.yaxis else NullFormatter())
    for ax in (ax_fd, ax_conf):
        ax.set_xticks([5, 10, 20, 50, 100, 1000])
    for ax in (ax_fd, ax_conf):  # below the axes, where no marker hides behind them
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(f"Sample quality against sampling cost, {rows[0].quality.n} samples per point")
    fig.tight_layout()
    return fig
