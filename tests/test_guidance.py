import dataclasses

import pytest
import torch
from torch import nn

from ddpm_lib.guidance import cfg_combine, class_blocks, classifier_grad, guided_output
from ddpm_lib.sampling import ddim_step, ddpm_step, sample, sample_loop
from ddpm_lib.schedules import get_schedule
from ddpm_lib.unet import UNet


@pytest.fixture
def conditional(tiny_config) -> UNet:
    model = UNet(dataclasses.replace(tiny_config, num_classes=3))
    for p in model.parameters():  # the output layers start at zero; give them weights so labels show
        nn.init.normal_(p, std=0.2)
    return model.eval()


class LinearClassifier(nn.Module):
    """p(y | x_t, t) = softmax(W x_t): its gradient is known in closed form."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 3)
        nn.init.normal_(self.linear.weight, std=0.3)

    def forward(self, x, t):
        return self.linear(x.flatten(1))


def test_cfg_combine_is_ho_and_salimans_eq_6():
    cond, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert cfg_combine(cond, uncond, 0.0) == cond  # w = 0: the conditional model alone
    assert cfg_combine(cond, uncond, 3.0) == 4 * 2.0 - 3 * 0.5  # (1 + w) cond - w uncond
    assert cfg_combine(cond, uncond, -1.0) == uncond  # w = -1 (s = 0 in diffusers' convention): unconditional


def test_w0_is_the_conditional_prediction_and_one_batched_pass_equals_two(conditional):
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = conditional(x, t, y), conditional(x, t, torch.full_like(y, 3))
        assert torch.equal(guided_output(conditional, x, t, y, 0.0), cond)
        torch.testing.assert_close(guided_output(conditional, x, t, y, 2.0), 3 * cond - 2 * uncond, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)  # so the guidance moves something


def test_classifier_gradient_is_the_closed_form_and_points_uphill():
    classifier = LinearClassifier()
    x, t, y = torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 0, 1])
    with torch.inference_mode():  # where the sampler calls it
        grad = classifier_grad(classifier, x, t, y)
    W = classifier.linear.weight.detach()  # (3, 64); grad log softmax_y = W_y - sum_k p_k W_k
    p = classifier(x, t).softmax(1).detach()
    torch.testing.assert_close(grad.flatten(1), W[y] - p @ W)
    with torch.no_grad():
        before = classifier(x, t).log_softmax(1)[range(5), y]
        after = classifier(x + 0.01 * grad, t).log_softmax(1)[range(5), y]
    assert (after > before).all()  # a small step along the gradient makes each asked class more likely


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_conditional_sampling_follows_the_labels(conditional, sampler):
    schedule = get_schedule("linear", 20)
    kwargs = dict(sampler=sampler, steps=5 if sampler == "ddim" else None, generator=None)
    x_T = torch.randn(3, 1, 8, 8)
    by_label = [sample(conditional, schedule, (3, 1, 8, 8), x_T=x_T, labels=torch.full((3,), k), eta=1.0, **kwargs) for k in range(3)]
    assert not torch.allclose(by_label[0], by_label[1])
    unlabelled = sample(conditional, schedule, (3, 1, 8, 8), x_T=x_T, eta=1.0, **kwargs)
    torch.manual_seed(0)  # (eta = 1 and DDPM draw noise from the global RNG when no generator is given)
    a = sample(conditional, schedule, (3, 1, 8, 8), x_T=x_T, labels=torch.full((3,), 3), eta=1.0, **kwargs)
    torch.manual_seed(0)
    b = sample(conditional, schedule, (3, 1, 8, 8), x_T=x_T, eta=1.0, **kwargs)
    assert torch.equal(a, b) and unlabelled.shape == a.shape  # no labels = the "no label" class


def test_guided_sampling_splits_labels_with_the_batch(conditional):
    schedule, labels = get_schedule("linear", 10), torch.tensor([0, 1, 2, 0, 1])
    kwargs = dict(sampler="ddim", steps=4, labels=labels, guidance=2.0)
    whole = sample(conditional, schedule, (5, 1, 8, 8), generator=torch.Generator().manual_seed(1), **kwargs)
    split = sample(conditional, schedule, (5, 1, 8, 8), generator=torch.Generator().manual_seed(1), batch_size=2, **kwargs)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=1e-5)


def test_classifier_guidance_shifts_the_ddpm_mean_and_the_ddim_eps(tiny_config):
    model, classifier = UNet(tiny_config).eval(), LinearClassifier()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    schedule, y, s = get_schedule("linear", 10), torch.tensor([2, 0]), 3.0
    x_T = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        eps = model(x_T, torch.full((2,), 9))
    grad = classifier_grad(classifier, x_T, torch.full((2,), 9), y)

    g = torch.Generator().manual_seed(0)
    guided = sample_loop(model, schedule, (2, 1, 8, 8), x_T=x_T, generator=g, labels=y, classifier=classifier, classifier_scale=s)
    next(guided)
    z = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    expected = ddpm_step(x_T, 9, eps, schedule, z).x_prev + s * schedule.posterior_variance[9].item() * grad  # Alg. 1
    torch.testing.assert_close(next(guided).x_t, expected, atol=1e-5, rtol=1e-5)

    guided = sample_loop(model, schedule, (2, 1, 8, 8), "ddim", 5, x_T=x_T, labels=y, classifier=classifier, classifier_scale=s)
    next(guided)
    eps_hat = eps - (1 - schedule.alpha_bar[9].item()) ** 0.5 * s * grad  # Alg. 2
    torch.testing.assert_close(next(guided).x_t, ddim_step(x_T, 9, 7, eps_hat, schedule).x_prev, atol=1e-5, rtol=1e-5)


def test_bad_guidance_requests_are_refused(tiny_config, conditional):
    schedule, shape = get_schedule("linear", 10), (2, 1, 8, 8)
    unconditional = UNet(tiny_config)
    with pytest.raises(ValueError, match="unconditional: labels need"):
        sample(unconditional, schedule, shape, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        sample(unconditional, schedule, shape, labels=torch.tensor([0, 1]), guidance=1.0, classifier=LinearClassifier())
    with pytest.raises(ValueError, match="labels to guide toward"):
        sample(conditional, schedule, shape, guidance=1.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        sample(conditional, schedule, shape, labels=torch.tensor([0, 1, 2]))


def test_class_blocks_are_equal_shares_in_order():
    assert class_blocks([0, 1, 2], 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert class_blocks([7], 3).tolist() == [7, 7, 7]
    blocks = class_blocks(list(range(10)), 1000)
    assert torch.equal(torch.bincount(blocks), torch.full((10,), 100)) and torch.equal(blocks, blocks.sort().values)
    assert torch.bincount(class_blocks([0, 1, 2], 7)).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ValueError, match="fewer than the 3 classes"):
        class_blocks([0, 1, 2], 2)
