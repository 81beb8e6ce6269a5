"""A 2-D toy whose answer is known: a mixture of Gaussians, diffused in closed form (notebook 9).

The data are K equally weighted Gaussians N(mu_k, s^2 I) in the plane. The forward process
q(x_t | x0) = N(sqrt(a) x0, (1 - a) I), with a = alpha_bar_t, keeps a mixture a mixture:

    q(x_t) = (1/K) sum_k N(sqrt(a) mu_k, v I),   v = a s^2 + 1 - a.

So at every t the exact score, the exact denoiser and the exact eps are known:

    score(x_t)  = sum_k r_k(x_t) (sqrt(a) mu_k - x_t) / v      (r_k: the posterior weight of component k)
    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + (sqrt(a) s^2 / v) (x_t - sqrt(a) mu_k))
    eps*(x_t)   = -sqrt(1 - a) score(x_t)

and Tweedie's formula E[x0 | x_t] = (x_t + (1 - a) score(x_t)) / sqrt(a) ties the first two.
:class:`ExactDenoiser` serves them to every solver; :func:`train_mlp` trains the small
:class:`~ddpm_lib.mlp.MLP` on the toy with the library's own Trainer and loss. Points are (B, 2); t is 0-based.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from .denoiser import Prediction
from .diffusion import DiffusionConfig, q_sample
from .mlp import MLPConfig
from .paths import GaussianPath, GridPoint
from .training import TrainConfig, Trainer


@dataclass(frozen=True)
class Mixture:
    """K equally weighted Gaussians N(mu_k, std^2 I) in the plane: the toy's data distribution q(x0)."""

    means: tuple[tuple[float, float], ...]  # the K centres mu_k
    std: float  # every component's standard deviation s

    def __post_init__(self) -> None:
        if not self.means or any(len(m) != 2 or not all(math.isfinite(c) for c in m) for m in self.means):
            raise ValueError(f"means must be one or more finite (x, y) pairs, got {self.means!r}")
        if not math.isfinite(self.std) or self.std <= 0:
            raise ValueError(f"std must be a finite number > 0, got {self.std}")

    def _mu(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.means, dtype=like.dtype, device=like.device)  # (K, 2)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n points (n, 2) drawn from the mixture."""
        k = torch.randint(len(self.means), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (torch.tensor(self.means, dtype=torch.float64)[k] + self.std * noise).to(dtype)

    def _diffused(self, x: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(sqrt(a) mu (K, 2), v, log-weights (B, K) of each component's density at x) under q(x_t) at a = alpha_bar."""
        centres = math.sqrt(alpha_bar) * self._mu(x)
        v = alpha_bar * self.std**2 + 1 - alpha_bar
        log_w = -((x[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * v)  # (B, K)
        return centres, v, log_w

    def log_prob(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """log q(x_t) of points (B, 2) at a = alpha_bar (1: the data itself). Returns (B,)."""
        _, v, log_w = self._diffused(x, alpha_bar)
        return torch.logsumexp(log_w, dim=1) - math.log(len(self.means)) - math.log(2 * math.pi * v)

    def responsibilities(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """r_k(x_t) = P(component k | x_t), (B, K)."""
        return torch.softmax(self._diffused(x, alpha_bar)[2], dim=1)

    def score(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """grad log q(x_t), (B, 2)."""
        centres, v, log_w = self._diffused(x, alpha_bar)
        r = torch.softmax(log_w, dim=1)  # (B, K)
        return (r @ centres - x) / v

    def posterior_mean(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[x0 | x_t], (B, 2): each component's Gaussian posterior mean, weighted by r_k."""
        centres, v, log_w = self._diffused(x, alpha_bar)
        r = torch.softmax(log_w, dim=1)  # (B, K)
        gain = math.sqrt(alpha_bar) * self.std**2 / v
        return r @ self._mu(x) + gain * (x - r @ centres)

    def eps(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[eps | x_t] = -sqrt(1 - a) score(x_t), (B, 2): the eps that no network can beat."""
        return -math.sqrt(1 - alpha_bar) * self.score(x, alpha_bar)


def ring(k: int = 8, radius: float = 1.0, std: float = 0.1) -> Mixture:
    """``k`` Gaussians of standard deviation ``std`` evenly spaced on a circle of ``radius``: the course's toy."""
    angles = [2 * math.pi * i / k for i in range(k)]
    return Mixture(tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles), std)


def vp_level(p: GridPoint) -> tuple[float, float]:
    """(c, a): on any path, c x_t = sqrt(a) x0 + sqrt(1 - a) eps with c = 1 / sqrt(alpha^2 + sigma^2) and
    a = (c alpha)^2, a point of the VP path with the same noise eps (c = 1 on the VP path itself)."""
    c = 1 / math.sqrt(p.alpha**2 + p.sigma**2)
    return c, (c * p.alpha) ** 2


class ExactDenoiser:
    """The Bayes-optimal denoiser of a :class:`Mixture` at every point of ``path``: what a perfect network would predict.

    Called like any denoiser, ``(x_t, p) -> Prediction(eps, x0)``, so every solver and sample_loop take it.
    Computes in x_t's dtype (float64 for solver-order measurements).
    """

    num_classes, batch_size = 0, None

    def __init__(self, mixture: Mixture, path: GaussianPath):
        self.mixture, self.path, self.device = mixture, path, torch.device("cpu")

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        c, a = vp_level(p)
        return Prediction(self.mixture.eps(c * x_t, a), self.mixture.posterior_mean(c * x_t, a))


class GaussianFit(ExactDenoiser):
    """The exact denoiser of the Gaussian N(m, c I) with the mixture's mean m and average variance c per coordinate:
    the best a model can do that knows the data's first two moments but not its modes. The trivial baseline.

    For that Gaussian, E[x0 | x_t] = m + (sqrt(a) c / (a c + 1 - a)) (x_t - sqrt(a) m)."""

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        scale, a = vp_level(p)
        x = scale * x_t
        mu = self.mixture._mu(x)  # (K, 2)
        m = mu.mean(0)
        c = (mu - m).square().sum(1).mean().item() / 2 + self.mixture.std**2
        x0 = m + math.sqrt(a) * c / (a * c + 1 - a) * (x - math.sqrt(a) * m)
        return Prediction((x - math.sqrt(a) * x0) / math.sqrt(1 - a), x0)


def eps_mse(denoiser: Callable, x0: torch.Tensor, t: int, generator: torch.Generator | None = None) -> float:
    """L_simple at one 0-based t of the denoiser's VP path: the mean of ||eps - eps_hat(x_t, t)||^2 / 2 over the
    points x0 (B, 2), each noised once (per coordinate, as loss_simple averages)."""
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = q_sample(x0, torch.full((len(x0),), t), denoiser.path.schedule, eps)
    return (denoiser(x_t, denoiser.path.point(t)).eps - eps).square().mean().item()


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between point clouds a (N, 2) and b (M, 2):
    zero when and only when the distributions agree (Szekely & Rizzo 2013); its scale is that of the points."""
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def energy_distances(
    draw_a: Callable[[torch.Generator], torch.Tensor], draw_b: Callable[[torch.Generator], torch.Tensor], repeats: int = 5, seed: int = 0
) -> tuple[float, float]:
    """The mean and sample standard deviation of ``repeats`` energy distances, each between draw_a(g) (N, 2) and
    draw_b(g) (M, 2) with g seeded seed, seed + 1, ...: a sampler's points against fresh data, say.

    With draw_a = draw_b, each distance is between two fresh draws: the floor that sampling noise alone gives
    at these sizes (about E|X - X'| (1/N + 1/M), since the estimate includes each cloud's zero self-distances).
    """
    distances = []
    for i in range(repeats):
        g = torch.Generator().manual_seed(seed + i)
        distances.append(energy_distance(draw_a(g), draw_b(g)))
    values = torch.tensor(distances, dtype=torch.float64)
    return values.mean().item(), values.std().item()


def annealed_langevin(
    score: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    alpha_bars: list[float],
    data_std: float,
    steps: int = 20,
    step_size: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) on the diffused marginals, from the noisiest level down.

    At each level a = alpha_bars[i] it takes ``steps`` steps x <- x + (h / 2) score(x, a) + sqrt(h) z, with
    h = step_size * v and v = 1 - a + a data_std^2 the variance of the level's modes (Song & Ermon's
    step proportional to the level's sigma^2). The last level should be the data's (a close to 1). x: (B, 2).
    """
    for a in alpha_bars:
        h = step_size * (1 - a + a * data_std**2)
        for _ in range(steps):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + h / 2 * score(x, a) + math.sqrt(h) * z
    return x


def train_mlp(
    data: Mixture | Dataset,
    steps: int = 3000,
    points: int = 20_000,
    batch_size: int = 512,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    diffusion: DiffusionConfig | None = None,
) -> Trainer:
    """Train the toy's MLP (:class:`~ddpm_lib.mlp.MLPConfig` defaults) with the library's Trainer and plain (uniformly
    weighted) loss on ``diffusion``'s path and parametrization (None: the course's schedule, eps), in memory on
    the CPU; returns the trainer (its EMA model: ``trainer.ema.module``).

    ``data`` is a :class:`Mixture`, of which ``points`` draws are the training set, or a dataset of (x0, y) pairs
    or of (x0, y, noise) triples, a coupling such as :func:`ddpm_lib.reflow.ode_pairs` gives.

    The defaults take under a minute on 2 CPU cores and bring the MLP's loss within a few percent of the
    exact denoiser's floor at every t (notebook 9 measures it)."""
    if isinstance(data, Mixture):
        x0 = data.sample(points, torch.Generator().manual_seed(seed))
        data = TensorDataset(x0, torch.zeros(points))
    config = TrainConfig(
        dataset="toy",
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        warmup_steps=100,
        loss_weighting="uniform",
        ema_decay=0.995,
        precision="fp32",
        sample_every=0,
        checkpoint_every=0,
        seed=seed,
    )
    trainer = Trainer(MLPConfig(), diffusion or DiffusionConfig(), config, data, device="cpu")
    trainer.fit(progress=progress)
    return trainer


def straightness(xs: Sequence[torch.Tensor]) -> float:
    """How straight sampling paths are: the mean over particles of the length of the polyline through the states
    ``xs`` (each (N, 2), in the order visited) over the distance between its ends. 1 for straight lines, more for
    curved ones; a solver needs fewer steps the nearer it is to 1 (Liu et al. 2023)."""
    states = torch.stack([x.double() for x in xs])  # (steps, N, 2)
    length = (states[1:] - states[:-1]).norm(dim=2).sum(0)  # (N,)
    return (length / (states[-1] - states[0]).norm(dim=1)).mean().item()
