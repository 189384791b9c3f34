"""load_sd_teacher: a Stable Diffusion pipeline folder (built offline by tiny_sd) loads component by component, its
scheduler config read as saved; every incomplete or wrong folder fails with one line naming the fix."""

import json
import shutil

import pytest
import torch
from tiny_sd import SD_SCHEDULER, save_tiny_sd_pipeline

from diffusers_pd.denoiser import Denoiser
from diffusers_pd.loading import is_text_to_image_pipeline, load_sd_teacher


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("teacher") / "sd", seed=3)


def test_sd_pipeline_folder_loads_its_components_and_scheduler_config_as_saved(sd_folder):
    from diffusers import StableDiffusionPipeline

    assert is_text_to_image_pipeline(str(sd_folder))
    components, scheduler_config = load_sd_teacher(str(sd_folder))
    assert sorted(components) == ["text_encoder", "tokenizer", "unet", "vae"]
    assert type(components["unet"]).__name__ == "UNet2DConditionModel" and type(components["vae"]).__name__ == "AutoencoderKL"
    assert scheduler_config["_class_name"] == "PNDMScheduler"
    for key in ("steps_offset", "set_alpha_to_one", "beta_schedule", "beta_start", "beta_end", "skip_prk_steps"):
        assert scheduler_config[key] == SD_SCHEDULER[key]
    assert components["unet"].config._name_or_path == "sd"  # the folder's name, never a machine path
    # the same weights and text embeddings the stock pipeline has
    reference = StableDiffusionPipeline.from_pretrained(sd_folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = components[name].state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert components["tokenizer"]("a photo of a bag").input_ids == reference.tokenizer("a photo of a bag").input_ids
    # the schedule a Denoiser reads from the config is the one the stock scheduler uses
    denoiser = Denoiser(components["unet"], scheduler_config)
    torch.testing.assert_close(denoiser.alphas_cumprod.float(), reference.scheduler.alphas_cumprod, atol=0, rtol=1e-5)  # theirs: float32


def test_old_config_without_prediction_type_reads_as_epsilon(sd_folder, tmp_path):
    folder = tmp_path / "sd14"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    del config["prediction_type"]
    path.write_text(json.dumps(config))
    assert load_sd_teacher(str(folder))[1]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer"])
def test_pipeline_missing_a_component_is_refused(sd_folder, tmp_path, component):
    folder = tmp_path / "broken"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[component] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"has no {component}: a text-to-image teacher needs"):
        load_sd_teacher(str(folder))


def test_wrong_folders_name_the_fix(sd_folder, tmp_path):
    from conftest import save_tiny_teacher

    with pytest.raises(ValueError, match="has no model_index.json"):
        load_sd_teacher(str(sd_folder / "unet"))
    save_tiny_teacher(tmp_path / "ddpm")
    assert not is_text_to_image_pipeline(str(tmp_path / "ddpm"))
    with pytest.raises(ValueError, match="has no vae, text_encoder, tokenizer"):
        load_sd_teacher(str(tmp_path / "ddpm"))
    folder = tmp_path / "no-weights"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match="Cannot load the vae of"):
        load_sd_teacher(str(folder))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_sd_teacher(str(tmp_path / "file.bin"))
