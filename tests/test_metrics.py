import math

import pytest
import torch
from torch import nn

from ddpm_lib.metrics import (
    CONFIDENCE,
    UNIFORM_ENTROPY,
    GaussianStats,
    Quality,
    class_entropy,
    frechet_distance,
    gaussian_stats,
    nearest_neighbours,
    real_data_floor,
    score,
    target_misses,
)


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_of_2x2_gaussians_matches_the_closed_form():
    # For 2x2 matrices, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); S_a and S_b do not commute here.
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    s_a, s_b = random_spd(2, 0), random_spd(2, 1)
    assert not torch.allclose(s_a @ s_b, s_b @ s_a)
    m = s_a @ s_b
    tr_sqrt = math.sqrt(m.trace() + 2 * math.sqrt(torch.det(m)))
    expected = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    assert frechet_distance(GaussianStats(mu_a, s_a), GaussianStats(mu_b, s_b)) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_mean_gap_plus_std_gap():
    mu_a, mu_b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    std_a, std_b = torch.rand(5, dtype=torch.float64) + 0.5, torch.rand(5, dtype=torch.float64) + 0.5
    expected = (mu_a - mu_b).square().sum() + (std_a - std_b).square().sum()
    fd = frechet_distance(GaussianStats(mu_a, torch.diag(std_a**2)), GaussianStats(mu_b, torch.diag(std_b**2)))
    assert fd == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_is_zero_for_itself_symmetric_and_positive():
    a = GaussianStats(torch.randn(16, dtype=torch.float64), random_spd(16, 2))
    b = GaussianStats(torch.randn(16, dtype=torch.float64), random_spd(16, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0


def test_gaussian_stats_recover_mean_and_covariance():
    cov = random_spd(3, 4)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(mu, cov).sample((200_000,))
    stats = gaussian_stats(x.float())
    assert stats.mu.dtype == stats.sigma.dtype == torch.float64
    torch.testing.assert_close(stats.mu, mu, atol=0.03, rtol=0)
    torch.testing.assert_close(stats.sigma, cov, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(x[:1])


def test_class_entropy_of_known_histograms():
    assert class_entropy(torch.full((10,), 7)) == pytest.approx(UNIFORM_ENTROPY)
    assert class_entropy(torch.tensor([0, 5, 0, 0, 0, 0, 0, 0, 0, 0])) == 0
    assert class_entropy(torch.tensor([1, 1, 2, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)))


class StubClassifier(nn.Module):
    """Features: the first 4 pixels of each image. Logits: 10 * pixel 0 for class 3, 0 for the others."""

    def features(self, x):
        return x.flatten(1)[:, :4]

    def head(self, f):
        logits = torch.zeros(len(f), 10)
        logits[:, 3] = 10 * f[:, 0]
        return logits


def test_score_counts_confident_images_classes_and_compares_features():
    images = -torch.ones(6, 1, 28, 28)
    images[:3, 0, 0, 0] = 1.0  # p(class 3) = e^10 / (e^10 + 9) > 0.99: confident
    torch.manual_seed(0)
    images[:, 0, 0, 1:4] = torch.randn(6, 3)
    reference = gaussian_stats(images.flatten(1)[:, :4])
    q = score(StubClassifier(), images, reference)
    assert q.n == 6 and q.counts == (3, 0, 0, 3, 0, 0, 0, 0, 0, 0)  # the other three tie at 1/10: argmax picks class 0
    assert q.confident == pytest.approx(0.5) and q.entropy == pytest.approx(math.log(2))
    assert q.frechet == pytest.approx(0, abs=1e-9)  # scored against their own features
    assert CONFIDENCE == 0.9
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        score(StubClassifier(), torch.zeros(2, 3, 32, 32), reference)


def test_real_data_floor_draws_n_distinct_images_reproducibly():
    images = torch.randn(50, 1, 28, 28)
    reference = gaussian_stats(images.flatten(1)[:, :4])
    a, b = (real_data_floor(StubClassifier(), images, reference, n=20, seed=1) for _ in range(2))
    assert a == b and a.n == 20
    assert real_data_floor(StubClassifier(), images, reference, n=20, seed=2) != a
    with pytest.raises(ValueError, match="needs 60 training images"):
        real_data_floor(StubClassifier(), images, reference, n=60)


def test_target_misses_names_each_missed_target():
    floor = Quality(1000, frechet=1.0, confident=0.99, entropy=2.3, counts=(100,) * 10)
    good = Quality(1000, frechet=3.0, confident=0.9, entropy=2.25, counts=(100,) * 10)
    assert target_misses(good, floor) == []
    bad = Quality(1000, frechet=3.1, confident=0.89, entropy=2.2, counts=(100,) * 10)
    misses = target_misses(bad, floor)
    assert len(misses) == 3 and "Frechet" in misses[0] and "confident" in misses[1] and "entropy" in misses[2]


def test_nearest_neighbours_finds_planted_copies_and_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    references = torch.rand(300, 1, 4, 4, generator=g) * 2 - 1
    images = torch.rand(20, 1, 4, 4, generator=g) * 2 - 1
    images[5] = references[123]  # an exact copy
    images[9] = references[7] + 0.01  # a near copy, 0.01 off in each of 16 pixels
    distances, indices = nearest_neighbours(images, references, chunk=6)  # chunks that do not divide 20
    brute = (images[:, None] - references[None]).flatten(2).norm(dim=2)  # (20, 300)
    torch.testing.assert_close(distances, brute.min(dim=1).values.double())
    assert torch.equal(indices, brute.argmin(dim=1))
    assert indices[5] == 123 and distances[5] < 1e-6
    assert indices[9] == 7 and distances[9] == pytest.approx(0.04, abs=1e-5)  # sqrt(16 * 0.01^2)


def test_nearest_neighbours_rejects_different_image_shapes():
    with pytest.raises(ValueError, match="same image shape"):
        nearest_neighbours(torch.zeros(2, 1, 28, 28), torch.zeros(5, 1, 32, 32))
