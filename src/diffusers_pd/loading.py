"""Load a teacher (Hub id or folder) through `from_pretrained`, with one clear error for each way it can be wrong."""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from diffusers import UNet2DModel
from diffusers import DDPMScheduler  # only its `load_config` (reads scheduler_config.json) is used

TEACHER_LAYOUTS = (
    "a Hub id or folder holding a pipeline (model_index.json + unet/ + scheduler/), or a UNet2DModel folder "
    "(config.json + weights) with its scheduler_config.json beside it or given by --teacher_scheduler"
)


def _load_config(cls_or_obj, name_or_path: str, subfolder: Optional[str], revision: Optional[str]) -> Optional[Dict[str, Any]]:
    """A config dict, or None if there is none at that place."""
    try:
        return dict(cls_or_obj.load_config(name_or_path, subfolder=subfolder, revision=revision))
    except (OSError, EnvironmentError, ValueError, json.JSONDecodeError):
        return None


def _is_pipeline(name_or_path: str, revision: Optional[str]) -> bool:
    """Whether name_or_path holds a pipeline layout (a unet/ subfolder)."""
    local = Path(name_or_path)
    if local.exists():
        return (local / "unet" / "config.json").is_file()
    return _load_config(UNet2DModel, name_or_path, "unet", revision) is not None


def load_teacher(
    name_or_path: str,
    scheduler: Optional[str] = None,
    revision: Optional[str] = None,
) -> Tuple[UNet2DModel, Dict[str, Any]]:
    """(unet, scheduler config) of a teacher; raises ValueError naming the fix when it cannot be a teacher here."""
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise ValueError(f"--teacher {name_or_path} is a file: pass {TEACHER_LAYOUTS}.")
    unet_subfolder = "unet" if _is_pipeline(name_or_path, revision) else None
    unet_config = _load_config(UNet2DModel, name_or_path, unet_subfolder, revision)
    if unet_config is None:
        raise ValueError(f"Cannot read a teacher at {name_or_path!r} (missing or unreadable): pass {TEACHER_LAYOUTS}.")
    class_name = unet_config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(
            f"The teacher's unet is a {class_name}, not a UNet2DModel: this script distills unconditional "
            "UNet2DModel teachers (text-conditioned UNets need the Stable Diffusion script)."
        )
    scheduler_source, scheduler_subfolder = (scheduler, None) if scheduler else (name_or_path, "scheduler" if unet_subfolder else None)
    scheduler_config = _load_config(DDPMScheduler, scheduler_source, scheduler_subfolder, None if scheduler else revision)
    if scheduler_config is None and scheduler and _is_pipeline(scheduler, None):
        scheduler_config = _load_config(DDPMScheduler, scheduler, "scheduler", None)
    if scheduler_config is None:
        raise ValueError(
            f"No scheduler config found for teacher {name_or_path!r}: pass --teacher_scheduler with a scheduler "
            "folder or a pipeline that shares the teacher's noise schedule."
        )
    try:
        unet = UNet2DModel.from_pretrained(name_or_path, subfolder=unet_subfolder, revision=revision)
    except (OSError, EnvironmentError, ValueError, RuntimeError) as error:
        raise ValueError(f"Cannot load the teacher's weights from {name_or_path!r}: {error}".splitlines()[0]) from error
    return unet, scheduler_config
