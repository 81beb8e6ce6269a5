import dataclasses

import pytest
import torch
from torch import nn

from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.guidance import cfg_combine, class_blocks, classifier_grad
from ddpm_lib.sampling import ddim_step, ddpm_step, sample, sample_loop
from ddpm_lib.solvers import DDIM, DDPM
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


@pytest.mark.parametrize("solver", [DDPM(), DDIM(5, eta=1.0)], ids=["ddpm", "ddim"])
def test_conditional_sampling_follows_the_labels(conditional, solver):
    den = Denoiser(conditional, DiffusionConfig(T=20))
    x_T = torch.randn(3, 1, 8, 8)

    def draw(labels=None):
        return sample(guided(den, labels), (3, 1, 8, 8), solver, x_T=x_T, generator=torch.Generator().manual_seed(0))

    by_label = [draw(torch.full((3,), k)) for k in range(3)]
    assert not torch.allclose(by_label[0], by_label[1])
    with torch.no_grad():  # no labels = the "no label" class, 3
        p = den.path.point(10)
        assert torch.equal(den(x_T, p).eps, den(x_T, p, torch.full((3,), 3)).eps)
    assert draw().shape == by_label[0].shape


def test_guided_sampling_splits_labels_with_the_batch(conditional):
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole, split = (
        sample(guided(Denoiser(conditional, DiffusionConfig(T=10), batch_size=b), labels, guidance=2.0), (5, 1, 8, 8), DDIM(4),
               generator=torch.Generator().manual_seed(1))
        for b in (None, 2)
    )  # fmt: skip
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", [DDPM(), DDIM(5)], ids=["ddpm", "ddim"])
def test_classifier_guidance_shifts_eps_as_dhariwal_and_nichol_alg_2(tiny_config, solver):
    model, classifier = UNet(tiny_config).eval(), LinearClassifier()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    den, y, s = Denoiser(model, DiffusionConfig(T=10)), torch.tensor([2, 0]), 3.0
    x_T = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        eps = model(x_T, torch.full((2,), 9))
    grad = classifier_grad(classifier, x_T, torch.full((2,), 9), y)
    eps_hat = eps - (1 - den.path.schedule.alpha_bar[9].item()) ** 0.5 * s * grad  # Alg. 2, for every solver (DDPM too)
    steps = sample_loop(guided(den, y, classifier=classifier, classifier_scale=s), x_T.shape, solver, x_T=x_T,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    next(steps)
    if isinstance(solver, DDPM):
        z = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        expected = ddpm_step(x_T, 9, eps_hat, den.path.schedule, z).x_prev
    else:
        expected = ddim_step(x_T, 9, 7, eps_hat, den.path.schedule).x_prev
    torch.testing.assert_close(next(steps).x_t, expected, atol=1e-5, rtol=1e-5)


def test_bad_guidance_requests_are_refused(tiny_config, conditional):
    unconditional, shape = Denoiser(UNet(tiny_config), DiffusionConfig(T=10)), (2, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional: labels need"):
        guided(unconditional, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        guided(unconditional, torch.tensor([0, 1]), guidance=1.0, classifier=LinearClassifier())
    cond = Denoiser(conditional, DiffusionConfig(T=10))
    with pytest.raises(ValueError, match="labels to guide toward"):
        guided(cond, guidance=1.0)
    with pytest.raises(ValueError, match=r"3 labels for 2 images"):
        sample(guided(cond, torch.tensor([0, 1, 2])), shape, DDIM(2))
    with pytest.raises(ValueError, match="classes 0 ... 2 of the model"):
        guided(cond, torch.tensor([0, 5]))


def test_class_blocks_are_equal_shares_in_order():
    assert class_blocks([0, 1, 2], 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert class_blocks([7], 3).tolist() == [7, 7, 7]
    blocks = class_blocks(list(range(10)), 1000)
    assert torch.equal(torch.bincount(blocks), torch.full((10,), 100)) and torch.equal(blocks, blocks.sort().values)
    assert torch.bincount(class_blocks([0, 1, 2], 7)).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    pieces = [class_blocks([4, 0, 9], 1000, start, min(256, 1000 - start)) for start in range(0, 1000, 256)]  # batch by batch
    assert torch.equal(torch.cat(pieces), class_blocks([4, 0, 9], 1000))
    with pytest.raises(ValueError, match="images 768 ... 1023 of 1000"):
        class_blocks([4, 0, 9], 1000, 768, 256)
    with pytest.raises(ValueError, match="fewer than the 3 classes"):
        class_blocks([0, 1, 2], 2)
