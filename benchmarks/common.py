"""Shared pieces of the speed benchmarks: the benchmark model, interleaved timing, machine description."""

import argparse
import platform
import statistics
import time
from typing import Callable, Dict

import torch
from diffusers import UNet2DModel


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every speed benchmark takes: device, model size, batch size, repeats."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small", choices=["small", "cifar"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    return parser


def benchmark_unet(size: str = "small") -> UNet2DModel:
    """A CIFAR-shaped UNet2DModel (32x32x3); `small` for CPU, `cifar` for the DDPM-CIFAR-10 layout (35.7M params)."""
    if size == "cifar":
        config = dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    else:
        config = dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **config)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall time is real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: Dict[str, Callable[[], None]], repeats: int, device: torch.device, warmup: int = 3) -> Dict[str, float]:
    """Median seconds of each fn, timed round-robin so drifting machine load hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine(device: torch.device) -> str:
    """One line naming the hardware the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
