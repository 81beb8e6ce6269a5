import pytest
import torch

from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.parametrizations import PARAMETRIZATIONS, PREDICTIONS, eps_from_x0, x0_from_eps
from ddpm_lib.paths import VP, LinearFlow
from ddpm_lib.schedules import get_schedule

POINTS = {
    "vp": [VP(get_schedule("linear", 1000)).point(t) for t in (0, 10, 500, 999)],
    "linear_flow": [LinearFlow().point(s) for s in (0.001, 0.3, 0.9, 0.999)],
}


@pytest.mark.parametrize("path", POINTS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_parametrization_round_trips_to_eps_and_x0_on_each_path(prediction, path):
    g = torch.Generator().manual_seed(0)
    for p in POINTS[path]:
        x0, eps = (
            torch.rand(3, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1,
            torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64),
        )
        x_t = p.alpha * x0 + p.sigma * eps
        target = PARAMETRIZATIONS[prediction].target(x0, eps, p.alpha, p.sigma)
        got_eps, got_x0 = PARAMETRIZATIONS[prediction].to_eps_x0(target, x_t, p.alpha, p.sigma)
        torch.testing.assert_close(got_x0, x0, atol=1e-9, rtol=0)
        torch.testing.assert_close(got_eps, eps, atol=1e-9, rtol=0)


def test_the_targets_are_their_closed_forms():
    p = LinearFlow().point(0.3)
    x0, eps = torch.tensor([0.5], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    assert PARAMETRIZATIONS["velocity"].target(x0, eps, p.alpha, p.sigma).item() == -2.5  # eps - x0 = dx_s / ds
    assert PARAMETRIZATIONS["v"].target(x0, eps, p.alpha, p.sigma).item() == pytest.approx(0.7 * -2.0 - 0.3 * 0.5)
    # on the linear path the velocity is the derivative of x_s = (1 - s) x0 + s eps along s
    x = [(1 - s) * x0 + s * eps for s in (0.3, 0.3 + 1e-6)]
    assert ((x[1] - x[0]) / 1e-6).item() == pytest.approx(-2.5, rel=1e-5)


def test_the_linear_flows_pure_noise_end_gives_x0_from_the_velocity():
    p = LinearFlow().point(1.0)  # alpha = 0: x_t is eps itself
    eps, x0 = torch.randn(4), torch.randn(4)
    got_eps, got_x0 = PARAMETRIZATIONS["velocity"].to_eps_x0(eps - x0, eps, p.alpha, p.sigma)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    assert torch.isinf(x0_from_eps(eps, eps + 1, p.alpha, p.sigma)).all()  # eps alone cannot say x0 there


def test_eps_and_x0_invert_each_other():
    p = POINTS["linear_flow"][1]
    x_t, eps = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(eps_from_x0(x_t, x0_from_eps(x_t, eps, p.alpha, p.sigma), p.alpha, p.sigma), eps)


def test_an_unknown_prediction_or_path_is_refused_where_a_config_is_built():
    with pytest.raises(ValueError, match="unknown prediction 'score'; valid choices: eps, x0, v, velocity"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ValueError, match="unknown path 've'; valid choices: vp, linear_flow"):
        DiffusionConfig(path="ve")
    with pytest.raises(ValueError, match="eps cannot give x0 where alpha = 0"):
        DiffusionConfig(path="linear_flow", prediction="eps")
    assert DiffusionConfig(path="linear_flow", prediction="velocity").make_path().name == "linear_flow"
