import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.diffusion import DiffusionConfig, q_posterior, q_sample
from ddpm_lib.files import OutputPathError
from ddpm_lib.paths import VP, LinearFlow
from ddpm_lib.sampling import SamplerStep, sample_loop
from ddpm_lib.schedules import get_schedule
from ddpm_lib.scrubber import OUTPUT_BUDGET, read_scrubber
from ddpm_lib.solvers import DDPM
from ddpm_lib.unet import UNet
from ddpm_lib.viz import (
    GIF_MAX_MS,
    CurvePanel,
    GuidanceViewer,
    beside,
    caption,
    forward_explorer,
    forward_viewer,
    frame_indices,
    image_grid,
    png_bytes,
    posterior_explorer,
    posterize,
    save_grid,
    save_trajectory_gif,
    schedule_explorer,
    stack,
    to_uint8,
    trajectory_frame,
    trajectory_viewer,
)

SCHEDULE = get_schedule("linear", 1000)


def test_to_uint8_maps_the_pixel_range():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, -7.0, 3.0])).tolist() == [0, 128, 255, 0, 255]


def test_image_grid_shapes():
    gray = image_grid(torch.zeros(16, 1, 28, 28), nrow=4)
    assert gray.shape == (4 * 30 + 2, 4 * 30 + 2) and gray.dtype == np.uint8
    assert image_grid(torch.zeros(6, 3, 8, 8), nrow=3).shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert image_grid(torch.zeros(4, 1, 8, 8), nrow=2, scale=3).shape == (3 * 22, 3 * 22)
    assert image_grid(torch.ones(1, 1, 4, 4), padding=0).min() == 255


def test_save_grid_writes_a_png_that_reads_back(tmp_path):
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    save_grid(x, tmp_path / "g.png", nrow=2)
    assert np.array_equal(iio.imread(tmp_path / "g.png"), image_grid(x, 2))


def test_frame_indices_are_evenly_spread_and_keep_both_ends():
    assert frame_indices(1001, 5) == [0, 250, 500, 750, 1000]
    assert frame_indices(3, 10) == [0, 1, 2]
    assert frame_indices(10, 1) == [9]


@pytest.mark.parametrize("n, frames", [(1001, 60), (51, 40), (12, 12), (5, 3)])
def test_eased_frame_indices_are_distinct_keep_both_ends_and_crowd_toward_the_end(n, frames):
    idx = frame_indices(n, frames, ease=2.0)
    assert len(idx) == min(n, frames) and idx[0] == 0 and idx[-1] == n - 1
    assert all(a < b for a, b in zip(idx, idx[1:], strict=False))
    gaps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
    assert gaps[0] >= gaps[-1]
    assert frame_indices(1001, 5, ease=2.0) == [0, 438, 750, 938, 1000]  # 1000 * (1 - (1 - k/4)^2)
    with pytest.raises(ValueError, match="ease must be >= 1"):
        frame_indices(10, 3, ease=0.5)


def fake_trajectory(n=11, b=4):
    grid = VP(get_schedule("linear", n - 1)).grid()
    return [SamplerStep(i, p, torch.full((b, 1, 8, 8), -1 + 2 * i / (n - 1)), torch.zeros(b, 1, 8, 8)) for i, p in enumerate(grid)]


def test_gif_has_the_requested_frames_size_duration_and_loop(tmp_path):
    steps = fake_trajectory()
    path = save_trajectory_gif(steps, tmp_path / "r.gif", frames=6, duration_ms=50, hold_ms=400, loop=0, scale=3, levels=256)
    frames = iio.imread(path, index=None)
    expected = trajectory_frame(steps[0], 2, 3)
    assert frames.shape[0] == 6 and frames.shape[1:3] == expected.shape
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
        assert im.info["loop"] == 0
    assert durations == [50] * 5 + [400]
    assert np.array_equal(frames[-1][..., 0], trajectory_frame(steps[-1], 2, 3))  # the last frame is the sample
    save_trajectory_gif(steps, tmp_path / "once.gif", frames=3, loop=1, show_x0=False)
    with Image.open(tmp_path / "once.gif") as im:
        assert im.info["loop"] == 1 and im.n_frames == 3


def test_repeated_frames_merge_and_no_frame_outlasts_the_gif_limit(tmp_path):
    steps = fake_trajectory()
    steps = steps[:3] + [steps[3]] * 4  # the end of a trajectory often repeats once posterized
    path = save_trajectory_gif(steps, tmp_path / "r.gif", frames=7, duration_ms=GIF_MAX_MS, hold_ms=0, levels=256)
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations == [GIF_MAX_MS] * 4  # the four repeats as one frame, capped: GIF's delay has 16 bits


def test_a_one_frame_gif_is_the_finished_sample(tmp_path):
    """The probe's case: gif --frames 1 crashed in the GIF writer after all the sampling, and wrote nothing."""
    steps = fake_trajectory()
    for name, trajectory, frames, ms in (("one.gif", steps, 1, 700), ("alike.gif", [steps[-1]] * 5, 5, 4 * 80 + 700)):  # alike: merged
        path = save_trajectory_gif(trajectory, tmp_path / name, frames=frames, duration_ms=80, hold_ms=700, scale=3, levels=256)
        with Image.open(path) as im:
            assert im.n_frames == 1 and im.info["duration"] == ms
        (frame,) = iio.imread(path, index=None)  # (1, H, W, 3)
        assert np.array_equal(frame[..., 0], trajectory_frame(steps[-1], 2, 3))


def test_posterize_keeps_levels_evenly_spaced_grey_values_and_256_keeps_all():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(posterize(image, 256), image)
    values = np.unique(posterize(image, 32))
    assert len(values) == 32 and values[0] == 0 and values[-1] == 255
    assert np.allclose(np.diff(values), 255 / 31, atol=1)
    assert np.abs(posterize(image, 32).astype(int) - image).max() <= 255 / 31 / 2 + 0.5  # the nearest level
    with pytest.raises(ValueError, match="between 2 and 256"):
        posterize(image, 1)


def test_gif_grey_levels_shrink_noisy_frames(tmp_path):
    g = torch.Generator().manual_seed(0)
    grid = VP(get_schedule("linear", 5)).grid()
    steps = [
        SamplerStep(i, p, torch.randn(16, 1, 28, 28, generator=g).clamp(-1, 1), torch.zeros(16, 1, 28, 28)) for i, p in enumerate(grid)
    ]
    full = save_trajectory_gif(steps, tmp_path / "full.gif", levels=256)
    coarse = save_trajectory_gif(steps, tmp_path / "coarse.gif", levels=16)
    assert len(np.unique(iio.imread(coarse, index=None))) <= 16
    assert coarse.stat().st_size < full.stat().st_size
    with pytest.raises(ValueError, match="levels"):
        save_trajectory_gif(steps, tmp_path / "bad.gif", levels=300)
    assert not (tmp_path / "bad.gif").exists()


def test_gif_from_a_live_sampler_needs_its_length(tmp_path, tiny_config):
    steps = sample_loop(guided(Denoiser(UNet(tiny_config), DiffusionConfig(T=10))), (2, 1, 8, 8), DDPM())
    with pytest.raises(ValueError, match="num_steps"):
        save_trajectory_gif(steps, tmp_path / "x.gif")
    save_trajectory_gif(steps, tmp_path / "x.gif", num_steps=11, frames=4)
    assert iio.imread(tmp_path / "x.gif", index=None).shape[0] == 4


def test_gif_to_an_unwritable_path_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        save_trajectory_gif(fake_trajectory(), tmp_path / "missing" / "r.gif")
    (tmp_path / "r.gif").write_bytes(b"precious")
    with pytest.raises(ValueError):
        save_trajectory_gif(fake_trajectory(), tmp_path / "r.gif", frames=0)
    assert [p.name for p in tmp_path.iterdir()] == ["r.gif"] and (tmp_path / "r.gif").read_bytes() == b"precious"


def test_forward_viewer_shows_q_sample_at_the_slider_value():
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    viewer = forward_viewer(x0, SCHEDULE, noise, nrow=4, scale=1)
    assert viewer.slider.min == 0 and viewer.slider.max == 999
    first_png = viewer.image.value
    viewer.slider.value = 300
    assert viewer.t == 300
    assert np.array_equal(viewer.frame, image_grid(q_sample(x0, 300, SCHEDULE, noise), 4))
    assert viewer.image.value != first_png and viewer.image.value[:4] == b"\x89PNG"
    viewer.slider.value = 5000  # out of bounds: the slider clamps it
    assert viewer.slider.value == 999 and viewer.t == 999


def test_trajectory_viewer_shows_the_stored_step_at_the_slider_value():
    steps = fake_trajectory()
    viewer = trajectory_viewer(steps, nrow=2, scale=1)
    assert (viewer.slider.min, viewer.slider.max, viewer.t) == (0, 10, 0)  # by step, from pure noise to the finished samples
    viewer.slider.value = 5
    assert np.array_equal(viewer.frame, trajectory_frame(steps[5], 2, 1))
    viewer.slider.value = 10
    assert np.array_equal(viewer.frame, trajectory_frame(steps[-1], 2, 1))


def test_curve_panel_marker_moves_with_x():
    panel = CurvePanel(np.arange(100), {"a": {"": np.linspace(1, 0, 100)}, "b": {"x": np.zeros(100), "y": np.ones(100)}})
    early, late = panel.render(5), panel.render(90)
    assert early.shape == late.shape == panel.base.shape
    red = np.array([214, 39, 40])

    def red_columns(img):
        return np.unique(np.nonzero((img == red).all(axis=2))[1])

    assert red_columns(early).mean() < red_columns(late).mean()
    assert np.array_equal(panel.render(5), early) and not np.array_equal(early, panel.base)


def test_forward_explorer_shows_q_sample_and_the_noise_at_the_slider_value():
    x0, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    viewer = forward_explorer(x0, SCHEDULE, noise, scale=1)
    viewer.slider.value = 420
    top_row = image_grid(q_sample(x0, 420, SCHEDULE, noise), 3)
    assert np.array_equal(viewer.frame[: top_row.shape[0], : top_row.shape[1], 0], top_row)
    noise_row = image_grid(noise, 3)
    start = top_row.shape[0] + 8
    assert np.array_equal(viewer.frame[start : start + noise_row.shape[0], : noise_row.shape[1], 0], noise_row)


def test_posterior_explorer_shows_x_t_the_posterior_mean_and_a_draw_from_it():
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    viewer = posterior_explorer(x0, SCHEDULE, noise, scale=1)
    viewer.slider.value = 300
    x_t = q_sample(x0, 300, SCHEDULE, noise)
    mean, _ = q_posterior(x0, x_t, 300, SCHEDULE)
    rows = [image_grid(x_t, 2), image_grid(mean, 2)]
    assert np.array_equal(viewer.frame[: rows[0].shape[0], : rows[0].shape[1], 0], rows[0])
    start = rows[0].shape[0] + 8
    assert np.array_equal(viewer.frame[start : start + rows[1].shape[0], : rows[1].shape[1], 0], rows[1])
    assert len(viewer.static_ts) == 4


def test_static_frames_are_captioned_with_what_they_show():
    steps = [SamplerStep(i, p, torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)) for i, p in enumerate(VP(SCHEDULE).grid())]
    viewer = trajectory_viewer(steps, nrow=2)
    assert [steps[i].t for i in viewer.static_ts] == [999, 400, 200, 100, 50, -1]  # the noise, then where the digits form
    assert viewer.label(1000) == "step 1000: the finished samples" and viewer.label(599).startswith("step 599, t = 400")
    flow = [SamplerStep(i, p, torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)) for i, p in enumerate(LinearFlow().grid(50))]
    assert [round(flow[i].point.sigma, 2) for i in trajectory_viewer(flow, nrow=2).static_ts] == [1.0, 0.68, 0.42, 0.26, 0.14, 0.0]
    schedules = {name: get_schedule(name, 100) for name in ("linear", "cosine")}
    assert schedule_explorer(torch.zeros(1, 1, 8, 8), schedules).label(25) == "t = 25: linear, cosine, left to right"
    framed = caption(np.zeros((10, 30), np.uint8), "x")
    assert framed.shape == (32, 30, 3) and (framed[22:] == 0).all()


def test_schedule_explorer_shows_one_image_per_schedule():
    schedules = {name: get_schedule(name, 100) for name in ("linear", "cosine")}
    x0, noise = torch.rand(1, 1, 8, 8) * 2 - 1, torch.randn(1, 1, 8, 8)
    viewer = schedule_explorer(x0, schedules, noise, scale=1)
    viewer.slider.value = 30
    row = image_grid(torch.cat([q_sample(x0, 30, s, noise) for s in schedules.values()]), 2)
    assert np.array_equal(viewer.frame[: row.shape[0], : row.shape[1], 0], row)
    with pytest.raises(ValueError, match="share T"):
        schedule_explorer(x0, {"a": get_schedule("linear", 10), "b": get_schedule("linear", 20)})


def test_viewers_carry_a_static_picture_for_readers_without_a_kernel():
    viewer = forward_viewer(torch.rand(2, 1, 8, 8), SCHEDULE, nrow=2, scale=1)
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    static = iio.imread(read_scrubber(bundle["text/html"]).static_png)
    assert np.array_equal(static, viewer.static_image())
    assert static.shape[0] == 3 * (22 + viewer.frame.shape[0]) + 2 * 16  # t = 999, 499 and 0, each captioned, stacked
    caption_strip = static[:22]
    assert (caption_strip < 100).any() and (caption_strip == 255).mean() > 0.8  # dark text on white: "t = 999"
    assert viewer.t == 0  # drawing the static picture does not move the slider


@pytest.mark.parametrize("make", ["forward", "posterior", "trajectory"])
def test_the_kernel_free_scrubber_shows_what_the_live_slider_shows_at_every_t_it_offers(make, tiny_config):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    if make == "trajectory":
        steps = list(sample_loop(guided(Denoiser(UNet(tiny_config), DiffusionConfig(T=400))), (2, 1, 8, 8), DDPM(), generator=g))
        viewer = trajectory_viewer(steps, nrow=2)
    else:
        viewer = (forward_explorer if make == "forward" else posterior_explorer)(x0, SCHEDULE, scale=1)
    viewer.slider.value = viewer.scrub_ts[len(viewer.scrub_ts) // 3]
    scrubber = read_scrubber(viewer._repr_mimebundle_()["text/html"])
    (ts,) = scrubber.axes.values()
    assert ts[0] == viewer.scrub_ts[0] and ts[-1] == viewer.scrub_ts[-1] and set(ts) <= set(viewer.scrub_ts)
    assert scrubber.image_format == "webp"
    if make == "trajectory":  # crowded toward the finished samples, where the digits form
        assert sum(i >= 300 for i in ts) > len(ts) / 2  # a quarter if evenly spaced
    start = ts[scrubber.start[0]]
    assert abs(start - viewer.slider.value) == min(abs(t - viewer.slider.value) for t in ts)  # it opens where the widget is
    for (i,), frame in scrubber.frames.items():
        viewer.slider.value = ts[i]  # the live widget at the same t
        live = viewer.frame if viewer.frame.ndim == 3 else np.repeat(viewer.frame[..., None], 3, axis=2)  # WebP has no grey mode
        assert np.array_equal(iio.imread(frame, extension=".webp"), live), f"t = {ts[i]}"


def test_the_kernel_free_scrubber_keeps_as_many_frames_as_fit_about_a_megabyte():
    x0 = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1  # noise: the worst case for compression
    viewer = forward_explorer(x0, get_schedule("linear", 1000))
    html = viewer.kernel_free_html()
    assert len(json.dumps(viewer._repr_mimebundle_())) <= OUTPUT_BUDGET
    assert 10 <= len(read_scrubber(html).frames) < 1000
    small = read_scrubber(viewer.kernel_free_html(budget=OUTPUT_BUDGET // 2))
    assert len(small.frames) < len(read_scrubber(html).frames)
    halved = forward_explorer(x0, get_schedule("linear", 1000))
    halved.budget = OUTPUT_BUDGET // 2  # a viewer's own budget, as trajectory_viewer(budget=...) sets it
    assert len(json.dumps(halved._repr_mimebundle_())) <= OUTPUT_BUDGET // 2


def test_beside_and_stack_pad_with_white_and_keep_gray_when_they_can():
    gray, tall, rgb = np.zeros((4, 5), np.uint8), np.zeros((6, 2), np.uint8), np.zeros((4, 3, 3), np.uint8)
    joined = beside(gray, tall, gap=1)
    assert joined.shape == (6, 5 + 1 + 2) and (joined[4:, :5] == 255).all() and (joined[:, 5] == 255).all()
    assert beside(gray, rgb).shape == (4, 5 + 8 + 3, 3)
    assert stack(gray, tall, gap=2).shape == (4 + 2 + 6, 5) and (stack(gray, tall)[-6:, 2:] == 255).all()


def test_guidance_viewer_shows_the_grid_of_the_picked_digit_and_strength():
    g = torch.Generator().manual_seed(0)
    grids = {(d, w): torch.rand(4, 1, 6, 6, generator=g) * 2 - 1 for d in (0, 1, 2) for w in (0.0, 2.0, 8.0)}
    viewer = GuidanceViewer(grids, nrow=2, scale=1, static_digits=(1, 2))
    assert viewer.digits == [0, 1, 2] and viewer.strengths == [0.0, 2.0, 8.0]
    viewer.picker.value, viewer.slider.value = 2, 8.0
    assert np.array_equal(viewer.frame, image_grid(grids[(2, 8.0)], 2, scale=1))
    assert viewer.image.value == png_bytes(viewer.frame)
    static = viewer.static_image()  # three captioned rows, each digits 1 and 2 side by side
    assert static.shape[0] > 3 * viewer.frame.shape[0] and static.shape[1] > 2 * viewer.frame.shape[1]
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    scrubber = read_scrubber(bundle["text/html"])
    assert scrubber.axes == {"digit": [0, 1, 2], "w": [0.0, 2.0, 8.0]} and scrubber.start == (2, 2)  # where the widget is
    assert scrubber.frames[(1, 2)] == viewer.pngs[(1, 8.0)] and scrubber.image_format == "png"
    assert np.array_equal(iio.imread(scrubber.static_png), static)
    with pytest.raises(ValueError, match="over the budget"):
        viewer.kernel_free_html(budget=1_000)
