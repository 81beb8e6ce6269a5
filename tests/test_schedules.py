import math

import pytest
import torch

from ddpm_lib.schedules import SCHEDULES, NoiseSchedule, cosine, extract, get_schedule, linear


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", [10, 1000])
def test_betas_in_unit_interval_and_alpha_bar_strictly_decreasing(name, T):
    s = get_schedule(name, T)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert 0 < s.alpha_bar[-1] < s.alpha_bar[0] < 1


def test_linear_end_points_follow_ho_et_al_and_scale_with_T():
    assert linear(1000)[0].item() == pytest.approx(1e-4)
    assert linear(1000)[-1].item() == pytest.approx(0.02)
    assert linear(500)[0].item() == pytest.approx(2e-4)
    assert linear(500)[-1].item() == pytest.approx(0.04)


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    alpha_bar = get_schedule("cosine", T).alpha_bar

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    unclipped = int((cosine(T) < 0.999).sum())  # beta is clipped only at the very end
    assert unclipped >= T - 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[:unclipped], expected, rtol=1e-10, atol=1e-12)


def test_derived_quantities_against_their_definitions():
    s = get_schedule("linear", 100)
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alpha_bar[5], torch.prod(1 - s.betas[:6]))
    assert s.alpha_bar_prev[0] == 1 and torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    t = 40
    tilde = (1 - s.alpha_bar[t - 1]) / (1 - s.alpha_bar[t]) * s.betas[t]
    torch.testing.assert_close(s.posterior_variance[t], tilde)
    assert s.posterior_variance[0] == 0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1] == torch.log(s.posterior_variance[1])
    torch.testing.assert_close(s.snr, s.alpha_bar / (1 - s.alpha_bar))


def test_unknown_schedule_lists_the_valid_names():
    with pytest.raises(ValueError, match="linear, cosine, quadratic, sigmoid"):
        get_schedule("exponential", 100)


def test_bad_T_and_bad_betas_are_rejected():
    with pytest.raises(ValueError, match="T must be a positive integer"):
        get_schedule("linear", 0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.0]))


def test_to_moves_every_tensor_and_keeps_float64():
    s = get_schedule("cosine", 50).to("meta")
    assert s.device.type == "meta" and s.snr.device.type == "meta" and s.alpha_bar.dtype == torch.float64


def test_extract_broadcasts_for_any_rank():
    s = get_schedule("linear", 10)
    t = torch.tensor([0, 3, 9])
    out = extract(s.alpha_bar, t, (3, 2, 5, 5))
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), s.alpha_bar[t].float())
    assert extract(s.betas, t, (3, 7)).shape == (3, 1)
    assert extract(s.betas, 4, (2, 1, 8, 8)).shape == (1, 1, 1, 1)
    assert extract(s.to("meta").betas, 4, (2, 1, 8, 8)).device.type == "meta"  # an int t follows the schedule's device
