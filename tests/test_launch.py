"""launch.cast_frozen: the frozen teacher's cast to the mixed-precision dtype, without diffusers' spurious warning."""

import io
import logging

import torch
from conftest import tiny_unet

from diffusers_pd import launch


def test_cast_frozen_casts_every_weight_as_module_to_does():
    model, reference = tiny_unet(), tiny_unet()
    torch.nn.Module.to(reference, torch.bfloat16)
    # diffusers' own handler holds the sys.stderr of its import time: listen on its logger instead
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        assert launch.cast_frozen(model, torch.bfloat16) is model
        tiny_unet().to(torch.bfloat16)  # the warning cast_frozen avoids, seen through the same handler
    finally:
        diffusers_logger.removeHandler(handler)
    assert log.getvalue().count("kept in float32") == 1
    for (name, tensor), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor, expected), name


def test_cast_frozen_leaves_a_model_already_in_the_dtype_untouched():
    model = tiny_unet()
    pointers = [p.data_ptr() for p in model.parameters()]
    launch.cast_frozen(model, torch.float32)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert launch.weight_dtype("no") == torch.float32 and launch.weight_dtype("bf16") == torch.bfloat16
