import math

import pytest
import torch
from torch import nn

from ddpm_lib.diffusion import q_posterior, q_sample, x0_from_eps
from ddpm_lib.likelihood import (
    bound_table,
    bound_weights,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    variational_bound,
    vb_term_bpd,
)
from ddpm_lib.schedules import extract, get_schedule
from ddpm_lib.unet import UNet

SCHEDULE = get_schedule("linear", 40)
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 pixel values in [-1, 1]


class Oracle(nn.Module):
    """The ideal network for a one-point data distribution x0 = image: it returns the true noise of x_t."""

    def __init__(self, image: torch.Tensor, schedule, offset: float = 0.0):
        super().__init__()
        self.image, self.schedule, self.offset = image, schedule, offset
        self.unused = nn.Parameter(torch.zeros(()))  # the bound reads the model's device from its parameters

    def forward(self, x_t, t):
        a = extract(self.schedule.alpha_bar, t, x_t.shape)
        return (x_t - a.sqrt() * self.image) / (1 - a).sqrt() + self.offset


def test_normal_kl_is_the_closed_form_and_zero_only_for_equal_gaussians():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert (normal_kl(m1, lv1, m2, lv2) > 0).all() and torch.equal(normal_kl(m1, lv1, m1, lv1), torch.zeros(100, dtype=torch.float64))


@pytest.mark.parametrize("mean, log_scale", [(LEVELS[128], -3.0), (LEVELS[241], -5.0), (LEVELS[0], -1.0), (0.3, 1.0), (0.97, 2.0)])
def test_the_256_bins_hold_all_the_probability(mean, log_scale):
    log_p = discretized_gaussian_log_likelihood(LEVELS, torch.full((256,), float(mean)), torch.tensor(log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    if log_scale < 0:  # narrower than the range: the most likely level is the mean's
        assert LEVELS[log_p.argmax()].item() == pytest.approx(float(mean))


def test_the_prior_term_is_the_kl_of_the_last_step_to_pure_noise():
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    a = SCHEDULE.alpha_bar[-1].item()
    nats = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0.double() ** 2)
    torch.testing.assert_close(prior_bpd(x0, SCHEDULE), nats.flatten(1).mean(1) / math.log(2))
    assert (prior_bpd(x0, get_schedule("linear", 1000)) < 1e-4).all()  # 1000 steps end almost exactly at N(0, I)


def test_a_network_that_knows_the_noise_pays_nothing_but_the_discretization():
    image = torch.tensor([-1.0, -0.2, 0.6, 1.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)  # the one image of the data
    bound = variational_bound(Oracle(image, SCHEDULE), image, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert bound.terms[:, 1:].abs().max() < 1e-9  # every KL term: the predicted x0 is exact, so the means match
    # L_0: the decoder's mean is x0 itself and its scale sqrt(beta tilde_1); one bin of width 2/255 around it
    z = (1 / 255) / math.exp(0.5 * SCHEDULE.posterior_log_variance_clipped[0].item())
    interior = -math.log(math.erf(z / math.sqrt(2)))  # -log(Phi(z) - Phi(-z))
    edge = -math.log(0.5 * (1 + math.erf(z / math.sqrt(2))))  # -log Phi(z): the end bins reach to infinity
    expected = (2 * edge + 2 * interior) / 4 / math.log(2)
    torch.testing.assert_close(bound.terms[:, 0], torch.full((2,), expected, dtype=torch.float64))
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(1))


@pytest.mark.parametrize("t", [3, 20])
def test_a_kl_term_against_its_closed_form_for_a_network_off_by_a_constant(t):
    image = torch.full((1, 1, 2, 2), 0.1)
    delta = 0.01  # predicted eps = true eps + delta, so the predicted x0 is off by -sqrt(1 - a) / sqrt(a) * delta
    x_t = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.1
    bits = vb_term_bpd(Oracle(image, SCHEDULE, offset=delta), image, x_t, t, SCHEDULE)
    a, coef1 = SCHEDULE.alpha_bar[t].item(), SCHEDULE.posterior_mean_coef1[t].item()
    mean_gap = coef1 * math.sqrt(1 - a) / math.sqrt(a) * delta  # q_posterior's weight on x0 times the x0 error
    expected = mean_gap**2 / (2 * SCHEDULE.posterior_variance[t].item()) / math.log(2)
    assert bits.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("t", [1, 200, 999])
def test_the_kl_term_is_the_bound_weight_times_the_squared_eps_error(t):
    schedule = get_schedule("linear", 1000)
    g = torch.Generator().manual_seed(t)
    x0, eps, error = torch.rand(4, 1, 3, 3, generator=g) * 0.2, torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    x_t = q_sample(x0, t, schedule, eps)
    x0_pred = x0_from_eps(x_t, t, eps + 0.01 * error, schedule)  # a network whose eps is off by 0.01 * error
    true_mean, var = q_posterior(x0.double(), x_t.double(), t, schedule)
    model_mean, _ = q_posterior(x0_pred.double(), x_t.double(), t, schedule)
    log_var = schedule.posterior_log_variance_clipped[t].expand_as(true_mean)
    kl = normal_kl(true_mean, log_var, model_mean, log_var)
    torch.testing.assert_close(kl, bound_weights(schedule)[t] * (0.01 * error.double()) ** 2, rtol=1e-3, atol=1e-12)
    assert (bound_weights(schedule, "beta")[1:] < bound_weights(schedule)[1:]).all()  # beta > beta tilde: a smaller weight


def test_every_kl_term_is_nonnegative_and_the_table_adds_up(tiny_config):
    x0 = torch.randint(0, 256, (3, 1, 8, 8)) / 127.5 - 1
    model = UNet(tiny_config)

    def bound(seed):
        return variational_bound(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(seed))

    first = bound(0)
    assert first.terms.shape == (3, 40) and (first.terms >= 0).all() and (first.terms[:, 1:] > 0).any()
    rows = dict(bound_table(first))
    quarters = [f"KL terms, t = {lo} ... {hi}" for lo, hi in ((30, 39), (20, 29), (10, 19), (1, 9))]
    assert list(rows) == ["prior L_T", *quarters, "L_0 (t = 0, 256 bins)"]
    assert sum(rows.values()) == pytest.approx(first.total.mean().item())
    assert torch.equal(bound(0).total, first.total) and not torch.equal(bound(1).total, first.total)  # seeded
