"""Save students as folders that a plain diffusers install loads with `DiffusionPipeline.from_pretrained`.

A saved student is a stock `DDPMPipeline` folder (`model_index.json` names only diffusers classes) whose
scheduler is a stock scheduler that reproduces the student's DDIM grid exactly:

* `DDIMScheduler` (trailing, unclipped, `set_alpha_to_one`) when num_train_timesteps % N == 0: it computes the
  previous timestep as t - T // N, which is then exactly the next grid point;
* otherwise `DPMSolverMultistepScheduler` of order 1 (DPM-Solver++(1) *is* DDIM) with trailing spacing and a
  zero final sigma, which reads the previous timestep off its grid;
* if neither is exact (e.g. zero terminal SNR with T % N != 0), `DDIMScheduler` with a warning and
  `"stock_exact": false` in the metadata.

The student's metadata (step count, teacher, parameterizations, schedule, grid) is stored under the private key
`_diffusers_pd` of `scheduler/scheduler_config.json`: every diffusers scheduler ignores it when building itself and
keeps it in its config. Load with ``DiffusionPipeline.from_pretrained(folder)(num_inference_steps=N)``.
"""

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from huggingface_hub import ModelCard

from . import __version__
from .atomic import PathLike, atomic_directory
from .scheduler import METADATA_KEY, STOCK_SAMPLING_KEYS
from .schedules import alphas_cumprod_from_config, trailing_timesteps

logger = logging.getLogger(__name__)

STOCK_GRIDS = ("trailing", "karras", "lu")

SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


def schedule_kwargs(config) -> Dict[str, Any]:
    """Every schedule key of `config`, explicitly, so no diffusers default can slip in (`_use_default_values`)."""
    return {key: config[key] for key in SCHEDULE_KEYS if key in config}


def ddim_scheduler(config) -> DDIMScheduler:
    """A stock DDIMScheduler sampling deterministic DDIM on the trailing grid of `config`'s schedule."""
    return DDIMScheduler(**schedule_kwargs(config), **STOCK_SAMPLING_KEYS)


def ddpm_scheduler(config) -> DDPMScheduler:
    """A stock DDPMScheduler of `config`'s schedule, configured as the Hub's DDPM checkpoints ship it (ancestral)."""
    return DDPMScheduler(**schedule_kwargs(config))


def dpm_solver_first_order_scheduler(config, grid: str = "trailing") -> DPMSolverMultistepScheduler:
    """A stock DPM-Solver++(1) (= DDIM) on the `grid` of `config`'s schedule ("trailing", "karras", "lu"), landing on sigma = 0."""
    if grid not in STOCK_GRIDS:
        raise ValueError(f"Unknown grid {grid!r}: a stock scheduler reproduces {', '.join(STOCK_GRIDS)}.")
    return DPMSolverMultistepScheduler(
        **schedule_kwargs(config),
        solver_order=1,
        algorithm_type="dpmsolver++",
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=grid == "karras",
        use_lu_lambdas=grid == "lu",
        lambda_min_clipped=-math.inf,
        thresholding=False,
        steps_offset=0,
    )


def _ddim_is_exact(config, num_steps: int) -> bool:
    """DDIMScheduler steps t -> t - T // N: exact iff that lands on the next grid point every time."""
    num_train_timesteps = config["num_train_timesteps"]
    grid = trailing_timesteps(num_train_timesteps, num_steps)
    stock = ddim_scheduler(config)
    stock.set_timesteps(num_steps)
    expected_prev = np.append(grid[1:], -1)
    return np.array_equal(stock.timesteps.numpy(), grid) and np.array_equal(
        grid - num_train_timesteps // num_steps, expected_prev
    )


def _dpm_solver_is_exact(config, num_steps: int) -> bool:
    """DPM-Solver++(1) is exact iff it uses our grid and every sigma on it is finite (no zero terminal SNR)."""
    if alphas_cumprod_from_config(config)[-1] == 0:
        return False
    stock = dpm_solver_first_order_scheduler(config)
    stock.set_timesteps(num_steps)
    grid = trailing_timesteps(config["num_train_timesteps"], num_steps)
    return np.array_equal(stock.timesteps.numpy(), grid) and bool(torch.isfinite(stock.sigmas).all())


def stock_scheduler_for(config, num_steps: int, grid: str = "trailing") -> Tuple[Any, bool]:
    """(stock scheduler, exact): the diffusers scheduler that samples the N-step student `grid` of `config`.

    "trailing": DDIMScheduler or DPM-Solver++(1) as described above. "karras" / "lu": DPM-Solver++(1) with
    `use_karras_sigmas` / `use_lu_lambdas`, which build the grid from the config alone (rounded integer timesteps for
    the network, exact sigmas for the step). "sfd" (the paper's sigma_max = 80 grid without a final denoising step):
    no stock scheduler reproduces it; the Karras one, also polynomial with rho = 7, is returned with exact = False.
    """
    if grid == "sfd":
        return dpm_solver_first_order_scheduler(config, "karras"), False
    if grid != "trailing":
        stock = dpm_solver_first_order_scheduler(config, grid)
        stock.set_timesteps(num_steps)  # grid state only; the saved config is what plain diffusers reads
        return stock, bool(torch.isfinite(stock.sigmas).all())
    if _ddim_is_exact(config, num_steps):
        return ddim_scheduler(config), True
    if _dpm_solver_is_exact(config, num_steps):
        return dpm_solver_first_order_scheduler(config), True
    return ddim_scheduler(config), False


def grid_timesteps(config, num_steps: int, grid: str = "trailing") -> list:
    """The network's timesteps of the N-step student `grid` (`grids.GRID_KINDS`), in sampling order."""
    if grid == "trailing":
        return trailing_timesteps(config["num_train_timesteps"], num_steps).tolist()
    from .grids import student_grid  # grids builds its stock grids with this module's schedulers

    timesteps = student_grid(config, num_steps, grid).timesteps[:-1]
    return [int(t) if float(t).is_integer() else float(t) for t in timesteps.tolist()]


def student_metadata(
    scheduler_config,
    num_inference_steps: int,
    *,
    teacher: Optional[str] = None,
    teacher_prediction_type: Optional[str] = None,
    method: str = "progressive_distillation",
    grid: str = "trailing",
    **extra,
) -> Dict[str, Any]:
    """The metadata dict stored under `_diffusers_pd` in a student's scheduler config."""
    schedule = {k: v for k, v in schedule_kwargs(scheduler_config).items() if k not in ("prediction_type", "trained_betas")}
    schedule["trained_betas"] = scheduler_config.get("trained_betas") is not None
    return {
        "method": method,
        "num_inference_steps": int(num_inference_steps),
        "grid": grid,
        "timesteps": grid_timesteps(scheduler_config, num_inference_steps, grid),
        "prediction_type": scheduler_config["prediction_type"],
        "teacher": teacher,
        "teacher_prediction_type": teacher_prediction_type,
        "schedule": schedule,
        "diffusers_pd_version": __version__,
        **extra,
    }


def save_student(
    folder: PathLike,
    unet,
    scheduler,
    num_inference_steps: int,
    *,
    teacher: Optional[str] = None,
    teacher_prediction_type: Optional[str] = None,
    extra_files: Optional[Dict[str, bytes]] = None,
    card_repo_id: Optional[str] = None,
    card_training: Optional[Dict[str, Any]] = None,
    save_kwargs: Optional[Dict[str, Any]] = None,
    grid: str = "trailing",
    **metadata,
) -> Dict[str, Any]:
    """Write a stock-loadable student folder with its model card atomically (temporary name, then rename).

    `scheduler` is the student's `ProgressiveDistillationScheduler` (or any scheduler with the same schedule
    config). `extra_files` (name -> bytes, e.g. `samples.png`) are written inside the folder; README.md is a Hub
    model card naming `card_repo_id` (default: the folder) and the `card_training` rows; `save_kwargs` go to
    `DDPMPipeline.save_pretrained` (safe_serialization, variant, max_shard_size); `grid` is the student's grid kind
    (`grids.GRID_KINDS`), which picks the stock scheduler (`stock_scheduler_for`). Returns the metadata.
    """
    stock, exact = stock_scheduler_for(scheduler.config, num_inference_steps, grid)
    info = student_metadata(
        scheduler.config,
        num_inference_steps,
        grid=grid,
        teacher=teacher,
        teacher_prediction_type=teacher_prediction_type,
        stock_scheduler=type(stock).__name__,
        stock_exact=exact,
        **metadata,
    )
    if not exact:
        logger.warning(
            "No stock diffusers scheduler reproduces the %d-step grid of this schedule exactly; %s saved it with "
            "%s, which will mis-sample it (metadata stock_exact=false). Sample it with ProgressiveDistillationPipeline.",
            num_inference_steps, folder, type(stock).__name__,
        )
    card = ModelCard(model_card_text(info, card_repo_id or str(folder), card_training))
    files = {"README.md": str(card).encode("utf-8"), **(extra_files or {})}
    save_pipeline_folder(folder, unet, stock, info, files, **(save_kwargs or {}))
    return info


def save_pipeline_folder(
    folder: PathLike, unet, stock_scheduler, metadata: Dict[str, Any], files: Dict[str, bytes], **save_kwargs
) -> None:
    """Atomically write a stock DDPMPipeline folder, `metadata` under `_diffusers_pd` of its scheduler config, `files`."""
    write_pipeline_folder(folder, DDPMPipeline(unet=unet, scheduler=stock_scheduler), metadata, files, **save_kwargs)


def write_pipeline_folder(folder: PathLike, pipeline, metadata: Dict[str, Any], files: Dict[str, bytes], **save_kwargs) -> None:
    """Atomically write any stock `pipeline`, `metadata` under `_diffusers_pd` of its scheduler config, and `files`."""
    pipeline.scheduler.register_to_config(**{METADATA_KEY: metadata})
    with atomic_directory(folder) as tmp:
        pipeline.save_pretrained(tmp, **save_kwargs)
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)


# Metadata keys that `save_student` derives from the scheduler and the grid; a saved student's other keys are kept.
DERIVED_METADATA_KEYS = (
    "num_inference_steps", "timesteps", "prediction_type", "teacher", "teacher_prediction_type", "schedule",
    "diffusers_pd_version", "stock_scheduler", "stock_exact", "grid",
)


def stock_scheduler_for_every_grid(config) -> Tuple[Any, bool]:
    """(stock scheduler, exact): one that samples the trailing N-step grid of `config` for EVERY N, where one exists.

    DPM-Solver++(1) reads each grid off its config; at zero terminal SNR (an infinite sigma) only DDIMScheduler is
    left, which is exact only for N dividing num_train_timesteps.
    """
    if alphas_cumprod_from_config(config)[-1] > 0:
        return dpm_solver_first_order_scheduler(config), True
    return ddim_scheduler(config), False


def save_stock_pipeline(folder: PathLike, unet, scheduler, *, card_repo_id: Optional[str] = None, **save_kwargs) -> Dict[str, Any]:
    """Write `unet` + `scheduler` into `folder` in the stock form plain diffusers loads; returns the metadata written.

    A student (a step count in the scheduler's `_diffusers_pd` metadata) is written exactly as `save_student` writes
    it, its other metadata kept. Without a step count (a teacher, or a pipeline built by hand) the model is sampled at
    whatever N its user picks, so the stock scheduler is the one exact at every N (`stock_scheduler_for_every_grid`).
    The folder is staged beside `folder` and each entry renamed into place: files of `folder` that a pipeline folder
    does not have (checkpoints, logs) stay, as with diffusers' `save_pretrained`. `save_kwargs` go to
    `DDPMPipeline.save_pretrained`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(scheduler.config.get(METADATA_KEY) or {})
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        staged = staging / "pipeline"
        if metadata.get("num_inference_steps") is not None:
            kept = {key: value for key, value in metadata.items() if key not in DERIVED_METADATA_KEYS}
            info = save_student(
                staged, unet, scheduler, metadata["num_inference_steps"], teacher=metadata.get("teacher"),
                teacher_prediction_type=metadata.get("teacher_prediction_type"), card_repo_id=card_repo_id or str(folder),
                save_kwargs=save_kwargs, grid=metadata.get("grid", "trailing"), **kept,
            )
        else:
            stock, exact = stock_scheduler_for_every_grid(scheduler.config)
            if not exact:
                logger.warning(
                    "No stock diffusers scheduler samples every N-step grid of this schedule exactly; %s saved it with "
                    "%s, exact only for N dividing num_train_timesteps (metadata stock_exact=false).", folder, type(stock).__name__,
                )
            info = {**metadata, "stock_scheduler": type(stock).__name__, "stock_exact": exact, "diffusers_pd_version": __version__}
            save_pipeline_folder(staged, unet, stock, info, {}, **save_kwargs)
        move_entries_into(staged, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def move_entries_into(staged: Path, folder: Path) -> None:
    """Rename each entry of `staged` into `folder`, replacing its namesake whole; model_index.json goes last."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [entry for entry in staged.iterdir() if entry.name != "model_index.json"] + [staged / "model_index.json"]
    for entry in entries:
        target = folder / entry.name
        old = folder / f".{entry.name}.old-{os.getpid()}"
        replaced = target.exists()
        if replaced:
            os.replace(target, old)
        os.replace(entry, target)
        if replaced and old.is_dir():
            shutil.rmtree(old)
        elif replaced:
            old.unlink()


def card_front_matter(tag: str, base_model: Optional[str] = None, pipeline_tag: str = "unconditional-image-generation") -> str:
    """The YAML metadata block of this package's model cards: diffusers library, `pipeline_tag`, `tag`."""
    base_model_line = f"base_model: {base_model}\n" if base_model else ""
    return (
        f"---\nlibrary_name: diffusers\npipeline_tag: {pipeline_tag}\ntags:\n- diffusers\n"
        f"- diffusers-pd\n- {tag}\n- {pipeline_tag}\n{base_model_line}---\n"
    )


METHOD_NAMES = {
    "progressive_distillation": "Progressive Distillation (Salimans & Ho, ICLR 2022)",
    "sfd": "SFD, Simple and Fast Distillation (Zhou et al., NeurIPS 2024)",
    "guided_distillation": "guided distillation (Meng et al., CVPR 2023)",
}


def class_conditional_note(info: Dict[str, Any]) -> str:
    """The model card's words on sampling a class-conditional student: guidance built in, or applied at sampling."""
    usage = ("Stock diffusers has no pipeline that passes class labels to a `UNet2DModel`: sample it with "
             "`diffusers_pd.ProgressiveDistillationPipeline.from_pretrained(folder)(class_labels=torch.tensor([...])")
    if info.get("guidance_scale_folded") is not None:
        return (f"\n\nA class-conditional student with classifier-free guidance at s = {info['guidance_scale_folded']} built "
                f"into its weights (one UNet call per step). {usage})` (the stock usage below cannot pass them).")
    return (f"\n\nA class-conditional student distilled at s = 1 (the conditional prediction). {usage}, guidance_scale=s)`, "
            f"which applies classifier-free guidance at s > 1 against the null class {info.get('null_class')}: two predictions "
            "per step (the labels' and the null class's) from ONE UNet forward of twice the batch (one prediction at "
            "s = 1). The stock usage below cannot pass labels.")


def sampling_note(info: Dict[str, Any], text_to_image: bool = False) -> str:
    """The model card's words on how an SFD or class-conditional student samples (empty for an unconditional PD one)."""
    note = class_conditional_note(info) if info.get("class_conditional") else ""
    if info.get("method") != "sfd":
        return note
    steps, nfe = info["num_inference_steps"], info.get("nfe", info["num_inference_steps"])
    note += f"\n\nSFD student on the `{info.get('grid', 'trailing')}` grid, teacher solver `{info.get('teacher_solver')}`."
    if info.get("afs") and text_to_image:
        note += (
            f" It was trained with an analytic first step (AFS): its own sampler makes {nfe} UNet calls per prediction "
            f"(`diffusers_pd.sfd_student_samples(..., afs=True)`), while `StableDiffusionPipeline` calls the UNet at every one "
            f"of its {steps} steps ({steps} calls, the first replacing the analytic step, which it was not trained for)."
        )
    elif info.get("afs"):
        note += (
            f" It was trained with an analytic first step (AFS): its own sampler makes {nfe} network calls "
            f"(`diffusers_pd.ProgressiveDistillationPipeline.from_pretrained(...)()`), while a stock diffusers "
            f"pipeline calls the network at every one of its {steps} steps ({steps} calls, the first replacing the "
            "analytic step, which it was not trained for)."
        )
    return note


MODEL_CARD = """{front_matter}
# {title}

A {steps}-step student of `{teacher}`, distilled with {method_name} using
`diffusers_pd`. It predicts `{prediction_type}` and samples with
deterministic DDIM on its own {steps}-step grid (timesteps {timesteps}).{sampling_note}

![samples](samples.png)

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_or_folder}")
images = pipe(batch_size=16, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).images
```

Always pass `num_inference_steps={steps}`: the student was trained for exactly this grid, and the saved
`{stock_scheduler}` reproduces it{exact_note}.

## Training

| | |
|---|---|
{training_rows}
"""


def card_fields(
    info: Dict[str, Any], repo_or_folder: str, training: Optional[Dict[str, Any]] = None, *,
    pipeline_tag: str = "unconditional-image-generation", default_method: str = "progressive_distillation",
) -> Dict[str, Any]:
    """The fields that every model card template of this package fills from a student's metadata `info`."""
    teacher = info.get("teacher") or "a diffusion model"
    # the Hub's base_model only for a Hub teacher (`teacher_source`; older metadata: a name that is no local folder)
    from_hub = info.get("teacher_source", "local" if Path(str(teacher)).exists() else "hub") == "hub"
    base_model = info.get("teacher") if info.get("teacher") and from_hub else None
    if Path(repo_or_folder).is_absolute():  # a card can be pushed: never a machine path, the folder name only
        repo_or_folder = Path(repo_or_folder).name
    method = info.get("method", default_method)
    rows = {"method": method, "steps": info["num_inference_steps"], "teacher prediction type": info.get("teacher_prediction_type"),
            "student prediction type": info["prediction_type"], **(training or {})}
    return dict(
        title=f"{info['num_inference_steps']}-step student of {teacher}",
        front_matter=card_front_matter(method.replace("_", "-"), base_model, pipeline_tag),
        steps=info["num_inference_steps"],
        teacher=teacher,
        method_name=METHOD_NAMES.get(method, method),
        sampling_note=sampling_note(info),
        prediction_type=info["prediction_type"],
        timesteps=info["timesteps"],
        repo_or_folder=repo_or_folder,
        stock_scheduler=info.get("stock_scheduler", "scheduler"),
        exact_note="" if info.get("stock_exact", True) else " only approximately (see `stock_exact` in the scheduler config)",
        training_rows="\n".join(f"| {k} | {v} |" for k, v in rows.items()),
    )


def model_card_text(info: Dict[str, Any], repo_or_folder: str, training: Optional[Dict[str, Any]] = None) -> str:
    """A Hub model card (YAML metadata + usage) for a saved student described by its metadata `info`."""
    return MODEL_CARD.format(**card_fields(info, repo_or_folder, training))


SD_MODEL_CARD = """{front_matter}
# {title}

A {steps}-step text-to-image student of `{teacher}`, distilled with {method_name} using `diffusers_pd`.
It is a full `StableDiffusionPipeline` (no safety checker) that predicts `{prediction_type}` and samples with
deterministic DDIM on its own {steps}-step grid (timesteps {timesteps}).{sampling_note}

![samples](samples.png)

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_or_folder}")
image = pipe("a photo of ...", num_inference_steps={steps}, guidance_scale={example_scale}).images[0]
```

Always pass `num_inference_steps={steps}`: the student was trained for exactly this grid, and the saved
`{stock_scheduler}` reproduces it{exact_note}.

## Guidance

{guidance_note}

## Training

| | |
|---|---|
{training_rows}
"""


def guidance_card_note(info: Dict[str, Any]) -> str:
    """The model card's guidance paragraph: a guidance-conditioned student, one folded at a scale, or no guidance."""
    if info.get("guidance_embedding_dim") is not None:
        return (
            f"The UNet takes the guidance scale s as an input (`time_cond_proj_dim={info['guidance_embedding_dim']}`, fed by "
            "the pipeline as `timestep_cond`), so `StableDiffusionPipeline` skips its unconditional batch and runs ONE UNet "
            f"call per step at any s. Trained for s in [{info['guidance_scale_min']}, {info['guidance_scale_max']}]. "
            "Negative prompts are unsupported by a guidance-conditioned student: the pipeline never evaluates them."
        )
    if info.get("guidance_scale_folded") is not None:
        steps = info["num_inference_steps"]
        return (
            f"Classifier-free guidance at s = {info['guidance_scale_folded']} is built into the weights (the constant "
            "guidance embedding folded into the time-embedding bias: a plain UNet without `time_cond_proj_dim`). Call the "
            "pipeline with `guidance_scale=1` (or 1.0): `StableDiffusionPipeline` applies its own classifier-free guidance "
            "only when `guidance_scale > 1` and the UNet has no `time_cond_proj_dim` (its `do_classifier_free_guidance`), "
            f"so at `guidance_scale=1` it makes {steps} UNet calls of batch = prompts and reproduces the distilled guided "
            "student; a larger value would apply guidance a second time, on top of the built-in one (two predictions "
            "per step, other images). Negative prompts have no effect: the pipeline uses them only for its own guidance, "
            "which is off at `guidance_scale=1`."
        )
    if info.get("method") == "sfd":
        steps = info["num_inference_steps"]
        return (
            "Distilled at s = 1 (the conditional prediction, as SFD distils Stable Diffusion); classifier-free guidance is "
            f"applied at sampling, at any s. With `guidance_scale=s > 1` the pipeline predicts for the prompt and for the "
            f"empty (or negative) prompt in ONE UNet forward of twice the batch per step: {steps} UNet calls of 2 x the "
            f"prompts, 2 x {steps} predictions per image; with `guidance_scale=1`, {steps} calls of the prompts. Negative "
            "prompts work (`negative_prompt=...` replaces the empty prompt's prediction), unlike with a guidance-conditioned "
            "student; the student learnt the conditional trajectories (and the empty prompt's only with "
            "`--proportion_empty_prompts`), so its unconditional prediction is the teacher's as training left it."
        )
    return "The student was distilled without guidance; `guidance_scale > 1` applies classifier-free guidance at two UNet calls per step."


def sd_model_card_text(info: Dict[str, Any], repo_or_folder: str, training: Optional[Dict[str, Any]] = None) -> str:
    """A Hub model card (YAML metadata + usage + guidance) for a saved text-to-image student described by `info`."""
    fields = card_fields(info, repo_or_folder, training, pipeline_tag="text-to-image", default_method="guided_distillation")
    fields["sampling_note"] = sampling_note(info, text_to_image=True)
    example_scale = info["guidance_scale_max"] if info.get("guidance_embedding_dim") is not None else 1.0
    if info.get("method") == "sfd":
        example_scale = 3.0  # guidance is applied at sampling: any s
    return SD_MODEL_CARD.format(**fields, example_scale=example_scale, guidance_note=guidance_card_note(info))


def set_sd_steps_offset(stock, num_steps: int) -> None:
    """Give `stock` steps_offset=1, which StableDiffusionPipeline otherwise forces on loading (with a deprecation
    warning); on the trailing, Karras and log-SNR grids the offset changes nothing, which is checked here."""
    stock.set_timesteps(num_steps)
    before = stock.timesteps.clone()
    stock.register_to_config(steps_offset=1)
    stock.set_timesteps(num_steps)
    if not torch.equal(stock.timesteps, before):
        raise RuntimeError(f"steps_offset=1 moves the {num_steps}-step grid of {type(stock).__name__}: it cannot be saved "
                           "in a StableDiffusionPipeline, which forces that offset.")


def save_stock_sd_pipeline(
    folder: PathLike,
    components: Dict[str, Any],
    unet,
    num_inference_steps: int,
    scheduler_config,
    *,
    grid: str = "trailing",
    prediction_type: Optional[str] = None,
    teacher: Optional[str] = None,
    guidance_scale_min: Optional[float] = None,
    guidance_scale_max: Optional[float] = None,
    guidance_scale_folded: Optional[float] = None,
    method: str = "guided_distillation",
    extra_files: Optional[Dict[str, bytes]] = None,
    card_repo_id: Optional[str] = None,
    card_training: Optional[Dict[str, Any]] = None,
    save_kwargs: Optional[Dict[str, Any]] = None,
    **metadata,
) -> Dict[str, Any]:
    """Write a text-to-image student as a full stock `StableDiffusionPipeline` folder atomically; returns its metadata.

    `components` are the teacher's `vae`, `text_encoder` and `tokenizer` (as `loading.load_sd_teacher` returns them);
    `unet` is the student, guidance-conditioned (`time_cond_proj_dim`: give the trained range `guidance_scale_min/max`),
    folded at one scale (`guidance_scale_folded`) or plain. The scheduler is the stock one that reproduces the student's
    N-step `grid` of the teacher's schedule (`stock_scheduler_for`; `scheduler_config` is the teacher's, e.g. SD's own
    PNDM with steps_offset=1, of which only the schedule is kept), predicting `prediction_type` (default: the
    teacher's). No safety checker (`requires_safety_checker=False`). Metadata, model card and `extra_files` as in
    `save_student`; `save_kwargs` go to `StableDiffusionPipeline.save_pretrained`.
    """
    from diffusers import StableDiffusionPipeline

    missing = [name for name in ("vae", "text_encoder", "tokenizer") if components.get(name) is None]
    if missing:
        raise ValueError(f"save_stock_sd_pipeline needs the teacher's {', '.join(missing)} in `components` (from load_sd_teacher).")
    guidance_embedding_dim = unet.config.get("time_cond_proj_dim")
    if guidance_embedding_dim is not None and (guidance_scale_min is None or guidance_scale_max is None):
        raise ValueError("This student takes a guidance embedding: pass the guidance_scale_min/max it was trained for (its model card states them).")
    teacher_prediction_type = scheduler_config.get("prediction_type", "epsilon")
    config = {**schedule_kwargs(scheduler_config), "prediction_type": prediction_type or teacher_prediction_type}
    stock, exact = stock_scheduler_for(config, num_inference_steps, grid)
    set_sd_steps_offset(stock, num_inference_steps)
    info = student_metadata(
        config, num_inference_steps, teacher=teacher, teacher_prediction_type=teacher_prediction_type, method=method,
        stock_scheduler=type(stock).__name__, stock_exact=exact, grid=grid, guidance_embedding_dim=guidance_embedding_dim,
        guidance_scale_min=guidance_scale_min, guidance_scale_max=guidance_scale_max, guidance_scale_folded=guidance_scale_folded,
        **metadata,
    )
    if grid != "trailing" and exact:
        info["timesteps"] = stock.timesteps.tolist()  # the stock scheduler built this grid from its config alone
    if not exact:
        logger.warning("No stock diffusers scheduler reproduces the %d-step %s grid of this schedule exactly; %s saved it with "
                       "%s (metadata stock_exact=false).", num_inference_steps, grid, folder, type(stock).__name__)
    card = ModelCard(sd_model_card_text(info, card_repo_id or str(folder), card_training))
    pipeline = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"], unet=unet,
        scheduler=stock, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    files = {"README.md": str(card).encode("utf-8"), **(extra_files or {})}
    write_pipeline_folder(folder, pipeline, info, files, **(save_kwargs or {}))
    return info
