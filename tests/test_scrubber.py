import base64
import json

import pytest

from ddpm_lib.scrubber import encoded_size, fit_frames, read_scrubber, scrubber_html

STATIC = b"\x89PNG static"


def test_a_scrubber_reads_back_what_it_was_given():
    axes = {"digit": [0, 1, 2], "w": [0.0, 0.5]}
    frames = {(i, j): f"frame {i} {j}".encode() for i in range(3) for j in range(2)}
    html = scrubber_html(axes, frames, (2, 1), STATIC, "a static picture", image_format="png")
    back = read_scrubber(html)
    assert back.axes == axes and back.frames == frames and back.start == (2, 1)
    assert back.image_format == "png" and back.static_png == STATIC
    assert html.count("<script") == 2 and 'class="ddpm-static"' in html  # the data, the script; the fallback it removes


def test_frames_are_stored_row_major_with_the_last_axis_fastest():
    frames = {(i, j): bytes([i, j]) for i in range(2) for j in range(3)}
    html = scrubber_html({"a": [0, 1], "b": [5, 6, 7]}, frames, (0, 0), STATIC, "x")
    data = json.loads(html.split('class="ddpm-frames">')[1].split("</script>")[0])
    assert [base64.b64decode(f) for f in data["frames"]] == [
        bytes([0, 0]),
        bytes([0, 1]),
        bytes([0, 2]),
        bytes([1, 0]),
        bytes([1, 1]),
        bytes([1, 2]),
    ]


def test_nothing_in_the_data_can_close_its_script_element_or_escape_the_caption():
    html = scrubber_html({"t</script><b>": [1]}, {(0,): b"x"}, (0,), STATIC, 'say "<hi>"')
    assert html.count("</script>") == 2 and "<b>" not in html and "&lt;hi&gt;" in html
    assert read_scrubber(html).axes == {"t</script><b>": [1]}


def test_bad_scrubbers_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="missing for 1 index"):
        scrubber_html({"t": [0, 1]}, {(0,): b"x"}, (0,), STATIC, "x")
    with pytest.raises(ValueError, match="start must be"):
        scrubber_html({"t": [0, 1]}, {(0,): b"x", (1,): b"y"}, (2,), STATIC, "x")
    with pytest.raises(ValueError, match="at least one value"):
        scrubber_html({"t": []}, {}, (0,), STATIC, "x")
    with pytest.raises(ValueError, match="'webp', 'png'"):
        scrubber_html({"t": [0]}, {(0,): b"x"}, (0,), STATIC, "x", image_format="gif")
    with pytest.raises(ValueError, match="no kernel-free scrubber"):
        read_scrubber("<p>nothing here</p>")


def test_fit_frames_keeps_evenly_spaced_frames_within_the_budget():
    calls = []

    def encode(t):
        calls.append(t)
        return bytes(300)  # 400 characters of base64

    frames = fit_frames(list(range(1000)), encode, budget=10_000, most=201)
    ts = list(frames)
    assert len(ts) == 25 and ts[0] == 0 and ts[-1] == 999  # 25 * 400 = 10,000
    steps = {b - a for a, b in zip(ts, ts[1:], strict=False)}
    assert steps <= {41, 42, 43}  # evenly spaced, to rounding
    assert sum(encoded_size(len(f)) for f in frames.values()) <= 10_000
    assert len(calls) == len(set(calls))  # every frame encoded once
    assert list(fit_frames(list(range(5)), encode, budget=10**9, most=201)) == [0, 1, 2, 3, 4]  # room for all
    assert len(fit_frames(list(range(1000)), encode, budget=10**9, most=11)) == 11


def test_fit_frames_shrinks_when_later_frames_are_bigger_than_the_probe_and_says_when_nothing_fits():
    frames = fit_frames(list(range(100)), lambda t: bytes(30 if t < 90 else 3000), budget=20_000, most=201)
    assert sum(encoded_size(len(f)) for f in frames.values()) <= 20_000 and 99 in frames
    with pytest.raises(ValueError, match="over the budget"):
        fit_frames(list(range(10)), lambda t: bytes(3000), budget=5_000, most=201)


def test_encoded_size_is_base64_length():
    assert [encoded_size(n) for n in (0, 1, 2, 3, 4)] == [len(base64.b64encode(bytes(n))) for n in (0, 1, 2, 3, 4)]
