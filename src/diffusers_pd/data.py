"""Training data: image data sets (offline built-ins, Hub, image folders) and their pixel transforms.

Every data set comes back as a `datasets.Dataset` with a `datasets.Image` column; `image_transform`
turns one PIL image into the float32 tensor a UNet trains on, in [-1, 1], exactly as diffusers'
`train_unconditional.py` does with torchvision (Resize bilinear, CenterCrop/RandomCrop, RandomHorizontalFlip,
ToTensor, Normalize(0.5, 0.5)), but with PIL and numpy only.

Notation:
    x_uint8 in {0..255}  ->  x = x_uint8 / 127.5 - 1  in [-1, 1]
"""

import gzip
import os
import random
from typing import Iterator, List, Optional

import datasets
import numpy as np
import torch
from PIL import Image

BUILTIN_DATASETS = ("digits", "fashion_mnist")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
BUILTIN_SPLITS = {"digits": ("train",), "fashion_mnist": tuple(FASHION_MNIST_FILES)}

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
IMAGE_COLUMN_NAMES = ("image", "img")


# ----------------------------------------------------------------------------------------------
# Built-in offline data sets
# ----------------------------------------------------------------------------------------------


def _image_features(class_names) -> datasets.Features:
    """Features {"image": Image, "label": ClassLabel(class_names)} shared by the built-ins."""
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})


def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's 1797 8x8 digits as "L" images, grey levels 0..16 mapped linearly to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    columns = {"image": list(pixels), "label": digits.target.astype(np.int64).tolist()}
    return datasets.Dataset.from_dict(columns, features=_image_features(str(d) for d in range(10)))


def _check_split(name: str, split: str) -> None:
    """Raise a ValueError naming the available splits when a built-in lacks `split`."""
    available = BUILTIN_SPLITS[name]
    if split not in available:
        raise ValueError(f"built-in data set {name!r} has no split {split!r}; available splits: {list(available)}")


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped idx file (big-endian int32 header: magic, then one size per dimension) into uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    shape = tuple(int(n) for n in header[1:])
    offset = 4 * (1 + ndim)
    if int(header[0]) != magic or len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path} is not a valid idx file (magic {int(header[0])}, expected {magic}); reinstall it")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT) -> datasets.Dataset:
    """Fashion-MNIST (60000 train / 10000 test, 28x28 "L") from the idx files of Debian's `dataset-fashion-mnist`."""
    _check_split("fashion_mnist", split)
    paths = [os.path.join(root, name) for name in FASHION_MNIST_FILES[split]]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file {missing[0]} not found: install it with `apt-get install -y dataset-fashion-mnist`"
        )
    images = _read_idx(paths[0], IDX_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(paths[1], IDX_LABELS_MAGIC, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels; reinstall it")
    columns = {"image": list(images), "label": labels.astype(np.int64).tolist()}
    return datasets.Dataset.from_dict(columns, features=_image_features(FASHION_MNIST_CLASSES))


def _load_builtin(name: str, split: str) -> datasets.Dataset:
    """Load one of BUILTIN_DATASETS (no network)."""
    _check_split(name, split)
    if name == "digits":
        return load_digits_dataset()
    return load_fashion_mnist(split)


# ----------------------------------------------------------------------------------------------
# Any image data set
# ----------------------------------------------------------------------------------------------


def find_image_column(dataset: datasets.Dataset, image_column: Optional[str] = None) -> str:
    """Return `image_column` if present, else "image"/"img", else the first `datasets.Image` column."""
    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(
                f"image column {image_column!r} not found; columns are {columns}: pass one with `--image_column`"
            )
        return image_column
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"no image column found; columns are {columns}: name the image column with `--image_column`")


def load_image_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    split: str = "train",
    image_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> tuple[datasets.Dataset, str]:
    """Return (dataset, image column) from a built-in name, a Hub/`datasets` name, or an image folder."""
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "pass exactly one of `--dataset_name` (built-in or Hub data set) or `--train_data_dir` (image folder)"
        )
    if dataset_name in BUILTIN_DATASETS:
        if dataset_config_name is not None:
            raise ValueError(f"built-in data set {dataset_name!r} has no configs; drop `--dataset_config_name`")
        dataset = _load_builtin(dataset_name, split)
    elif dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
    return dataset, find_image_column(dataset, image_column)


# ----------------------------------------------------------------------------------------------
# Pixel transforms
# ----------------------------------------------------------------------------------------------


def check_num_channels(num_channels: int) -> None:
    """Raise a ValueError unless image data can feed a UNet with `num_channels` input channels (1 or 3)."""
    if num_channels not in (1, 3):
        raise ValueError(
            f"the UNet has {num_channels} input channels: latent-space UNets need the Stable Diffusion script; "
            "image data can feed only 1- or 3-channel UNets"
        )


def convert_mode(image: Image.Image, num_channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (1 channel) or "RGB" (3); 16-bit grey is rescaled, alpha is dropped."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
    elif "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("L" if num_channels == 1 else "RGB")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (PIL bilinear), as torchvision's `Resize(int)`."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    if size == image.size:
        return image
    return image.resize(size, resample=Image.BILINEAR)


def crop_offsets(size: tuple[int, int], resolution: int, center: bool, rng: random.Random) -> tuple[int, int]:
    """(left, top) of a resolution x resolution crop: torchvision's CenterCrop rounding, or uniform random."""
    width, height = size
    if center:
        return int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    return rng.randint(0, width - resolution), rng.randint(0, height - resolution)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 "L"/"RGB" image -> float32 (C, H, W) tensor x = x_uint8 / 127.5 - 1 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array / 127.5 - 1.0))


class ImageTransform:
    """PIL image -> (C, resolution, resolution) float32 tensor in [-1, 1]: convert, resize, crop, flip, scale.

    A class rather than a closure so DataLoader workers can pickle it. Random crop and flip draw from
    `rng` (default: the global `random` module, which `accelerate.utils.set_seed` and DataLoader workers seed).
    """

    def __init__(
        self, resolution: int, num_channels: int, center_crop: bool = True, random_flip: bool = False, rng=None
    ):
        check_num_channels(num_channels)
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rng = rng

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = self.rng if self.rng is not None else random
        # 1. colour mode, then shorter side -> resolution
        image = resize_shorter_side(convert_mode(image, self.num_channels), self.resolution)
        # 2. square crop
        left, top = crop_offsets(image.size, self.resolution, self.center_crop, rng)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        # 3. horizontal flip with p = 0.5
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(image)


def image_transform(
    resolution: int, num_channels: int, center_crop: bool = True, random_flip: bool = False, rng=None
) -> ImageTransform:
    """Return fn(PIL.Image) -> float32 tensor (num_channels, resolution, resolution) in [-1, 1]."""
    return ImageTransform(resolution, num_channels, center_crop=center_crop, random_flip=random_flip, rng=rng)


class PreprocessBatch:
    """`Dataset.set_transform` function: {image_column: [PIL]} -> {"pixel_values": [tensors]}."""

    def __init__(self, image_column: str, transform: ImageTransform):
        self.image_column = image_column
        self.transform = transform

    def __call__(self, examples: dict) -> dict:
        return {"pixel_values": [self.transform(image) for image in examples[self.image_column]]}


def preprocess_batch_fn(
    image_column: str, resolution: int, num_channels: int, center_crop: bool = True, random_flip: bool = False
) -> PreprocessBatch:
    """Return fn(examples: dict of lists) -> {"pixel_values": [tensors]} for `Dataset.set_transform`."""
    return PreprocessBatch(image_column, image_transform(resolution, num_channels, center_crop, random_flip))


def collate_pixel_values(examples: list) -> dict:
    """Stack examples' "pixel_values" into one contiguous float32 (B, C, H, W) tensor."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    return {"pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float()}


def validate_image_dataset(dataset: datasets.Dataset, image_column: str, num_channels: int, resolution: int) -> None:
    """Decode the first example and raise one clear ValueError before any training if it cannot feed the model."""
    check_num_channels(num_channels)
    if len(dataset) == 0:
        raise ValueError("the data set is empty: check `--dataset_name` / `--train_data_dir` and `--split`")
    image_column = find_image_column(dataset, image_column)
    try:
        value = dataset.with_format(None)[0][image_column]
    except (OSError, ValueError) as error:
        raise ValueError(f"first example of column {image_column!r} cannot be decoded as an image: {error}") from error
    if not isinstance(value, Image.Image):
        raise ValueError(
            f"column {image_column!r} holds {type(value).__name__} values, not images; "
            f"columns are {dataset.column_names}: pass the image column with `--image_column`"
        )
    try:
        pixels = image_transform(resolution, num_channels)(value)
    except (OSError, ValueError, TypeError) as error:
        message = f"first image of column {image_column!r} (mode {value.mode}) cannot be converted: {error}"
        raise ValueError(message) from error
    if not torch.isfinite(pixels).all():
        raise ValueError(f"first image of column {image_column!r} (mode {value.mode}) gives non-finite pixel values")


# ----------------------------------------------------------------------------------------------- batches of a run
# Every random draw of update s (which images, their flips, the noise, the timesteps) is a pure function of (seed, s)
# for the GLOBAL batch, and each process takes its slice: K processes with batch B equal one with batch K x B.
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for update `step`, the same in every process and after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the data set in `epoch`, a pure function of (seed, epoch)."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's slice of global micro-batch s = start, start+1, ...: epoch-wise shuffling of all data.

    Global micro-batch s holds positions [s * G, (s + 1) * G) of the concatenated epoch permutations, G = the global
    batch size (per-process batch x processes); process r takes the r-th slice.
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0):
        self.dataset_size, self.batch_size, self.rank, self.world_size = dataset_size, batch_size, rank, world_size
        self.seed, self.start = seed, start

    def global_indices(self, micro_step: int) -> List[int]:
        """Data set indices of global micro-batch `micro_step`."""
        size = self.batch_size * self.world_size
        positions = range(micro_step * size, (micro_step + 1) * size)
        out, cached_epoch, perm = [], None, None
        for position in positions:
            epoch = position // self.dataset_size
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, epoch_permutation(self.dataset_size, self.seed, epoch)
            out.append(int(perm[position % self.dataset_size]))
        return out

    def __iter__(self) -> Iterator[List[int]]:
        micro_step = self.start
        while True:
            indices = self.global_indices(micro_step)
            yield indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            micro_step += 1


def rank_slice(tensor: torch.Tensor, rank: int, batch_size: int) -> torch.Tensor:
    """Process `rank`'s rows of a global-batch tensor."""
    return tensor[rank * batch_size : (rank + 1) * batch_size]


def random_flips(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror images[i] horizontally where flip[i]."""
    return torch.where(flip.reshape(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
