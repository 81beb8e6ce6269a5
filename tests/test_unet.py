import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_lib.checkpoint import config_from_dict
from ddpm_lib.unet import SelfAttention, UNet, UNetConfig, count_parameters, layer_shapes, timestep_embedding


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(),  # MNIST, 1x28x28
        UNetConfig(patch_size=2, base_channels=32, channel_mults=(1, 2)),  # MNIST in 2x2 patches
        UNetConfig(in_channels=3, image_size=32, channel_mults=(1, 2, 2, 2), attention_resolutions=(8,)),  # CIFAR-10
        UNetConfig(in_channels=3, image_size=64, channel_mults=(1, 2, 2, 2), attention_resolutions=(16,)),
        UNetConfig(in_channels=3, image_size=32, patch_size=4, channel_mults=(1, 2), attention_resolutions=(4,)),
    ],
    ids=["1x28x28", "1x28x28-patch2", "3x32x32", "3x64x64", "3x32x32-patch4"],
)
def test_output_shape_equals_input_shape(config):
    model = UNet(config)
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_default_mnist_model_has_the_parameter_count_the_course_quotes():
    assert count_parameters(UNet(UNetConfig())) == 686_769  # notebook 4, the README and checkpoints/README.md say so


def test_time_embedding_at_known_timesteps():
    dim, half = 16, 8
    emb = timestep_embedding(torch.tensor([0, 1, 250]), dim)
    assert emb.shape == (3, dim)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(half), torch.ones(half)]))  # t = 0
    torch.testing.assert_close(emb[1, 0], torch.tensor(math.sin(1.0)))  # w_0 = 1
    torch.testing.assert_close(emb[1, half], torch.tensor(math.cos(1.0)))
    freqs = [10000 ** (-i / half) for i in range(half)]
    expected = [math.sin(250 * w) for w in freqs] + [math.cos(250 * w) for w in freqs]
    torch.testing.assert_close(emb[2], torch.tensor(expected), atol=1e-4, rtol=0)


def test_nearby_timesteps_embed_closer_than_distant_ones():
    emb = timestep_embedding(torch.tensor([500, 501, 900]), 64)
    assert torch.dist(emb[0], emb[1]) < torch.dist(emb[0], emb[2])


def test_the_network_uses_t():
    model = UNet(UNetConfig(dropout=0.0))
    for p in model.parameters():  # zero-initialised output layers make a fresh network ignore t
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_a_tiny_model_overfits_a_batch_of_8_images(tiny_config):
    model = UNet(tiny_config)
    x = torch.randn(8, 1, 8, 8)
    t = torch.randint(0, 1000, (8,))
    target = torch.randn(8, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_patches_are_folded_into_channels_and_unfolded_at_the_end():
    model = UNet(UNetConfig(patch_size=2, base_channels=32, channel_mults=(1, 2)))
    x = torch.randn(2, 1, 28, 28)
    rows = {name: shape for name, shape, _ in layer_shapes(model, x, torch.tensor([5, 6]))}
    assert rows["patchify"] == (2, 4, 14, 14) and rows["stem"] == (2, 32, 14, 14) and rows["head"] == (2, 1, 28, 28)
    patches = model.patchify(x)  # channel 2 i + j holds pixel (i, j) of every 2x2 patch
    assert torch.equal(patches[:, 1], x[:, 0, 0::2, 1::2]) and torch.equal(patches[:, 2], x[:, 0, 1::2, 0::2])
    assert torch.equal(model.head[-1](patches), x)  # the head's last layer undoes the folding exactly


def test_attention_written_out_for_cpu_bf16_equals_the_fused_kernel():
    torch.manual_seed(0)
    attn = SelfAttention(32, heads=4, groups=8)
    torch.nn.init.normal_(attn.out.weight, std=0.1)
    x = torch.randn(3, 32, 7, 7)
    B, C, H, W = x.shape
    q, k, v = attn.qkv(attn.norm(x)).reshape(B, 3, 4, C // 4, H * W).transpose(-1, -2).unbind(dim=1)
    fused = attn.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W))  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        written_out = attn(x).float() - x
    assert (written_out - fused).abs().max() < 0.03 * fused.abs().max()  # equal up to bf16 rounding


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="divisible by 4"):
        UNetConfig(image_size=30)
    with pytest.raises(ValueError, match="divisible by 8"):
        UNetConfig(patch_size=2, channel_mults=(1, 2, 4))  # 28 / 2 = 14 cannot be halved twice
    with pytest.raises(ValueError, match="positive divisor of image_size 28"):
        UNetConfig(patch_size=3, channel_mults=(1,))
    with pytest.raises(ValueError, match=r"valid: \[28, 14, 7\]"):
        UNetConfig(attention_resolutions=(16,))
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig(base_channels=12)
    with pytest.raises(ValueError, match=r"channel_mults must be whole numbers from 1 to 64, got \(1, 0\)"):
        UNetConfig(channel_mults=(1, 0))  # 0 channels once passed the divisibility checks and failed inside a conv
    with pytest.raises(ValueError, match="base_channels must be a whole number from 1 to 4,096, got 0"):
        UNetConfig(base_channels=0)
    for dropout in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            UNetConfig(dropout=dropout)


def test_layer_shapes_follow_the_u_and_count_every_parameter():
    model = UNet(UNetConfig())
    rows = layer_shapes(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    names = [name for name, _, _ in rows]
    assert names[:2] == ["time_mlp", "stem"] and names[-1] == "head" and names.index("mid1") < names.index("up.0")
    shapes = dict((name, shape) for name, shape, _ in rows)
    assert shapes["time_mlp"] == (2, 64) and shapes["stem"] == (2, 16, 28, 28)
    assert shapes["mid2"] == (2, 64, 7, 7) and shapes["head"] == (2, 1, 28, 28)
    assert sum(p for _, _, p in rows) == count_parameters(model)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_labels_condition_the_unet_and_no_label_is_the_extra_class(tiny_config):
    model = UNet(dataclasses.replace(tiny_config, num_classes=10)).eval()
    for p in model.parameters():  # the head starts at zero; give it weights so labels show
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        three, seven = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))
        assert not torch.allclose(three, seven, atol=1e-3)
        assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))  # y=None: the "no label" class
    assert model.label_emb.num_embeddings == 11
    with pytest.raises(ValueError, match="unconditional"):
        UNet(tiny_config)(x, t, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=-1)


def test_configs_saved_before_labels_existed_load_as_unconditional(tiny_config):
    saved = {k: v for k, v in dataclasses.asdict(tiny_config).items() if k != "num_classes"}
    assert config_from_dict(UNetConfig, saved) == tiny_config and tiny_config.num_classes == 0
