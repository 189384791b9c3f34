"""The training loops' own helpers, shared by `examples/train_teacher.py` and `examples/train_distill.py`: command
lines (for resume lines and model cards), input checks, the optimizer, learning-rate schedules, non-finite-loss stops
and the end-of-stage summaries. Checkpoints are in `checkpoints.py`, the accelerator set-up in `launch.py`, the
deterministic per-update batches in `data.py`.
"""

import argparse
import io
import math
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch



# ----------------------------------------------------------------------------------------------- command lines
def command_line(script: str, argv: List[str], num_processes: int, public: bool = False) -> str:
    """The command line of a run, as typed from the current folder, never with a Hub token.

    `public`: for text that may be pushed (model cards): an absolute path is written relative to the current folder
    when inside it, else by its last component only, so no machine path is published.
    """
    words = [_public_word(word) if public else word for word in without_flag(argv, "--hub_token")]
    launcher = ["python"] if num_processes == 1 else ["accelerate", "launch", "--num_processes", str(num_processes)]
    return shlex.join([*launcher, os.path.relpath(script), *words])


def resume_command(script: str, argv: List[str], num_processes: int) -> str:
    """The command that continues a run from its newest checkpoint: its own, with `--resume_from_checkpoint latest`."""
    words = without_flag(argv, "--resume_from_checkpoint")
    return command_line(script, [*words, "--resume_from_checkpoint", "latest"], num_processes)


def without_flag(argv: List[str], flag: str) -> List[str]:
    """`argv` without `flag` and its value, in either form (`--flag value` or `--flag=value`)."""
    words, skip = [], False
    for word in argv:
        if skip or word.startswith(f"{flag}="):
            skip = False
            continue
        skip = word == flag
        if not skip:
            words.append(word)
    return words


def _public_word(word: str) -> str:
    """A command-line word with any absolute path in it (`/a/b` or `--flag=/a/b`) made public (see command_line)."""
    flag, equals, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
    if not os.path.isabs(value):
        return word
    relative = os.path.relpath(value)
    value = relative if not relative.startswith("..") else Path(value).name
    return f"{flag}{equals}{value}"


# ----------------------------------------------------------------------------------------------- checks
def check_memory_args(args: argparse.Namespace) -> None:
    """One-line errors for memory options whose package is missing (before any work)."""
    import importlib.util

    if getattr(args, "use_8bit_adam", False) and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.")
    if getattr(args, "lora_rank", None) is not None:
        if args.lora_rank < 1:
            raise ValueError(f"--lora_rank {args.lora_rank}: a LoRA rank is at least 1.")
        if importlib.util.find_spec("peft") is None:
            raise ValueError("--lora_rank needs peft: `pip install peft`, or drop the flag.")


def param_groups(named_parameters, lr_scales: Optional[Mapping[str, float]] = None) -> List[Dict[str, Any]]:
    """The optimizer's parameter groups of the (name, parameter) pairs that require grad: lr = lr_scale x the schedule's lr,
    lr_scale = lr_scales[name] for the names given (e.g. a layer new at this stage), 1 for the others."""
    lr_scales = dict(lr_scales or {})
    groups: Dict[float, List[torch.nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            groups.setdefault(float(lr_scales.pop(name, 1.0)), []).append(parameter)
    if lr_scales:
        raise ValueError(f"No trainable parameter named {sorted(lr_scales)} to give a learning-rate scale.")
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def make_optimizer(groups: List[Dict[str, Any]], args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam (or bitsandbytes' 8-bit Adam with --use_8bit_adam) over `param_groups(...)`: each group's lr follows
    `set_lr` x its lr_scale."""
    cls = torch.optim.Adam
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes

        cls = bitsandbytes.optim.Adam8bit
    return cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def check_hub_args(args: argparse.Namespace) -> None:
    """--push_to_hub needs --hub_model_id."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/my-student).")


# ----------------------------------------------------------------------------------------------- learning rate
def linear_decay_lr(step: int, total_steps: int, learning_rate: float) -> float:
    """lr(step) = learning_rate * (1 - step / total_steps): linear decay to 0 over a stage."""
    return learning_rate * max(0.0, 1.0 - step / total_steps)


def step_decay_lr(step: int, total_steps: int, learning_rate: float, factor: float = 0.1) -> float:
    """lr for the first half of `total_steps`, lr x factor from half of the budget on (the official SFD schedule)."""
    return learning_rate if 2 * step < total_steps else learning_rate * factor


def linear_warmup_lr(step: int, warmup_steps: int, learning_rate: float) -> float:
    """lr(step) = learning_rate * min(1, (step + 1) / warmup_steps): linear warmup over `warmup_steps` updates, then constant."""
    if warmup_steps <= 0:
        return learning_rate
    return learning_rate * min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group: lr x the group's lr_scale (1 if it has none, see `param_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------- losses and summaries
def first_and_last(losses: List[float], count: int = 10) -> List[float]:
    """What a checkpoint keeps of a stage's losses to rebuild the means of its first and last `count` updates."""
    return list(losses) if len(losses) <= 2 * count else [*losses[:count], *losses[-count:]]


def mean_or_nan(values: List[float]) -> float:
    """The mean of `values`, NaN when there are none (e.g. a stage resumed at its very end)."""
    return sum(values) / len(values) if values else float("nan")


def png_bytes(image) -> bytes:
    """PNG encoding of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def log_grid(accelerator, grid, step: int, tag: str = "samples") -> None:
    """Send a PIL sample grid to the trackers that take images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of dict rows (keys of the first row as header)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell: floats with 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
