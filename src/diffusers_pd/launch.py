"""Accelerator set-up of a training run: trackers, logging, the process count, precision and memory reporting."""

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoints import sweep_leftovers

def resolve_report_to(report_to: str) -> Optional[str]:
    """`auto` -> tensorboard when importable, else None; `none` -> None."""
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return "tensorboard"
    return report_to


def loggable_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's arguments for trackers and checkpoints, without the Hub token and with only plain values."""
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in config.items()}


def make_accelerator(args: argparse.Namespace, project_name: str):
    """The Accelerator of a training script: precision, accumulation, trackers, logging; the main process creates
    output_dir, sweeps a killed run's temporary folders and starts the trackers (never with the Hub token).

    Raises ValueError (before anything is written) if processes were launched that accelerate does not see.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=resolve_report_to(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    check_process_count(accelerator.num_processes)  # e.g. torchrun on CPU without ACCELERATE_USE_CPU
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(output_dir)
        accelerator.init_trackers(project_name, config=loggable_config(args))
    return accelerator


def launched_process_count() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_process_count(num_processes: int) -> None:
    """Refuse a launch whose processes accelerate does not see (e.g. torchrun on CPU): they would overwrite each other."""
    launched = launched_process_count()
    if launched != num_processes:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate runs {num_processes}: each would "
            "train alone into the same output_dir. On CPU set ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 torchrun "
            f"--standalone --nproc_per_node {launched} ...`); elsewhere check the launch with `accelerate env`."
        )


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a frozen model runs in under accelerate's `mixed_precision` ("fp16", "bf16"; else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a frozen model's weights to `dtype` in place; a no-op when they already are.

    Through `torch.nn.Module.to`: diffusers 0.42's `ModelMixin.to` warns about float32 modules on every dtype cast, also
    for models that keep none (`_keep_in_fp32_modules = []`), once per stage of every run."""
    if any(parameter.dtype != dtype for parameter in model.parameters()):
        torch.nn.Module.to(model, dtype)
    return model


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (on CPU the process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA memory allocated since `reset_peak_memory`, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
