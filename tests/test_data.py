"""Tests for diffusers_pd.data: offline data sets, image folders, pixel transforms and validation errors."""

import gzip
import os
import pickle
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_pd.data import (
    BUILTIN_DATASETS,
    FASHION_MNIST_ROOT,
    collate_pixel_values,
    find_image_column,
    image_transform,
    load_digits_dataset,
    load_fashion_mnist,
    load_image_dataset,
    preprocess_batch_fn,
    validate_image_dataset,
)


def to_unit_range(uint8_array: np.ndarray) -> torch.Tensor:
    """Reference scaling, written as torchvision's ToTensor + Normalize(0.5, 0.5): (x / 255 - 0.5) / 0.5."""
    return torch.from_numpy((uint8_array.astype(np.float64) / 255.0 - 0.5) / 0.5)


def raw_idx_images(name: str) -> np.ndarray:
    """Independent reader: skip the 16-byte idx3 header of a Fashion-MNIST image file."""
    with gzip.open(os.path.join(FASHION_MNIST_ROOT, name), "rb") as f:
        return np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def fashion_train():
    return load_fashion_mnist("train")


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 3 RGB and 2 RGBA PNGs of random pixels; returns (folder, {file name: RGB array})."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    expected = {}
    for i, mode in enumerate(["RGB", "RGB", "RGB", "RGBA", "RGBA"]):
        pixels = rng.integers(0, 256, size=(10, 14, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")
        expected[f"{i}.png"] = pixels[..., :3]
    return folder, expected


# ----------------------------------------------------------------------------------------------
# Built-in data sets
# ----------------------------------------------------------------------------------------------


def test_digits_count_labels_and_grey_levels(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert len(digits) == 1797
    assert isinstance(digits.features["image"], datasets.Image)
    assert np.array_equal(np.array(digits["label"]), reference.target)
    transform = image_transform(resolution=8, num_channels=1)
    levels = reference.images  # 0..16
    for index in random.Random(1).sample(range(1797), 20) + [0]:
        image = digits[index]["image"]
        assert image.mode == "L" and image.size == (8, 8)
        x = transform(image)[0].double()
        source = torch.from_numpy(levels[index])
        assert torch.all(x[source == 0] == -1.0) and torch.all(x[source == 16] == 1.0)
        assert torch.allclose(x, source / 8.0 - 1.0, rtol=0, atol=1.0 / 255.0 + 1e-6)  # to the nearest 0..255 level
    values = np.stack([np.asarray(digits[i]["image"]) for i in range(50)])
    assert values.min() == 0 and values.max() == 255


def test_builtins_through_load_image_dataset(digits):
    dataset, column = load_image_dataset(dataset_name="digits")
    assert column == "image" and len(dataset) == len(digits)
    assert BUILTIN_DATASETS == ("digits", "fashion_mnist")


def test_fashion_mnist_package_is_installed():
    # CI must install `dataset-fashion-mnist`: its absence is a failure, not a skip.
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"]:
        assert os.path.isfile(os.path.join(FASHION_MNIST_ROOT, name)), "apt-get install -y dataset-fashion-mnist"


def test_fashion_mnist_train_counts_and_balanced_labels(fashion_train):
    assert len(fashion_train) == 60000
    assert fashion_train.features["label"].num_classes == 10
    assert np.array_equal(np.bincount(fashion_train["label"], minlength=10), np.full(10, 6000))


def test_fashion_mnist_test_split():
    dataset, column = load_image_dataset(dataset_name="fashion_mnist", split="test")
    assert column == "image" and len(dataset) == 10000
    assert np.array_equal(np.bincount(dataset["label"], minlength=10), np.full(10, 1000))
    raw = raw_idx_images("t10k-images-idx3-ubyte.gz")
    assert np.array_equal(np.asarray(dataset[9999]["image"]), raw[9999])


def test_fashion_mnist_pixels_equal_raw_idx_bytes(fashion_train):
    raw = raw_idx_images("train-images-idx3-ubyte.gz")
    transform = image_transform(resolution=28, num_channels=1)
    for index in random.Random(2).sample(range(60000), 8) + [0, 59999]:
        x = transform(fashion_train[index]["image"])
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
        assert torch.allclose(x[0].double(), to_unit_range(raw[index]), atol=1e-6)
    assert raw[0].std() > 0


def test_fashion_mnist_missing_files_name_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=str(tmp_path))


@pytest.mark.parametrize("name, split, available", [("digits", "test", "'train'"), ("fashion_mnist", "val", "'test'")])
def test_unknown_builtin_split_names_available_splits(name, split, available):
    with pytest.raises(ValueError, match=f"available splits: .*{available}"):
        load_image_dataset(dataset_name=name, split=split)


# ----------------------------------------------------------------------------------------------
# Image folders and column choice
# ----------------------------------------------------------------------------------------------


def test_imagefolder_loads_rgb_and_rgba(image_folder, tmp_path):
    folder, expected = image_folder
    dataset, column = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert column == "image" and len(dataset) == len(expected)
    transform = image_transform(resolution=10, num_channels=3)
    seen = set()
    for example in dataset:
        name = os.path.basename(example["image"].filename)
        x = transform(example["image"])
        assert x.shape == (3, 10, 10)
        center = expected[name][:, 2:12]  # 14 wide -> crop columns 2..11; alpha is dropped
        assert torch.allclose(x.double(), to_unit_range(center).permute(2, 0, 1), atol=1e-6)
        seen.add(name)
    assert seen == set(expected)


def test_imagefolder_unknown_split_names_available_splits(image_folder, tmp_path):
    folder, _ = image_folder
    with pytest.raises(ValueError, match="'train'"):
        load_image_dataset(train_data_dir=str(folder), split="test", cache_dir=str(tmp_path / "cache"))


def test_named_image_column_must_exist(image_folder, tmp_path):
    folder, _ = image_folder
    with pytest.raises(ValueError, match=r"'pixels' not found; columns are \['image'\].*--image_column"):
        load_image_dataset(train_data_dir=str(folder), image_column="pixels", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("kwargs", [{}, {"dataset_name": "digits", "train_data_dir": "/tmp"}])
def test_exactly_one_source(kwargs):
    with pytest.raises(ValueError, match="exactly one of `--dataset_name`.*`--train_data_dir`"):
        load_image_dataset(**kwargs)


def test_builtin_rejects_config_name():
    with pytest.raises(ValueError, match="drop `--dataset_config_name`"):
        load_image_dataset(dataset_name="digits", dataset_config_name="default")


def test_find_image_column_prefers_names_then_image_feature():
    picture = Image.new("L", (4, 4), 7)
    features = datasets.Features({"caption": datasets.Value("string"), "pic": datasets.Image()})
    by_feature = datasets.Dataset.from_dict({"caption": ["a"], "pic": [picture]}, features=features)
    assert find_image_column(by_feature) == "pic"
    by_name = datasets.Dataset.from_dict({"pic": [picture], "img": [picture]})
    assert find_image_column(by_name) == "img"
    no_image = datasets.Dataset.from_dict({"caption": ["a"], "label": [1]})
    with pytest.raises(ValueError, match=r"no image column found; columns are \['caption', 'label'\].*--image_column"):
        find_image_column(no_image)


# ----------------------------------------------------------------------------------------------
# Pixel transforms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(12, 8), (8, 12)])
def test_center_crop_keeps_the_center_without_resampling(size):
    width, height = size
    rng = np.random.default_rng(3)
    center = rng.integers(1, 255, size=(8, 8), dtype=np.uint8)
    pixels = np.zeros((height, width), dtype=np.uint8)  # border 0, center region random
    top, left = (height - 8) // 2, (width - 8) // 2
    pixels[top : top + 8, left : left + 8] = center
    x = image_transform(resolution=8, num_channels=1)(Image.fromarray(pixels))
    assert torch.allclose(x[0].double(), to_unit_range(center), atol=1e-6)


def test_center_crop_after_resize_of_wide_image():
    pixels = np.zeros((32, 96, 3), dtype=np.uint8)  # 96 x 32 -> resized to 24 x 8, center crop 8 x 8
    pixels[:, 24:72] = (200, 100, 50)
    x = image_transform(resolution=8, num_channels=3)(Image.fromarray(pixels))
    assert x.shape == (3, 8, 8)
    expected = to_unit_range(np.array([200, 100, 50], dtype=np.uint8)).float()
    assert torch.allclose(x, expected[:, None, None].expand(3, 8, 8), atol=1e-6)


def test_random_crop_is_a_window_and_seeded():
    pixels = np.random.default_rng(4).integers(0, 256, size=(8, 12), dtype=np.uint8)
    windows = [to_unit_range(pixels[:, left : left + 8]).float() for left in range(5)]
    transform = image_transform(resolution=8, num_channels=1, center_crop=False, rng=random.Random(5))
    lefts = []
    for _ in range(30):
        x = transform(Image.fromarray(pixels))[0]
        matches = [left for left, window in enumerate(windows) if torch.allclose(x, window, atol=1e-6)]
        assert len(matches) == 1
        lefts.append(matches[0])
    assert len(set(lefts)) > 2
    replay = image_transform(resolution=8, num_channels=1, center_crop=False, rng=random.Random(5))
    assert all(torch.allclose(replay(Image.fromarray(pixels))[0], windows[left], atol=1e-6) for left in lefts)


def test_random_flip_flips_some_and_is_reproducible():
    pixels = np.random.default_rng(6).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    plain = to_unit_range(pixels).permute(2, 0, 1).float()
    mirror = torch.flip(plain, dims=[2])
    assert not torch.equal(plain, mirror)

    def flips(seed):
        random.seed(seed)  # default source: the global `random`, as seeded by accelerate's set_seed
        transform = image_transform(resolution=6, num_channels=3, random_flip=True)
        outputs = [transform(image) for _ in range(40)]
        for x in outputs:
            assert torch.allclose(x, plain, atol=1e-6) or torch.allclose(x, mirror, atol=1e-6)
        return [bool(torch.allclose(x, mirror, atol=1e-6)) for x in outputs]

    first = flips(7)
    assert 5 < sum(first) < 35
    assert flips(7) == first
    no_flip = image_transform(resolution=6, num_channels=3)
    assert all(torch.allclose(no_flip(image), plain, atol=1e-6) for _ in range(10))


def test_grey_to_three_channels_repeats_the_channel():
    pixels = np.random.default_rng(8).integers(0, 256, size=(5, 5), dtype=np.uint8)
    x = image_transform(resolution=5, num_channels=3)(Image.fromarray(pixels, mode="L"))
    assert x.shape == (3, 5, 5)
    for channel in range(3):
        assert torch.allclose(x[channel].double(), to_unit_range(pixels), atol=1e-6)


def test_rgb_to_one_channel_is_pil_luma():
    pixels = np.random.default_rng(9).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    x = image_transform(resolution=5, num_channels=1)(Image.fromarray(pixels))
    luma = np.asarray(Image.fromarray(pixels).convert("L"))
    assert torch.allclose(x[0].double(), to_unit_range(luma), atol=1e-6)


def test_sixteen_bit_and_palette_modes():
    sixteen = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    x = image_transform(resolution=1, num_channels=1, center_crop=True)(sixteen)  # 3 x 1 -> center pixel
    assert x.item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    full = image_transform(resolution=1, num_channels=1)(Image.fromarray(np.full((1, 1), 65535, np.uint16)))
    assert full.item() == 1.0
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    x = image_transform(resolution=2, num_channels=3)(palette)
    assert torch.all(x[0] == 1.0) and torch.all(x[1:] == -1.0)


@pytest.mark.parametrize("num_channels", [2, 4])
def test_unsupported_channel_count(num_channels):
    with pytest.raises(ValueError, match="latent-space UNets need the Stable Diffusion script.*1- or 3-channel"):
        image_transform(resolution=8, num_channels=num_channels)


def test_set_transform_and_collate_feed_a_dataloader(digits):
    subset = digits.select(range(10))
    batch_fn = preprocess_batch_fn("image", resolution=8, num_channels=3)
    subset.set_transform(pickle.loads(pickle.dumps(batch_fn)))  # picklable for DataLoader workers
    loader = torch.utils.data.DataLoader(subset, batch_size=4, collate_fn=collate_pixel_values)
    batch = next(iter(loader))["pixel_values"]
    assert batch.shape == (4, 3, 8, 8) and batch.dtype == torch.float32 and batch.is_contiguous()
    transform = image_transform(resolution=8, num_channels=3)
    plain = digits.select(range(4))
    assert torch.equal(batch, torch.stack([transform(example["image"]) for example in plain]))
    validate_image_dataset(subset, "image", num_channels=3, resolution=8)  # works under a set transform


# ----------------------------------------------------------------------------------------------
# validate_image_dataset errors
# ----------------------------------------------------------------------------------------------


def test_validate_accepts_builtin(digits):
    validate_image_dataset(digits, "image", num_channels=1, resolution=16)


def test_validate_rejects_empty_dataset(digits):
    with pytest.raises(ValueError, match="data set is empty: check `--dataset_name`"):
        validate_image_dataset(digits.select([]), "image", num_channels=1, resolution=8)


@pytest.mark.parametrize("column, type_name", [("caption", "str"), ("label", "int")])
def test_validate_rejects_non_image_column(column, type_name):
    dataset = datasets.Dataset.from_dict({"caption": ["a cat"], "label": [3]})
    with pytest.raises(ValueError, match=f"'{column}' holds {type_name} values, not images.*--image_column"):
        validate_image_dataset(dataset, column, num_channels=3, resolution=8)


def test_validate_rejects_missing_column(digits):
    with pytest.raises(ValueError, match="'img' not found.*--image_column"):
        validate_image_dataset(digits, "img", num_channels=1, resolution=8)


def test_validate_rejects_undecodable_image():
    features = datasets.Features({"image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}]}, features=features)
    with pytest.raises(ValueError, match="cannot be decoded as an image"):
        validate_image_dataset(dataset, "image", num_channels=3, resolution=8)


def test_validate_rejects_channel_count(digits):
    with pytest.raises(ValueError, match="1- or 3-channel UNets"):
        validate_image_dataset(digits, "image", num_channels=4, resolution=8)
