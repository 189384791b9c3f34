"""Checkpoints of a training run: atomic save, find, prune, load (weights, optimizer, EMA, RNG states, progress).

A checkpoint is `output_dir/checkpoint-{update}/` holding `{name}.safetensors` per model, `optimizer.pt`, `ema.pt`,
`scaler.pt`, each process's `random_states_{rank}.pt` and `progress.json` (the run's counters). It is written under a
temporary name and renamed when complete, so a kill at any moment leaves only complete checkpoints. Every random
draw of an update is a pure function of (seed, update) (`data.step_generator`), so weights, optimizer, EMA and the
counters are the whole state: a resumed run computes the same updates as an uninterrupted one.
"""

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def check_resumable(checkpoint, progress: Dict[str, Any], stages: List[str], budgets: List[int],
                    state: Dict[str, Any]) -> None:
    """Refuse (ValueError naming the flag to pass again) a checkpoint made by another run: other stages, other budgets
    per stage or another clamp of the original teacher's x-hat (`state`'s `teacher_clip_range`) than these arguments
    give. A run's stages may be the first of these arguments' (a smaller --end_steps extends a finished run). A key
    the checkpoint predates is not checked."""
    from .clipping import clip_card_row

    done = progress.get("stages") or []
    if not done or stages[: len(done)] != done:
        raise ValueError(f"{checkpoint} was made for stages {progress.get('stages')}, these arguments give {stages}: "
                         f"pass the run's --start_steps / --end_steps, --prediction_type and --teacher_clip_sample again (a smaller "
                         f"--end_steps extends it).")
    if progress.get("budgets", budgets[: len(done)]) != budgets[: len(done)]:
        raise ValueError(f"{checkpoint} was made with {progress['budgets']} iterations per stage, these arguments give "
                         f"{budgets[: len(done)]}: pass the run's --iterations_per_stage / --num_trajectories again.")
    clip_range = state.get("teacher_clip_range")
    if progress.get("teacher_clip_range", clip_range) != clip_range:  # the original teacher's targets and references
        raise ValueError(f"{checkpoint} was made with the teacher's x-hat {clip_card_row(progress['teacher_clip_range'])}, "
                         f"these arguments give {clip_card_row(clip_range)}: pass the run's --teacher_clip_sample again.")


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
        state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        check_optimizer_groups(state, optimizer, checkpoint)
        optimizer.load_state_dict(state)
    if ema is not None:
        ema.load_state_dict(torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    rng = checkpoint / f"random_states_{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))


def check_optimizer_groups(state: Dict[str, Any], optimizer: torch.optim.Optimizer, checkpoint) -> None:
    """Raise one clear line if a checkpoint's optimizer groups (count, sizes) differ from this run's."""
    saved = [len(group["params"]) for group in state["param_groups"]]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved != current:
        raise ValueError(
            f"{checkpoint}: its optimizer has parameter groups of {saved} tensors, this run's {current}: resume with the "
            "flags of the run that wrote it (a guided checkpoint written before --guidance_embedding_lr_scale existed: "
            "add --guidance_embedding_lr_scale 1)."
        )


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


def sweep_leftovers(output_dir) -> None:
    """Delete hidden temporary folders a killed run left behind (`.checkpoint-N.tmp`, `.X.deleting`, `.X.tmp-*`)."""
    path = Path(output_dir)
    if path.is_dir():
        for leftover in path.glob(".*"):
            if leftover.is_dir() and (".tmp" in leftover.name or leftover.name.endswith(".deleting") or ".old-" in leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)


def run_leftovers(logging_dir: str, *names: str) -> tuple:
    """Top-level names of output_dir that a run writes before its first checkpoint: the tracker logs and `names`."""
    parts = Path(logging_dir).parts
    return (*names, parts[0]) if parts and not Path(logging_dir).is_absolute() else names


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
