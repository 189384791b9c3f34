"""Load a teacher (Hub id or folder) through `from_pretrained`, with one clear error for each way it can be wrong."""

import importlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from diffusers import UNet2DModel
from diffusers import DDPMScheduler  # only its `load_config` (reads scheduler_config.json) is used

TEACHER_LAYOUTS = (
    "a Hub id or folder holding a pipeline (model_index.json + unet/ + scheduler/), or a UNet2DModel folder "
    "(config.json + weights) with its scheduler_config.json beside it or given by --teacher_scheduler"
)


def public_name(name_or_path: str) -> str:
    """How a model is named in anything that can be pushed: a Hub id as given, a local folder by its name only."""
    local = Path(name_or_path)
    return local.resolve().name if local.exists() else str(name_or_path)


def check_hub_reachable(name: str, revision: Optional[str]) -> None:
    """One quick look at the Hub for a teacher that is no local folder, so a network problem is named at once
    (the downloads retry for about a minute before failing); raises ValueError naming the fix."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"--teacher {name}: no such folder, and not a Hub id either: pass {TEACHER_LAYOUTS}.") from None
    if _offline():  # only the local Hub cache can be read: load_teacher says so if the teacher is not there
        return
    try:
        HfApi().model_info(name, revision=revision)
    except RepositoryNotFoundError:
        raise ValueError(f"--teacher {name}: no such folder, and no such Hub repo (or a private one: set HF_TOKEN "
                         "or run `hf auth login`).") from None
    except RevisionNotFoundError:
        raise ValueError(f"--teacher_revision {revision}: no such revision of the Hub repo {name}.") from None
    except Exception as error:  # the network: connection refused, DNS, timeout, proxy
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--teacher {name}: no such folder, and the Hub at {constants.ENDPOINT} cannot be reached "
                         f"({cause}): check the network, or set HF_HUB_OFFLINE=1 to use the local Hub cache.") from None


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


def _offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_teacher(
    name_or_path: str,
    scheduler: Optional[str] = None,
    revision: Optional[str] = None,
) -> Tuple[UNet2DModel, Dict[str, Any]]:
    """(unet, scheduler config) of a teacher; raises ValueError naming the fix when it cannot be a teacher here."""
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise ValueError(f"--teacher {name_or_path} is a file: pass {TEACHER_LAYOUTS}.")
    if not local.exists():
        check_hub_reachable(name_or_path, revision)
    unet_subfolder = "unet" if _is_pipeline(name_or_path, revision) else None
    unet_config = _load_config(UNet2DModel, name_or_path, unet_subfolder, revision)
    if unet_config is None:
        offline = "; HF_HUB_OFFLINE is set, so only the local Hub cache was read" if not local.exists() and _offline() else ""
        raise ValueError(f"Cannot read a teacher at {name_or_path!r} (missing or unreadable{offline}): pass {TEACHER_LAYOUTS}.")
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
    # diffusers records the source in the config, which every student saved from this unet copies: no machine path
    unet.register_to_config(_name_or_path=public_name(name_or_path))
    return unet, scheduler_config


# What a text-to-image (Stable Diffusion) teacher must hold, and the libraries its components may come from.
SD_TEACHER_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def pipeline_model_index(name_or_path: str, revision: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The pipeline's model_index.json as a dict, or None if `name_or_path` holds none."""
    from diffusers import DiffusionPipeline

    return _load_config(DiffusionPipeline, name_or_path, None, revision)


def is_text_to_image_pipeline(name_or_path: str, revision: Optional[str] = None) -> bool:
    """Whether `name_or_path` is a pipeline whose model_index.json names a text encoder (a Stable Diffusion layout)."""
    model_index = pipeline_model_index(name_or_path, revision) or {}
    return (model_index.get("text_encoder") or [None])[0] is not None


def _component_class(name: str, entry, name_or_path: str):
    """The class that model_index.json names for component `name` (from diffusers or transformers only)."""
    library, class_name = entry
    if library not in SD_COMPONENT_LIBRARIES:
        raise ValueError(f"The {name} of {name_or_path!r} comes from {library!r}: a teacher's components must come from "
                         f"{' or '.join(SD_COMPONENT_LIBRARIES)}.")
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"The {name} of {name_or_path!r} is a {class_name}, which {library} does not have: update {library}.")
    return getattr(module, class_name)


def load_sd_teacher(
    name_or_path: str, revision: Optional[str] = None, torch_dtype=None
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(components, scheduler config) of a Stable Diffusion pipeline (folder or Hub id) recognised by its model_index.json.

    `components` holds `unet` (a UNet2DConditionModel), `vae`, `text_encoder` and `tokenizer`, each loaded with its own
    class's `from_pretrained` (`torch_dtype` for the three networks). The scheduler config is read as saved (SD's own
    DDIM/PNDM with steps_offset=1, set_alpha_to_one=False, scaled_linear: only its noise schedule and prediction_type
    matter here), with diffusers' default prediction_type "epsilon" filled in where an old config has none.
    Raises ValueError naming the fix when the pipeline cannot be a text-to-image teacher.
    """
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise ValueError(f"--teacher {name_or_path} is a file: pass a Stable Diffusion pipeline folder or Hub id.")
    if not local.exists():
        check_hub_reachable(name_or_path, revision)
    model_index = pipeline_model_index(name_or_path, revision)
    if model_index is None:
        raise ValueError(f"{name_or_path!r} has no model_index.json: pass a Stable Diffusion pipeline folder or Hub id "
                         "(model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    missing = [name for name in SD_TEACHER_COMPONENTS if (model_index.get(name) or [None])[0] is None]
    if missing:
        raise ValueError(f"The pipeline at {name_or_path!r} has no {', '.join(missing)}: a text-to-image teacher needs "
                         f"{', '.join(SD_TEACHER_COMPONENTS)} (a full StableDiffusionPipeline folder).")
    unet_class = _component_class("unet", model_index["unet"], name_or_path)
    if unet_class.__name__ != "UNet2DConditionModel":
        raise ValueError(f"The unet of {name_or_path!r} is a {unet_class.__name__}: a text-to-image teacher's unet is a "
                         "UNet2DConditionModel.")
    scheduler_config = _load_config(DDPMScheduler, name_or_path, "scheduler", revision)
    if scheduler_config is None:
        raise ValueError(f"Cannot read scheduler/scheduler_config.json of {name_or_path!r}: the pipeline folder is incomplete.")
    scheduler_config.setdefault("prediction_type", "epsilon")
    components = {}
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        component_class = _component_class(name, model_index[name], name_or_path)
        kwargs = {} if name == "tokenizer" or torch_dtype is None else {"torch_dtype": torch_dtype}
        try:
            components[name] = component_class.from_pretrained(name_or_path, subfolder=name, revision=revision, **kwargs)
        except (OSError, EnvironmentError, ValueError, RuntimeError) as error:
            raise ValueError(f"Cannot load the {name} of {name_or_path!r}: {error}".splitlines()[0]) from error
    components["unet"].register_to_config(_name_or_path=public_name(name_or_path))  # no machine path in any student
    return components, scheduler_config
