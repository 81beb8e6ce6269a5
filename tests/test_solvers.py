import dataclasses
from pathlib import Path

import pytest
import torch

from ddpm_lib.denoiser import ClassifierFree, ClassifierGuided, Clipped, Denoiser
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from ddpm_lib.sampling import sample, sample_loop
from ddpm_lib.solvers import DDIM, DDPM
from ddpm_lib.unet import UNet, UNetConfig

# The sampler before the core was rebuilt (issue 30) drew tests/data/sampling_reference.pt from these
# models and settings; the same seeds must give the same images.
REFERENCE = torch.load(Path(__file__).parent / "data" / "sampling_reference.pt", weights_only=True)
MINI = UNetConfig(image_size=4, base_channels=4, channel_mults=(1, 2), attention_resolutions=(2,), num_groups=2, num_heads=1)
CLASSIFIER = NoisyClassifierConfig(image_size=4, num_classes=3, base_channels=4, channel_mults=(1, 2), num_groups=2)
SHAPE = (5, 1, 4, 4)
LABELS = torch.tensor([0, 1, 2, 1, 0])


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.15) -> torch.nn.Module:
    """``module`` with every weight drawn from N(0, scale^2) by its own generator: the same on any machine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


MODELS = {
    "uncond": randomized(UNet(MINI), 0),
    "cond": randomized(UNet(dataclasses.replace(MINI, num_classes=3)), 1),
    "classifier": randomized(NoisyClassifier(CLASSIFIER), 2),
}


def denoiser_for(model="uncond", prediction="eps", clip=True, labels=None, guidance=0.0, classifier_scale=None, batch_size=None):
    den = Denoiser(MODELS[model], DiffusionConfig(T=20, prediction=prediction), batch_size=batch_size)
    if labels is not None and MODELS[model].config.num_classes:
        den = ClassifierFree(den, labels, guidance)
    if classifier_scale is not None:
        den = ClassifierGuided(den, MODELS["classifier"], labels, classifier_scale)
    return Clipped(den) if clip else den


CASES = {  # name in the reference file: (denoiser arguments, solver)
    "ddpm": ({}, DDPM()),
    "ddpm_beta": ({}, DDPM(variance="beta")),
    "ddpm_noclip": ({"clip": False}, DDPM()),
    "ddpm_v": ({"prediction": "v"}, DDPM()),
    "ddpm_x0": ({"prediction": "x0"}, DDPM()),
    "ddim_20": ({}, DDIM()),
    "ddim_7": ({}, DDIM(7)),
    "ddim_7_eta05": ({}, DDIM(7, eta=0.5)),
    "ddim_7_noclip": ({"clip": False}, DDIM(7)),
    "ddim_7_v": ({"prediction": "v"}, DDIM(7)),
    "ddim_7_x0": ({"prediction": "x0"}, DDIM(7)),
    "ddim_7_x0_eta05": ({"prediction": "x0"}, DDIM(7, eta=0.5)),
    "ddim_7_chunked": ({"batch_size": 2}, DDIM(7)),
    "cfg_ddim_7_w2": ({"model": "cond", "labels": LABELS, "guidance": 2.0}, DDIM(7)),
    "cfg_ddim_7_w2_noclip": ({"model": "cond", "labels": LABELS, "guidance": 2.0, "clip": False}, DDIM(7)),
    "cfg_ddpm_w2": ({"model": "cond", "labels": LABELS, "guidance": 2.0}, DDPM()),
    "cond_ddim_7_w0": ({"model": "cond", "labels": LABELS}, DDIM(7)),
    "uncond_of_cond_ddim_7": ({"model": "cond"}, DDIM(7)),
    "classifier_ddim_7_s3": ({"labels": LABELS, "classifier_scale": 3.0}, DDIM(7)),
    "classifier_ddim_7_s3_noclip": ({"labels": LABELS, "classifier_scale": 3.0, "clip": False}, DDIM(7)),
}
SEEDS = {name: 100 + i for i, name in enumerate(REFERENCE["outputs"])}  # the reference's seeds, in its order


@pytest.mark.parametrize("name", CASES)
def test_the_same_seed_gives_the_same_images_as_the_sampler_before_the_rebuild(name):
    kwargs, solver = CASES[name]
    x = sample(denoiser_for(**kwargs), SHAPE, solver, generator=torch.Generator().manual_seed(SEEDS[name]))
    expected = REFERENCE["outputs"][name]
    assert torch.allclose(x, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), (x - expected).abs().max()


def test_the_trajectory_is_the_same_step_by_step():
    steps = list(sample_loop(denoiser_for(clip=False), SHAPE, DDIM(7), generator=torch.Generator().manual_seed(99)))
    ref = REFERENCE["trajectory"]
    assert [s.t for s in steps] == ref["t"]
    for name in ("x_t", "x0"):
        got = torch.stack([getattr(s, name) for s in steps])
        assert torch.allclose(got, ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max().item())
