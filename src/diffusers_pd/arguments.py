"""Command-line arguments shared by the training scripts, named as in diffusers' example scripts.

Standard library only: a script builds its parser and answers `--help` (or an argument error) before it imports
torch, diffusers or accelerate. Every flag has a help text; `argparse.ArgumentDefaultsHelpFormatter` appends its
default, so a help text never states the default itself (a `None` default is explained as "None: ...").
"""

import argparse
from typing import Optional


def add_data_args(parser: argparse.ArgumentParser, resolution_help: str) -> None:
    """Data arguments, named as in diffusers' train_unconditional.py (`resolution_help`: what None means here)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub data set, or an offline built-in: `digits` (sklearn 8x8) or `fashion_mnist` (Debian "
                       "package dataset-fashion-mnist).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config of a Hub data set; None: its default.")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="A folder of images (an `imagefolder` data set), instead of --dataset_name.")
    group.add_argument("--image_column", type=str, default=None,
                       help="Column holding the images; None: the data set's only image column.")
    group.add_argument("--split", type=str, default="train", help="Split of the data set to train on.")
    group.add_argument("--cache_dir", type=str, default=None, help="`datasets` cache folder; None: its default.")
    group.add_argument("--resolution", type=int, default=None, help=f"Image size; {resolution_help}")
    group.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                       help="Center-crop non-square images before resizing (else resize only).")
    group.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes (0: in the main one).")


def add_optimization_args(
    parser: argparse.ArgumentParser, learning_rate: Optional[float], ema_decay: Optional[float] = None,
    learning_rate_help: str = "",
) -> None:
    """Optimizer, precision and reproducibility arguments (`ema_decay`: the script's default, None = off;
    `learning_rate_help`: what a None learning rate means)."""
    group = parser.add_argument_group("optimization")
    group.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per update (global batch = batch x processes x this).")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help=f"Adam's peak learning rate{'; ' + learning_rate_help if learning_rate_help else ''}.")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam's beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam's beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=0.0, help="Adam's (L2) weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam's epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: no clipping).")
    group.add_argument("--ema_decay", type=float, default=ema_decay,
                       help="EMA decay of the trained weights; None or 0: no EMA.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Autocast precision; None: accelerate's configuration (`accelerate config`).")
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    group.add_argument("--seed", type=int, default=0, help="Seed of every random draw (data order, noise, timesteps).")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """Memory and speed options for large students, named as in diffusers' train_text_to_image(_lora).py."""
    group = parser.add_argument_group("memory and speed")
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit Adam (needs `pip install bitsandbytes`).")
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (faster, less exact).")
    group.add_argument("--lora_rank", type=int, default=None,
                       help="Train LoRA adapters of this rank on the attention projections instead of the whole student "
                       "(fused into the weights at each stage's end; needs peft); None: the whole student.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator; None: the rank.")


def add_output_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """Output, logging, checkpointing and Hub arguments."""
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", type=str, default=output_dir, help="Where every output and checkpoint goes.")
    group.add_argument("--overwrite_output_dir", "--overwrite", action="store_true",
                       help="Allow writing into a non-empty output_dir (it is not cleared).")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to output_dir.")
    group.add_argument("--report_to", type=str, default="auto",
                       help="`tensorboard`, `wandb`, `all`, `none`; `auto`: tensorboard when installed.")
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="Save a resumable checkpoint every N updates (and on Ctrl-C / SIGTERM).")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most this many checkpoints; None: keep all.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="A checkpoint folder, or `latest` (the newest in output_dir); None: start from scratch. "
                            "A finished run resumed with a smaller --end_steps goes on to the new stages.")
    group.add_argument("--num_grid_images", type=int, default=16, help="Images in each samples.png grid.")
    group.add_argument("--push_to_hub", action="store_true", help="Push the result to the Hub repo --hub_model_id.")
    group.add_argument("--hub_model_id", type=str, default=None, help="The Hub repo to push to, e.g. you/name.")
    group.add_argument("--hub_token", type=str, default=None,
                       help="None: HF_TOKEN or your `hf auth login` token (prefer those: an argument shows in `ps`).")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo private.")


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the options written out in `argv` (`--flag` or `--flag=value`), whatever their values."""
    words = {str(word).split("=", 1)[0] for word in argv if str(word).startswith("--")}
    return {action.dest for action in parser._actions if words.intersection(action.option_strings)}
