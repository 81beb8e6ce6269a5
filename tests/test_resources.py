import pytest

from ddpm_lib import resources
from ddpm_lib.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from ddpm_lib.resources import ResourceError, format_bytes, parameter_count, require, require_model
from ddpm_lib.unet import UNet, UNetConfig, count_parameters


def test_bytes_read_as_people_write_them():
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(5 * 2**40) == "5.0 TiB"
    assert format_bytes(784e30) == "7.1e+20 TiB"  # --num 10^30 of MNIST digits: a number, not an overflow


def test_counting_on_the_meta_device_matches_the_built_model_and_allocates_nothing(tiny_config):
    for config in (tiny_config, UNetConfig()):
        assert parameter_count(UNet, config) == count_parameters(UNet(config))
    config = NoisyClassifierConfig(image_size=8, num_classes=3, base_channels=8, channel_mults=(1, 2), num_groups=4)
    assert parameter_count(NoisyClassifier, config) == count_parameters(NoisyClassifier(config))
    huge = UNetConfig(base_channels=4096, channel_mults=(1, 2, 64))  # 8.2e12 parameters: 33 TB, counted in milliseconds
    assert parameter_count(UNet, huge) > 8e12


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(monkeypatch):
    huge = UNetConfig(base_channels=4096, channel_mults=(1, 2, 64))
    with pytest.raises(ResourceError, match=r"run's U-Net has 8.2e\+12 parameters, more than the 1,073,741,824 this library builds"):
        require_model(UNet, huge, 5, "this run's U-Net")
    monkeypatch.setattr(resources, "available_memory", lambda: 10 * 2**20)  # 10 MiB free
    n = parameter_count(UNet, UNetConfig())
    assert require_model(UNet, UNetConfig(), 1, "a U-Net") == n  # 2.7 MiB of weights fit
    with pytest.raises(ResourceError, match=rf"a U-Net \({n:,} parameters, 5 float32 copies\) would need 13.1 MiB of memory; .* 10.0 MiB"):
        require_model(UNet, UNetConfig(), 5, "a U-Net")


def test_require_compares_memory_and_the_disk_beside_the_output(tmp_path, monkeypatch):
    require("a job", memory=1, disk=1, out=tmp_path / "x.png")
    with pytest.raises(ResourceError, match=r"--num 5 would need 1.0 GiB of memory; this machine has 1.0 MiB available"):
        monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
        require("--num 5", memory=2**30)
    monkeypatch.setattr(resources, "free_disk", lambda folder: 2**20)
    with pytest.raises(ResourceError, match=rf"a job would write 2.0 MiB; {tmp_path} has 1.0 MiB free"):
        require("a job", disk=2**21, out=tmp_path / "x.png")


def test_available_memory_is_a_positive_number_of_bytes():
    assert 2**20 < resources.available_memory() < 2**50
