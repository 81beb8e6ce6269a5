import pytest
import torch

from ddpm_lib.diffusion import min_snr_weight
from ddpm_lib.paths import VP, LinearFlow
from ddpm_lib.schedules import get_schedule
from ddpm_lib.weightings import LOSS_WEIGHTINGS, WEIGHTINGS, implied_weight

S = torch.linspace(0.01, 0.99, 981, dtype=torch.float64)  # times of the linear flow
FLOW = LinearFlow()


def proportional(a: torch.Tensor, b: torch.Tensor, rel: float = 0.01) -> bool:
    """a = c b for one constant c, inside the grid (its two ends take one-sided differences)."""
    ratio = (a / b)[1:-1]
    return (ratio.max() / ratio.min()).item() < 1 + rel


def test_flow_matching_weights_the_eps_error_by_e_to_the_minus_lambda_as_kingma_and_gao_say():
    lam, w = implied_weight(FLOW, S, "velocity", "uniform")  # their Eq. for rectified flow: e^(-lambda_KG / 2), lambda_KG = 2 lambda
    assert proportional(w, torch.exp(-lam)) and w.max() == 1
    # eps prediction with uniform times on the same path: |ds/dlambda| = s (1 - s) = sech^2(lambda / 2) / 4
    assert proportional(implied_weight(FLOW, S, "eps", "uniform")[1], torch.cosh(lam / 2) ** -2)
    # logit-normal times put the standard normal density of -lambda in front of velocity's 1 / alpha^2 = (1 + e^-lambda)^2
    lam, w = implied_weight(FLOW, S, "velocity", "uniform", "logit_normal")
    assert proportional(w, torch.exp(-(lam**2) / 2) * (1 + torch.exp(-lam)) ** 2)


def test_on_the_vp_path_l_simple_is_dt_dlambda_and_min_snr_caps_it_at_gamma():
    path, t = VP(get_schedule("linear", 1000)), torch.arange(1000)
    lam, plain = implied_weight(path, t, "eps", "uniform")
    (dlam_dt,) = torch.gradient(lam, spacing=(t.double(),))
    assert proportional(plain, 1 / dlam_dt.abs())
    _, capped = implied_weight(path, t, "eps", "min_snr", gamma=5.0)
    assert proportional(capped, plain * torch.exp(2 * lam).clamp(max=5.0) / torch.exp(2 * lam))
    _, v = implied_weight(path, t, "v", "min_snr", gamma=5.0)  # the same objective in another parametrization
    assert proportional(v, capped)


def test_the_weightings_are_listed_and_min_snr_weight_reads_the_table():
    assert LOSS_WEIGHTINGS == ("min_snr", "uniform") == tuple(WEIGHTINGS)
    schedule = get_schedule("linear", 1000)
    t = torch.tensor([0, 100, 999])
    snr = schedule.snr[t].float()
    assert torch.equal(min_snr_weight(t, schedule, 5.0, "eps"), snr.clamp(max=5.0) / snr)
    assert min_snr_weight(t, schedule, 5.0, "x0").tolist() == pytest.approx(snr.clamp(max=5.0).tolist())
    # v's error is sqrt(SNR + 1) times x0's on the VP path: (alpha^2 + sigma^2)^2 / sigma^2 = 1 / sigma^2 = SNR + 1
    torch.testing.assert_close(min_snr_weight(t, schedule, 5.0, "v"), snr.clamp(max=5.0) / (snr + 1), rtol=1e-5, atol=0)
