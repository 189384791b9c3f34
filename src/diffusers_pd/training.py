"""Training-loop infrastructure shared by `examples/train_teacher.py` and `examples/train_distill.py`.

Design for exact resume and multi-process equivalence: every random draw of optimizer update `s` (which images,
their flips, the noise, the timesteps) is a pure function of (seed, s) for the GLOBAL batch, and each process takes
its slice. So a run killed and resumed at any checkpoint, or split over K processes with the same global batch,
computes the same updates. State is therefore: weights, optimizer, EMA and a few counters (`progress.json`).
"""

import argparse
import io
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .arguments import add_data_args, add_optimization_args, add_output_args  # noqa: F401 (their old home)
from .atomic import atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------- arguments
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


# ----------------------------------------------------------------------------------------------- setup
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


# ----------------------------------------------------------------------------------------------- checks
def check_output_dir(output_dir: str, overwrite: bool, resume: Optional[str], leftovers=("logs",)) -> None:
    """Refuse an existing non-empty output_dir unless resuming or overwriting (one line naming the fix).

    A folder holding only `leftovers` (what a run writes before its first checkpoint, e.g. its tracker logs) and
    hidden temporary folders is a run stopped before its first checkpoint: it counts as empty, and one line says so.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file: pass a folder.")
    if not path.is_dir() or overwrite or resume:
        return
    entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    if entries and set(entries) <= set(leftovers):
        logger.warning(f"{output_dir} holds only {', '.join(sorted(entries))} of a run stopped before its first "
                       "checkpoint: starting from scratch.")
    elif any(path.iterdir()):
        raise ValueError(
            f"--output_dir {output_dir} exists and is not empty: pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to write into it anyway, or another --output_dir."
        )


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a frozen model runs in under accelerate's `mixed_precision` ("fp16", "bf16"; else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


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


def make_optimizer(parameters, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam (or bitsandbytes' 8-bit Adam with --use_8bit_adam) over the parameters that require grad."""
    cls = torch.optim.Adam
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes

        cls = bitsandbytes.optim.Adam8bit
    return cls([p for p in parameters if p.requires_grad], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


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


def check_hub_args(args: argparse.Namespace) -> None:
    """--push_to_hub needs --hub_model_id."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/my-student).")


# ----------------------------------------------------------------------------------------------- randomness
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
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir) -> List[Path]:
    """Complete checkpoints of output_dir, oldest first (temporary folders are never listed)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "progress.json").is_file()]


def find_checkpoint(output_dir, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None, `latest` (None if there is none yet) or an explicit folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet, starting from scratch.")
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / "progress.json").is_file():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / "progress.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint there (use `latest`).")
    return path


def _state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A contiguous CPU copy of a module's weights, for safetensors."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    accelerator,
    output_dir,
    global_step: int,
    progress: Dict[str, Any],
    models: Dict[str, torch.nn.Module],
    optimizer: Optional[torch.optim.Optimizer] = None,
    ema=None,
    total_limit: Optional[int] = None,
) -> Path:
    """Write output_dir/checkpoint-{global_step} atomically (every process calls this); prune to total_limit."""
    check_finite_weights({name: accelerator.unwrap_model(m) for name, m in models.items()}, global_step)
    final = Path(output_dir) / f"checkpoint-{global_step}"
    tmp = Path(output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"random_states_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for name, module in models.items():
            save_file(_state_dict(accelerator.unwrap_model(module)), tmp / f"{name}.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        atomic_write_text(tmp / "progress.json", json.dumps({**progress, "global_step": global_step}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir, total_limit: Optional[int]) -> None:
    """Delete the oldest complete checkpoints beyond total_limit; the newest one is always kept."""
    if not total_limit:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - max(total_limit, 1))]:
        _discard(old)


def _discard(folder: Path) -> None:
    """Delete a folder without ever leaving it half-deleted under its name: rename it hidden, then delete."""
    trash = folder.parent / f".{folder.name}.deleting"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_progress(checkpoint: Path) -> Dict[str, Any]:
    """The counters of a checkpoint."""
    return json.loads((Path(checkpoint) / "progress.json").read_text())


def load_checkpoint(
    accelerator,
    checkpoint: Path,
    models: Dict[str, torch.nn.Module],
    optimizer: Optional[torch.optim.Optimizer] = None,
    ema=None,
) -> None:
    """Load weights, optimizer, EMA, grad-scaler and this process's RNG state from a checkpoint."""
    checkpoint = Path(checkpoint)
    for name, module in models.items():
        accelerator.unwrap_model(module).load_state_dict(load_file(checkpoint / f"{name}.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        ema.load_state_dict(torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    rng = checkpoint / f"random_states_{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))


def _rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states (dropout and anything else outside the per-step generators)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    """Restore `_rng_state()`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or inf."""


def check_finite(loss: torch.Tensor, step: int, output_dir) -> None:
    """Stop with the update number and the checkpoints to go back to if the loss is NaN or inf."""
    if not torch.isfinite(loss).all():
        found = list_checkpoints(output_dir)
        kept = ", ".join(p.name for p in found) if found else "none yet"
        raise NonFiniteLossError(
            f"Loss is {loss.item()} at update {step}: stopped, nothing written after it. Checkpoints (all with finite "
            f"weights): {kept} in {output_dir}. The newest may already be diverging and replays the same data: restart "
            "from it or an earlier one with a lower --learning_rate or --max_grad_norm (or check the data)."
        )


def check_finite_weights(models: Dict[str, torch.nn.Module], step: int) -> None:
    """Refuse to checkpoint NaN or inf weights, so every checkpoint on disk is one to go back to."""
    for name, module in models.items():
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise NonFiniteLossError(f"The {name} weights are NaN or inf at update {step}: checkpoint not written.")


def sweep_leftovers(output_dir) -> None:
    """Delete hidden temporary folders a killed run left behind (`.checkpoint-N.tmp`, `.X.deleting`, `.X.tmp-*`)."""
    path = Path(output_dir)
    if path.is_dir():
        for leftover in path.glob(".*"):
            if leftover.is_dir() and (".tmp" in leftover.name or leftover.name.endswith(".deleting") or ".old-" in leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)


def first_and_last(losses: List[float], count: int = 10) -> List[float]:
    """What a checkpoint keeps of a stage's losses to rebuild the means of its first and last `count` updates."""
    return list(losses) if len(losses) <= 2 * count else [*losses[:count], *losses[-count:]]


def run_leftovers(logging_dir: str, *names: str) -> tuple:
    """Top-level names of output_dir that a run writes before its first checkpoint: the tracker logs and `names`."""
    parts = Path(logging_dir).parts
    return (*names, parts[0]) if parts and not Path(logging_dir).is_absolute() else names


def mean_or_nan(values: List[float]) -> float:
    """The mean of `values`, NaN when there are none (e.g. a stage resumed at its very end)."""
    return sum(values) / len(values) if values else float("nan")


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
