import pytest

from ddpm_lib.course import QUICK_MODE_VARIABLE, quick_mode, run_sizes


@pytest.mark.parametrize(("value", "quick"), [("1", True), ("0", False), ("", False), (None, False)])
def test_quick_mode_is_the_one_switch_and_run_sizes_follow_it(monkeypatch, value, quick):
    if value is None:
        monkeypatch.delenv(QUICK_MODE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(QUICK_MODE_VARIABLE, value)
    assert quick_mode() is quick
    assert run_sizes(full=(1000, "cache.json"), quick=(10, None)) == ((10, None) if quick else (1000, "cache.json"))
