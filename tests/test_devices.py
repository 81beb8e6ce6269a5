from pathlib import Path

import pytest
import torch

from ddpm_lib import devices
from ddpm_lib.devices import default_device, device_name, fast_bf16, resolve_device, use_bf16


def test_device_name_gives_the_cpu_model_and_thread_count():
    name = device_name("cpu")
    assert name.endswith(f", {torch.get_num_threads()} threads")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the model name of its first processor
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert name.startswith(model)


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [("flags : fpu avx512f avx512_bf16 sse", True), ("flags : fpu amx_bf16 sse", True), ("flags : fpu avx512f sse", False)],
)
def test_bf16_pays_only_on_cpus_with_bf16_instructions(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(devices.Path, "read_text", lambda self: cpuinfo)
    assert fast_bf16(torch.device("cpu")) is expected
    assert use_bf16("auto", torch.device("cpu")) is expected
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("fp32", torch.device("cpu"))


def test_devices_are_checked_before_any_work():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == default_device()
    with pytest.raises(ValueError, match="unknown device 'foo'; valid: cpu, cuda"):
        resolve_device("foo")
    with pytest.raises(ValueError, match="device 'meta' is not supported; valid: cpu, cuda, cuda:N, mps"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is unavailable: this machine has no usable CUDA GPU"):
            resolve_device("cuda")
