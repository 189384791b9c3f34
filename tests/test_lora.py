"""LoRA students: zero-initialised adapters leave the UNet unchanged; fusing reproduces the adapted UNet exactly as a
plain diffusers UNet (same state-dict keys as the teacher); only adapters and named new layers train."""

import copy

import pytest
import torch
from tiny_sd import tiny_cond_unet

from diffusers_pd.lora import add_lora, fuse_lora, has_lora


def outputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z, c = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 16, 32, generator=generator)
    with torch.no_grad():
        return unet(z, torch.tensor([10.0, 700.0]), encoder_hidden_states=c).sample


def test_untrained_adapters_change_nothing_and_fusing_gives_the_adapted_plain_unet():
    teacher = tiny_cond_unet(0)
    student = add_lora(copy.deepcopy(teacher), 4, trainable={"conv_in.weight"})
    assert has_lora(student) and torch.equal(outputs(student), outputs(teacher))
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable - {"conv_in.weight"}) and "conv_in.weight" in trainable
    with torch.no_grad():  # what training would do: move the adapters
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    adapted = outputs(student)
    assert (adapted - outputs(teacher)).abs().max() > 1e-3
    fused = fuse_lora(student)
    assert not has_lora(fused) and set(fused.state_dict()) == set(teacher.state_dict())
    assert torch.allclose(outputs(fused), adapted, atol=1e-5)
    untouched = [k for k in teacher.state_dict() if not any(t in k for t in ("to_q", "to_k", "to_v", "to_out"))]
    assert all(torch.equal(fused.state_dict()[k], teacher.state_dict()[k]) for k in untouched)


def test_a_unet_without_attention_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False)
    with pytest.raises(ValueError, match="no attention projections .* drop --lora_rank"):
        add_lora(unet, 2)
