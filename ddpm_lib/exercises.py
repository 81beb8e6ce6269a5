"""Checkers for the course's exercises.

Each ``check_*`` runs the reader's function on random inputs, compares it with ddpm_lib's own
implementation, prints what is right or, for the usual mistakes, what exactly is wrong, and
returns True or False. A function that still raises NotImplementedError is reported as not
attempted yet. ``reveal`` checks a reference solution from ``ddpm_lib.solutions`` and shows its
source folded, so that a notebook read without a kernel does not give the answer away.
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .diffusion import loss_simple, q_posterior, q_sample
from .metrics import GaussianStats, frechet_distance
from .parametrizations import PARAMETRIZATIONS
from .paths import VP, LinearFlow
from .sampling import ddim_step, ddpm_step
from .schedules import extract, get_schedule
from .toy import ExactDenoiser, ring
from .unet import UNet, UNetConfig, timestep_embedding


def _verdict(
    name: str,
    fn: Callable,
    args: tuple,
    expected: torch.Tensor,
    mistakes: dict[str, torch.Tensor],
    atol: float = 1e-4,
    quiet: bool = False,
) -> bool:
    """Call fn(*args), compare with ``expected``, print the verdict (no line on success if ``quiet``)."""
    try:
        got = fn(*args)
    except NotImplementedError:
        print(f"✗ {name}: not attempted yet; replace `raise NotImplementedError` with your code.")
        return False
    except Exception as e:  # the reader's code may fail in any way; say how
        print(f"✗ {name} raised {type(e).__name__}: {e}")
        return False
    if not isinstance(got, torch.Tensor):
        print(f"✗ {name} returned a {type(got).__name__}; it should return a tensor of shape {tuple(expected.shape)}.")
        return False
    if got.shape != expected.shape:
        print(f"✗ {name} returned shape {tuple(got.shape)}; expected {tuple(expected.shape)}.")
        return False
    got = got.detach().to(expected.dtype)
    if torch.allclose(got, expected, atol=atol, rtol=1e-4):
        if not quiet:
            print(f"✓ {name} is correct: it matches ddpm_lib on random inputs.")
        return True
    for hint, wrong in mistakes.items():
        if torch.allclose(got, wrong, atol=atol, rtol=1e-4):
            print(f"✗ {name}: {hint}")
            return False
    error = (got - expected).abs().max().item()
    print(f"✗ {name}: wrong values (largest error {error:.3g}). Compare your formula with the equation in the text.")
    return False


def check_q_sample(fn: Callable) -> bool:
    """fn(x0, t, schedule, noise) -> x_t, for a (B,) tensor of 0-based t (Eq. 4)."""
    g = torch.Generator().manual_seed(0)
    schedule = get_schedule("linear", 1000)
    x0 = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 6, 6, generator=g)
    t = torch.tensor([1, 10, 100, 250, 500, 750, 900, 999])
    a_bar, a = extract(schedule.alpha_bar, t, x0.shape), extract(schedule.alphas, t, x0.shape)
    a_bar_prev = extract(schedule.alpha_bar_prev, t, x0.shape)
    mistakes = {
        "you used alpha_t (one step) where Eq. 4 needs alpha_bar_t (the product over all steps up to t).": a.sqrt() * x0
        + (1 - a).sqrt() * noise,
        "the square roots are missing: the weights are sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t).": a_bar * x0 + (1 - a_bar) * noise,
        "off by one step: t is 0-based, so read alpha_bar[t], not alpha_bar[t - 1].": a_bar_prev.sqrt() * x0
        + (1 - a_bar_prev).sqrt() * noise,
        "x0 and the noise are swapped.": a_bar.sqrt() * noise + (1 - a_bar).sqrt() * x0,
    }
    return _verdict("q_sample", fn, (x0, t, schedule, noise), q_sample(x0, t, schedule, noise), mistakes)


def check_alpha_bar(fn: Callable) -> bool:
    """fn(betas) -> alpha_bar, both float64 tensors of shape (T,)."""
    betas = get_schedule("cosine", 200).betas
    alphas = 1 - betas
    mistakes = {
        "that is the cumulative product of the betas; alpha_bar multiplies alpha_t = 1 - beta_t.": torch.cumprod(betas, 0),
        "that is 1 - cumsum(beta): a sum, not a product. alpha_bar_t = prod_{s <= t} (1 - beta_s).": 1 - torch.cumsum(betas, 0),
        "off by one: alpha_bar[0] should already include step 0, i.e. equal 1 - beta_0.": torch.cat(
            [torch.ones(1, dtype=betas.dtype), torch.cumprod(alphas, 0)[:-1]]
        ),
    }
    return _verdict("alpha_bar", fn, (betas,), torch.cumprod(alphas, 0), mistakes, atol=1e-10)


def check_q_posterior_mean(fn: Callable) -> bool:
    """fn(x0, x_t, t, schedule) -> the mean of q(x_{t-1} | x_t, x0) (Eq. 7), for a (B,) tensor of 0-based t >= 1."""
    g = torch.Generator().manual_seed(2)
    schedule = get_schedule("linear", 50)  # large steps, so that every usual mistake shows in float32
    x0, x_t = torch.rand(6, 1, 5, 5, generator=g) * 2 - 1, torch.randn(6, 1, 5, 5, generator=g)
    t = torch.tensor([1, 3, 10, 25, 40, 49])

    def read(values: torch.Tensor, at: torch.Tensor = t) -> torch.Tensor:
        return extract(values, at, x0.shape)

    a, a_bar, a_bar_prev, beta = read(schedule.alphas), read(schedule.alpha_bar), read(schedule.alpha_bar_prev), read(schedule.betas)
    c1, c2 = read(schedule.posterior_mean_coef1), read(schedule.posterior_mean_coef2)
    mistakes = {
        "the weight of x0 needs sqrt(alpha_bar_{t-1}), one step before t, not sqrt(alpha_bar_t).": a_bar.sqrt() * beta / (1 - a_bar) * x0
        + c2 * x_t,
        "the weight of x_t is sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t): the square root of alpha_t is missing.": c1 * x0
        + a * (1 - a_bar_prev) / (1 - a_bar) * x_t,
        "the weight of x_t has (1 - alpha_bar_{t-1}) on top, not (1 - alpha_bar_t).": c1 * x0 + a.sqrt() * x_t,
        "the two weights are swapped: x0 gets sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t).": c2 * x0 + c1 * x_t,
        "off by one step: t is a 0-based code index, so read index t itself (alpha_bar_prev[t] is alpha_bar[t - 1]).": read(
            schedule.posterior_mean_coef1, t - 1
        )
        * x0
        + read(schedule.posterior_mean_coef2, t - 1) * x_t,
    }
    return _verdict("the posterior mean", fn, (x0, x_t, t, schedule), q_posterior(x0, x_t, t, schedule)[0], mistakes)


def check_timestep_embedding(fn: Callable) -> bool:
    """fn(t, dim) -> (B, dim) sinusoidal embedding, sines first, frequencies 10000 ** (-i / (dim / 2))."""
    t, dim, half = torch.tensor([0, 1, 17, 500, 999]), 32, 16
    args = t.float()[:, None] * torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)[None]
    mistakes = {
        "sines and cosines are swapped: this course puts the sines first.": torch.cat([args.cos(), args.sin()], 1),
        "sines and cosines are interleaved; this course concatenates all sines, then all cosines.": torch.stack(
            [args.sin(), args.cos()], 2
        ).reshape(len(t), dim),
    }
    return _verdict("timestep_embedding", fn, (t, dim), timestep_embedding(t, dim), mistakes)


def check_loss_simple(fn: Callable) -> bool:
    """fn(model, x0, t, noise, schedule) -> the scalar L_simple for eps-prediction (Eq. 14), on a small random U-Net."""
    g = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = UNet(
            UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2)
        )
        for p in model.parameters():  # the output layers start at zero; give them weights so mistakes show
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    schedule = get_schedule("linear", 1000)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = q_sample(x0, t, schedule, noise)
    with torch.no_grad():
        expected = loss_simple(model, x0, VP(schedule), t=t, noise=noise)
        pred = model(x_t, t)
        a_bar = extract(schedule.alpha_bar, t, x0.shape)
        mistakes = {
            "the target is the noise eps, not the clean image x0.": ((x0 - pred) ** 2).mean(),
            "that is a sum; L_simple averages the squared error.": ((noise - pred) ** 2).sum(),
            "x_t needs the square roots: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.": (
                (noise - model(a_bar * x0 + (1 - a_bar) * noise, t)) ** 2
            ).mean(),
        }
        return _verdict("loss_simple", fn, (model, x0, t, noise, schedule), expected, mistakes)


def check_ddpm_step(fn: Callable) -> bool:
    """fn(x_t, t, eps, schedule, noise) -> x_{t-1} for an int 0-based t, variance beta tilde, no clipping (Alg. 2)."""
    g = torch.Generator().manual_seed(1)
    schedule = get_schedule("linear", 1000)
    for t in (999, 400, 3, 0):
        x_t, eps, noise = (torch.randn(6, 1, 5, 5, generator=g) for _ in range(3))
        expected = ddpm_step(x_t, t, eps, schedule, noise, clip_x0=False).x_prev
        mean = ddpm_step(x_t, t, eps, schedule, torch.zeros_like(noise), clip_x0=False).x_prev
        if t == 0:
            mistakes = {"at t = 0 no noise is added (Alg. 2: z = 0 on the last step).": mean + schedule.betas[0].sqrt().float() * noise}
        else:
            mistakes = {
                "that uses sigma_t^2 = beta_t; this exercise asks for beta tilde_t (schedule.posterior_variance).": ddpm_step(
                    x_t, t, eps, schedule, noise, variance="beta", clip_x0=False
                ).x_prev,
                "the noise is missing: x_{t-1} = mean + sigma_t z for t > 0.": mean,
            }
        if not _verdict(f"ddpm_step at t={t}", fn, (x_t, t, eps, schedule, noise), expected, mistakes, quiet=True):
            return False
    print("✓ ddpm_step is correct: it matches ddpm_lib at t = 999, 400, 3 and 0.")
    return True


def check_ddim_step(fn: Callable) -> bool:
    """fn(x_t, t, t_prev, eps, schedule, eta, noise) -> x_{t_prev} (Song et al. 2021, Eqs. 12 and 16), with the
    predicted x0 clipped to [-1, 1] and eps derived again from it, for int 0-based t > t_prev >= 0."""
    g = torch.Generator().manual_seed(3)
    schedule = get_schedule("linear", 1000)
    for t, t_prev, eta in ((999, 979, 0.0), (600, 580, 0.5), (100, 80, 1.0)):
        x_t, eps, noise = (torch.randn(6, 1, 5, 5, generator=g) for _ in range(3))
        x_t = x_t * 0.3  # so that some predicted x0 stay inside [-1, 1] and some are clipped
        expected = ddim_step(x_t, t, t_prev, eps, schedule, eta, noise).x_prev
        a, a_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t_prev].item()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x0 = ((x_t - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        eps_clipped = (x_t - a**0.5 * x0) / (1 - a) ** 0.5
        direction = max(1 - a_prev - sigma**2, 0.0) ** 0.5
        wrong_sigma = eta * (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # the square root missing
        mistakes = {  # (at eta = 0 the sigma mistakes coincide with the right answer, which is checked first)
            "alpha_bar_prev and alpha_bar_t are swapped: x0 is scaled by sqrt(alpha_bar_prev), the step's target.": a**0.5 * x0
            + max(1 - a - sigma**2, 0.0) ** 0.5 * eps_clipped
            + sigma * noise,
            "clip the predicted x0 to [-1, 1], then derive eps from the clipped x0.": ddim_step(
                x_t, t, t_prev, eps, schedule, eta, noise, clip_x0=False
            ).x_prev,
            "after clipping x0, derive eps from it again: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t).": a_prev**0.5 * x0
            + direction * eps
            + sigma * noise,
            "sigma_t^2 belongs under the square root of the direction term: sqrt(1 - alpha_bar_prev - sigma_t^2) eps.": a_prev**0.5 * x0
            + ((1 - a_prev) ** 0.5 - sigma) * eps_clipped
            + sigma * noise,
            "sigma_t (Eq. 16) is eta times the square root of (1 - a_prev) / (1 - a) * (1 - a / a_prev).": a_prev**0.5 * x0
            + max(1 - a_prev - wrong_sigma**2, 0.0) ** 0.5 * eps_clipped
            + wrong_sigma * noise,
        }
        if not _verdict(f"ddim_step at t={t}, eta={eta}", fn, (x_t, t, t_prev, eps, schedule, eta, noise), expected, mistakes, quiet=True):
            return False
    print("✓ ddim_step is correct: it matches ddpm_lib for eta = 0, 0.5 and 1, with and without clipping.")
    return True


def check_frechet_distance(fn: Callable) -> bool:
    """fn(mu_a, sigma_a, mu_b, sigma_b) -> the Frechet distance as a 0-d tensor or float, float64 inputs of shape (D,), (D, D)."""
    g = torch.Generator().manual_seed(3)
    mu_a, mu_b = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (torch.randn(6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    sigma_a, sigma_b = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(6, dtype=torch.float64)
    expected = torch.tensor(frechet_distance(GaussianStats(mu_a, sigma_a), GaussianStats(mu_b, sigma_b)), dtype=torch.float64)
    gap, traces = (mu_a - mu_b).square().sum(), sigma_a.trace() + sigma_b.trace()
    mistakes = {
        "the mean term is a squared distance: ||mu_a - mu_b||^2, not ||mu_a - mu_b||.": expected - gap + gap.sqrt(),
        "the cross term is 2 Tr (S_a S_b)^(1/2), a matrix square root, not the square root of each entry of S_a S_b.": (
            gap + traces - 2 * (sigma_a @ sigma_b).clamp(min=0).sqrt().trace()
        ),
        "the cross term is 2 Tr (S_a S_b)^(1/2), the trace of a square root, not the square root of the trace.": (
            gap + traces - 2 * (sigma_a @ sigma_b).trace().sqrt()
        ),
        "the factor 2 of the cross term is missing.": gap + traces - (gap + traces - expected) / 2,
    }

    def as_tensor(*args):
        return torch.as_tensor(fn(*args), dtype=torch.float64)

    return _verdict("frechet_distance", as_tensor, (mu_a, sigma_a, mu_b, sigma_b), expected, mistakes, atol=1e-6)


def check_guided_eps(fn: Callable) -> bool:
    """fn(model, x_t, t, y, w, schedule) -> the classifier-free guided eps (1 + w) eps(x_t, y) - w eps(x_t) (Ho & Salimans,
    Eq. 6) of a class-conditional eps-predicting ``model``, for x_t (B, C, H, W), 0-based t (B,) and labels y (B,)."""
    g = torch.Generator().manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_classes=3, num_groups=4))
        with torch.no_grad():  # a fresh U-Net predicts eps = 0 for every label; give it weights that tell labels apart
            for p in model.parameters():
                p.normal_(0, 0.2, generator=g)
    model.eval()
    schedule = get_schedule("linear", 1000)
    x_t = torch.randn(6, 1, 8, 8, generator=g)
    t, y = torch.tensor([999, 800, 500, 300, 100, 10]), torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full_like(y, 3)
    with torch.no_grad():
        cond, uncond, as_zero = model(x_t, t, y), model(x_t, t, null), model(x_t, t, torch.zeros_like(y))
    a_bar = extract(schedule.alpha_bar, t, x_t.shape)  # (B, 1, 1, 1)

    def x0_of(eps: torch.Tensor) -> torch.Tensor:
        return ((x_t - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()).clamp(-1, 1)

    for w in (2.0, 0.5):
        expected = (1 + w) * cond - w * uncond
        guided_x0 = (1 + w) * x0_of(cond) - w * x0_of(uncond)
        mistakes = {
            "the sign of w: the conditional prediction gets 1 + w and the unconditional one -w, (1 + w) eps(x_t, y) - w eps(x_t).": (
                (1 - w) * cond + w * uncond
            ),
            "the sign of w: the conditional prediction is pushed further, (1 + w) eps(x_t, y) - w eps(x_t), not the unconditional.": (
                (1 + w) * uncond - w * cond
            ),
            "forgot the null class: the unconditional eps(x_t) is the model given the 'no label' class (y = num_classes), "
            "not the same label again.": cond,
            "forgot the null class: label 0 is the digit 0; 'no label' is the extra class num_classes.": (1 + w) * cond - w * as_zero,
            "guide eps, not x0: combine the two eps predictions and return an eps (the sampler clips x0 after guidance).": (
                (x_t - a_bar.sqrt() * guided_x0) / (1 - a_bar).sqrt()
            ),
            "return the guided eps, not the predicted x0 it implies.": guided_x0,
        }
        if not _verdict(f"guided_eps at w={w}", fn, (model, x_t, t, y, w, schedule), expected, mistakes, quiet=True):
            return False
    print("✓ guided_eps is correct: it matches (1 + w) eps(x_t, y) - w eps(x_t) for w = 2 and 0.5.")
    return True


@dataclass(frozen=True)
class FoldedSolution:
    """A reference solution's source, displayed folded: an HTML <details> that opens on a click."""

    name: str  # the solution's function name
    source: str  # its source code

    def _repr_html_(self) -> str:
        return (
            f"<details><summary><b>Reference solution</b>: <code>{self.name}</code> (click to open)</summary>"
            f'<pre><code class="language-python">{html.escape(self.source)}</code></pre></details>'
        )

    def __repr__(self) -> str:  # where no HTML is shown, say where the answer is instead of printing it
        return f"Reference solution: {self.name} in ddpm_lib/solutions.py"


def check_heun_step(fn: Callable) -> bool:
    """fn(denoiser, x_t, p, p_next) -> x at p_next after one Heun step on the probability-flow ODE, for points x_t (B, 2),
    the 2-D toy's exact denoiser (denoiser(x, p) -> Prediction(eps, x0)) and two grid points p, p_next (each .t, .alpha, .sigma)."""
    path = VP(get_schedule("linear", 1000))
    denoiser = ExactDenoiser(ring(), path)
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.8
    p, p_next = path.point(600), path.point(450)
    s, s_next = p.sigma / p.alpha, p_next.sigma / p_next.alpha
    eps = denoiser(x_t, p).eps
    euler = p_next.alpha * (x_t / p.alpha + (s_next - s) * eps)
    eps_end = denoiser(euler, p_next).eps
    expected = p_next.alpha * (x_t / p.alpha + (s_next - s) * (eps + eps_end) / 2)
    plain = p_next.sigma - p.sigma  # a step in sigma instead of sigma~
    mistakes = {
        "this is Euler's step (deterministic DDIM) alone; Heun then evaluates eps where it lands and steps again with the mean "
        "of both slopes.": euler,
        "you stepped with the slope at the end alone; the trapezoid rule takes the mean of the slopes at both ends.": (
            p_next.alpha * (x_t / p.alpha + (s_next - s) * eps_end)
        ),
        "the step is in x~ = x / alpha and sigma~ = sigma / alpha; you stepped x itself by the change of sigma.": x_t
        + plain * (eps + denoiser(x_t + plain * eps, p_next).eps) / 2,
    }
    return _verdict("heun_step", lambda *args: fn(*args), (denoiser, x_t, p, p_next), expected, mistakes, atol=1e-8)


def check_flow_matching_loss(fn: Callable) -> bool:
    """fn(model, x0, s, eps) -> the flow-matching loss (a scalar) of a velocity model ``model(x_s, s)`` (B, 2) on data
    x0 (B, 2), times s (B,) in [0, 1] (1: pure noise) and noise eps (B, 2), averaged like L_simple."""
    g = torch.Generator().manual_seed(7)
    x0, eps = ring().sample(256, g, torch.float64), torch.randn(256, 2, generator=g, dtype=torch.float64)
    s = torch.rand(256, generator=g, dtype=torch.float64)
    weights = torch.tensor([[0.8, -0.3], [0.2, 0.5]], dtype=torch.float64)

    def model(x, s):  # a fixed stand-in for a network: any function of (x_s, s) will do
        return x @ weights + torch.cos(3 * s)[:, None]

    def loss(x_s, target):
        return (model(x_s, s) - target).square().mean()

    p = LinearFlow().points(s, x0.shape)
    x_s = p.alpha.double() * x0 + p.sigma.double() * eps
    expected = loss(x_s, PARAMETRIZATIONS["velocity"].target(x0, eps, p.alpha.double(), p.sigma.double()))
    swapped = s[:, None] * x0 + (1 - s[:, None]) * eps
    mistakes = {
        "the velocity is dx_s/ds = eps - x0 (s runs from the data at 0 to the noise at 1); you regressed on x0 - eps.": loss(x_s, x0 - eps),
        "s = 0 is the data and s = 1 pure noise, x_s = (1 - s) x0 + s eps; you put the data at s = 1.": loss(swapped, eps - x0),
        "the target is the velocity eps - x0, not the noise eps alone.": loss(x_s, eps),
        "L_simple averages over the coordinates as well as the points; yours sums over them.": loss(x_s, eps - x0) * 2,
    }
    return _verdict("flow_matching_loss", fn, (model, x0, s, eps), expected, mistakes, atol=1e-8)


def reveal(solution: Callable, check: Callable) -> FoldedSolution:
    """Run ``check`` on ``solution`` (raising AssertionError if it fails) and return its source, folded."""
    if not check(solution):
        raise AssertionError(f"the reference solution {solution.__name__} fails {check.__name__}; fix ddpm_lib/solutions.py")
    return FoldedSolution(solution.__name__, inspect.getsource(solution))
