"""LoRA students (peft): low-rank adapters on a UNet's attention projections, fused into plain weights at export.

`add_lora` gives a student rank-r adapters W + (alpha / r) B A on its attention projections with B = 0, so the
untrained student equals the teacher; only the adapters (and any layer the method adds, e.g. a guidance or
step-count embedding) train. `fuse_lora` folds each adapter into its base weight and removes it, so the student
becomes a plain diffusers UNet again: the next stage's teacher, and the saved pipeline's UNet (no peft needed to
load it).
"""

from typing import Iterable

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: torch.nn.Module, rank: int, *, alpha: float = None, trainable: Iterable[str] = (),
             targets=LORA_TARGETS) -> torch.nn.Module:
    """`unet` (in place) with rank-`rank` LoRA adapters (B = 0: outputs unchanged) on its attention projections;
    only the adapters and the parameters named in `trainable` require grad."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"--lora_rank {rank}: a LoRA rank is at least 1.")
    if not any(name.endswith(tuple("." + target for target in targets)) for name, _ in unet.named_modules()):
        raise ValueError(f"--lora_rank: this UNet has no attention projections ({', '.join(targets)}) to adapt: "
                         "drop --lora_rank to train it whole.")
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets)), unet)
    trainable = set(trainable)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name or name in trainable)
    return unet


def fuse_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """`unet` (in place) with W <- W + (alpha / r) B A in every adapted layer and the adapters removed."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
    return unet


def has_lora(unet: torch.nn.Module) -> bool:
    """Whether `unet` holds LoRA adapters."""
    return any("lora_" in name for name, _ in unet.named_parameters())
