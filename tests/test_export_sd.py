"""save_stock_sd_pipeline: a text-to-image student saved as a stock StableDiffusionPipeline folder that plain diffusers
(a subprocess that never imports diffusers_pd) loads and samples at exactly N UNet calls, giving the latents of the
project's own DDIM sampler on the student's grid."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_sd import SD_SCHEDULER, tiny_sd_components

from diffusers_pd.denoiser import Denoiser
from diffusers_pd.export import save_stock_sd_pipeline
from diffusers_pd.grids import student_grid
from diffusers_pd.guidance import add_guidance_embedding, fold_guidance_embedding, guidance_timestep_cond
from diffusers_pd.solvers import ddim_trajectory
from diffusers_pd.text_image_data import encode_prompts

PROMPTS = ["a photo of a sneaker", "a photo of a dress"]
DIM = 8

STOCK_SD_SAMPLER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    reports = []
    for job in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])
        pipe.set_progress_bar_config(disable=True)
        batches = []
        pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
        with torch.no_grad():
            latents = pipe(job["prompts"], num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"],
                           output_type="latent", latents=torch.from_numpy(np.load(job["noise"]))).images
            images = pipe(job["prompts"], num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"],
                          output_type="np").images  # the whole pipeline, VAE decoding included, runs
        np.save(job["out"], latents.numpy())
        reports.append(dict(pipeline=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__, unet_batches=batches,
                            metadata=pipe.scheduler.config["_diffusers_pd"], safety_checker=repr(pipe.safety_checker),
                            image_shape=list(images.shape)))
    assert "diffusers_pd" not in sys.modules
    print(json.dumps(reports))
    """
)


def sample_in_plain_diffusers(jobs):
    result = subprocess.run([sys.executable, "-c", STOCK_SD_SAMPLER, json.dumps(jobs)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps_offset" not in result.stderr  # StableDiffusionPipeline found nothing to "fix" in the scheduler
    return json.loads(result.stdout.strip().splitlines()[-1])


def our_latents(unet, components, steps, guidance_scale, noise):
    """The project's own sampler: DDIM (ddim_trajectory) over a Denoiser on the student's trailing grid."""
    with torch.no_grad():
        cond = {"encoder_hidden_states": encode_prompts(components["tokenizer"], components["text_encoder"], PROMPTS)}
        if unet.config.time_cond_proj_dim is not None:
            cond["timestep_cond"] = guidance_timestep_cond(guidance_scale, DIM, batch_size=len(PROMPTS))
        return ddim_trajectory(Denoiser(unet, SD_SCHEDULER), noise, student_grid(SD_SCHEDULER, steps), **cond)[-1]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The teacher's components and a guidance-conditioned student whose guidance input is live (random cond_proj)."""
    components = tiny_sd_components(tmp_path_factory.mktemp("vocab"), seed=0)
    unet = add_guidance_embedding(components["unet"], DIM)
    with torch.no_grad():
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.3)
    return components, unet


def test_saved_students_sample_in_plain_diffusers_at_n_calls_as_our_sampler(student, tmp_path):
    components, unet = student
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "noise.npy", noise.numpy())
    folded = fold_guidance_embedding(unet, 3.0)
    saved = {
        "conditioned-4": save_stock_sd_pipeline(tmp_path / "conditioned-4", components, unet, 4, SD_SCHEDULER, teacher="tests/sd",
                                                guidance_scale_min=1.0, guidance_scale_max=5.0, stage=1),
        "conditioned-3": save_stock_sd_pipeline(tmp_path / "conditioned-3", components, unet, 3, SD_SCHEDULER, teacher="tests/sd",
                                                guidance_scale_min=1.0, guidance_scale_max=5.0),
        "folded-4": save_stock_sd_pipeline(tmp_path / "folded-4", components, folded, 4, SD_SCHEDULER, teacher="tests/sd",
                                           guidance_scale_folded=3.0),
    }
    cases = [("conditioned-4", 4, 1.0), ("conditioned-4", 4, 4.0), ("conditioned-3", 3, 2.5), ("folded-4", 4, 1.0)]
    jobs = [dict(folder=str(tmp_path / name), prompts=PROMPTS, steps=steps, guidance_scale=s, noise=str(tmp_path / "noise.npy"),
                 out=str(tmp_path / f"{name}-{s}.npy")) for name, steps, s in cases]
    reports = sample_in_plain_diffusers(jobs)

    expected_scheduler = {"conditioned-4": "DDIMScheduler", "conditioned-3": "DPMSolverMultistepScheduler", "folded-4": "DDIMScheduler"}
    for (name, steps, s), job, report in zip(cases, jobs, reports):
        assert report["pipeline"] == "StableDiffusionPipeline" and report["safety_checker"] == "None"
        assert report["scheduler"] == expected_scheduler[name] and report["metadata"]["stock_exact"] is True
        assert report["unet_batches"][:steps] == [len(PROMPTS)] * steps  # N calls at batch = prompts, no uncond batch
        assert len(report["unet_batches"]) == 2 * steps and report["image_shape"] == [2, 16, 16, 3]
        if name == "folded-4":  # the folded student at s = 3 samples what the conditioned one samples at s = 3
            expected = our_latents(unet, components, steps, 3.0, noise)
        else:
            expected = our_latents(unet, components, steps, s, noise)
        stock = np.load(job["out"])
        assert np.abs(stock).std() > 0.1
        np.testing.assert_allclose(stock, expected.numpy(), atol=1e-5, rtol=1e-6)  # float32 latents up to ~50
    assert np.abs(np.load(jobs[0]["out"]) - np.load(jobs[1]["out"])).max() > 1e-3  # the guidance input is live

    info = saved["conditioned-4"]
    assert info["guidance_scale_min"] == 1.0 and info["guidance_scale_max"] == 5.0 and info["guidance_embedding_dim"] == DIM
    assert info["timesteps"] == [999, 749, 499, 249] and info["stage"] == 1 and info["method"] == "guided_distillation"
    model_index = json.loads((tmp_path / "conditioned-4" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline" and model_index["requires_safety_checker"] is False
    assert model_index["safety_checker"] == [None, None]
    card = (tmp_path / "conditioned-4" / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "Negative prompts are unsupported" in card and "[1.0, 5.0]" in card
    assert "num_inference_steps=4, guidance_scale=5.0" in card and str(tmp_path) not in card
    assert "Call the pipeline with `guidance_scale=1`" in (tmp_path / "folded-4" / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary folder left


def test_bad_input(student, tmp_path):
    components, unet = student
    with pytest.raises(ValueError, match="guidance_scale_min/max it was trained for"):
        save_stock_sd_pipeline(tmp_path / "s", components, unet, 4, SD_SCHEDULER)
    with pytest.raises(ValueError, match="needs the teacher's vae"):
        save_stock_sd_pipeline(tmp_path / "s", {**components, "vae": None}, unet, 4, SD_SCHEDULER, guidance_scale_min=1, guidance_scale_max=2)
    assert not (tmp_path / "s").exists()
