import dataclasses

import torch
from torch import nn

from ddpm_lib.denoiser import ClassifierFree, Denoiser, guided, in_batches
from ddpm_lib.diffusion import DiffusionConfig, x0_from_eps
from ddpm_lib.unet import UNet


def conditional_denoiser(tiny_config, prediction="eps") -> Denoiser:
    model = UNet(dataclasses.replace(tiny_config, num_classes=3))
    for p in model.parameters():  # the output layers start at zero; give them weights so labels show
        nn.init.normal_(p, std=0.2)
    return Denoiser(model.eval(), DiffusionConfig(T=1000, prediction=prediction))


def test_classifier_free_guidance_is_eq_6_from_one_batched_pass(tiny_config):
    den = conditional_denoiser(tiny_config)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        for t in (0, 500, 999):
            p = den.path.point(t)
            cond, uncond = den(x, p, y), den(x, p, torch.full_like(y, 3))  # label 3: "no label"
            assert torch.equal(ClassifierFree(den, y, 0.0)(x, p).eps, cond.eps)  # w = 0: the conditional model alone
            guided = ClassifierFree(den, y, 2.0)(x, p)
            torch.testing.assert_close(guided.eps, 3 * cond.eps - 2 * uncond.eps, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(guided.x0, x0_from_eps(x, t, guided.eps, den.path.schedule), atol=1e-3, rtol=1e-4)  # x0 agrees
            assert not torch.allclose(cond.eps, uncond.eps, atol=1e-3)  # so the guidance moves something


def test_the_network_is_read_as_its_parametrization(tiny_config):
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    for prediction in ("eps", "x0", "v", "velocity"):
        den = conditional_denoiser(tiny_config, prediction)
        p = den.path.point(300)
        with torch.no_grad():
            pred, out = den(x, p, y), den.output(x, p, y)
        expected = {"eps": pred.eps, "x0": pred.x0, "v": p.alpha * pred.eps - p.sigma * pred.x0, "velocity": pred.eps - pred.x0}[prediction]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # the output means what the parametrization says
        torch.testing.assert_close(pred.x0, x0_from_eps(x, 300, pred.eps, den.path.schedule), atol=1e-4, rtol=1e-4)


def test_in_batches_splits_every_tensor_alike_and_joins_the_parts():
    seen = []

    def fn(a, b, c):
        seen.append((len(a), len(b), c))
        return a + b

    a, b = torch.arange(5.0), torch.arange(5.0) * 10
    assert torch.equal(in_batches(fn, 2, a, b, None), a + b)
    assert seen == [(2, 2, None), (2, 2, None), (1, 1, None)]
    assert torch.equal(in_batches(fn, None, a, b, None), a + b)


def test_a_classifier_at_scale_zero_is_never_run(tiny_config):
    class Refuses(nn.Linear):
        def forward(self, x, t):
            raise AssertionError("the classifier ran at s = 0")

    den, x, y = conditional_denoiser(tiny_config), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        p = den.path.point(500)
        plain = guided(den, y, classifier=Refuses(1, 3), classifier_scale=0.0)(x, p)
        assert torch.equal(plain.eps, guided(den, y)(x, p).eps)
