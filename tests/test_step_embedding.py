"""SFD-v step-count conditioning: a zero-initialised class embedding, and its exact fold into a plain UNet2DModel."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DModel

from diffusers_pd.step_embedding import add_step_embedding, fold_step_embedding


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 8, 8, generator=generator), torch.tensor([999.0, 412.5, 7.0])


def test_untrained_step_conditioned_student_equals_the_teacher():
    teacher = tiny_unet()
    student = add_step_embedding(teacher, max_nfe=5)
    assert student.config.num_class_embeds == 6 and teacher.class_embedding is None
    z, t = inputs()
    with torch.no_grad():
        expected = teacher(z, t).sample
        for nfe in range(6):
            assert torch.equal(student(z, t, class_labels=torch.full((3,), nfe)).sample, expected)


@pytest.mark.parametrize("nfe", [2, 5])
def test_folded_unet_equals_the_conditioned_one(tmp_path, nfe):
    student = add_step_embedding(tiny_unet(), max_nfe=5)
    with torch.no_grad():
        torch.nn.init.normal_(student.class_embedding.weight, std=0.5)
    folded = fold_step_embedding(student, nfe)
    assert type(folded) is UNet2DModel and folded.class_embedding is None and folded.config.num_class_embeds is None
    z, t = inputs(nfe)
    with torch.no_grad():
        conditioned = student(z, t, class_labels=torch.full((3,), nfe)).sample
        other = student(z, t, class_labels=torch.full((3,), 1)).sample
        assert (conditioned - other).abs().max() > 1e-3  # the embedding matters, so the fold is tested
        torch.testing.assert_close(folded(z, t).sample, conditioned, atol=1e-6, rtol=0)
        folded.save_pretrained(tmp_path / "unet")  # a plain folder that stock diffusers loads
        reloaded = UNet2DModel.from_pretrained(tmp_path / "unet")
        torch.testing.assert_close(reloaded(z, t).sample, conditioned, atol=1e-6, rtol=0)


def test_folded_conditional_unet_equals_the_conditioned_one():
    """SFD-v of a Stable Diffusion teacher: the same slot and fold in a UNet2DConditionModel (text input kept)."""
    from diffusers import UNet2DConditionModel
    from tiny_sd import TEXT_DIM, tiny_cond_unet

    teacher = tiny_cond_unet()
    student = add_step_embedding(teacher, max_nfe=4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, text = torch.tensor([999.0, 250.5]), torch.randn(2, 16, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(student(z, t, text, class_labels=torch.tensor([3, 3])).sample, teacher(z, t, text).sample)
        torch.nn.init.normal_(student.class_embedding.weight, std=0.5)
        folded = fold_step_embedding(student, 3)
        assert type(folded) is UNet2DConditionModel and folded.config.num_class_embeds is None
        conditioned = student(z, t, text, class_labels=torch.tensor([3, 3])).sample
        assert (conditioned - student(z, t, text, class_labels=torch.tensor([1, 1])).sample).abs().max() > 1e-3
        torch.testing.assert_close(folded(z, t, text).sample, conditioned, atol=1e-6, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="already has a class embedding"):
        add_step_embedding(tiny_unet(num_class_embeds=10), max_nfe=5)
    with pytest.raises(ValueError, match="add_step_embedding"):
        fold_step_embedding(tiny_unet(), 2)
    with pytest.raises(ValueError, match="outside the step embedding"):
        fold_step_embedding(add_step_embedding(tiny_unet(), max_nfe=3), 4)
