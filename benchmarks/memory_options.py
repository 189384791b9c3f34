"""Peak memory and step time of one guided halving update of a text-conditioned student, per memory option.

    python benchmarks/memory_options.py [--device cuda] [--model wide|sd15] [--batch_size 8] [--repeats 5]

Each option runs in a fresh process (so that its peak memory is its own): the update `train_distill.py` makes in
a halving stage of guided distillation (two teacher forwards without grad, one student forward/backward, Adam step),
on a UNet2DConditionModel built from a config (no download): `wide`, a tiny-but-wide CPU model (2 levels of 128/256
channels, cross-attention on 32x32x4 latents), or `sd15`, Stable Diffusion 1.5's UNet shape (860M parameters, 64x64
latents) for a GPU. Options: the fp32 baseline; --gradient_checkpointing; --lora_rank 4; the teacher in bf16 with
bf16 autocast (--mixed_precision bf16); --ema_decay; --use_8bit_adam (where bitsandbytes is installed). Prints a
Markdown table: peak memory above the process's memory once teacher and student are built in fp32, before the
option is applied (CPU: peak RSS; CUDA: peak allocated), median step time, and both as ratios to the baseline.
"""

import argparse
import json
import subprocess
import sys

import torch

OPTIONS = ("baseline", "gradient_checkpointing", "lora_rank_4", "bf16_teacher", "ema", "use_8bit_adam")

CONFIGS = {
    "wide": dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768),  # diffusers' defaults = SD 1.x
}

ONE_OPTION = r'''
import json, re, statistics, sys, time
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers_pd import ProgressiveDistillationScheduler
from diffusers_pd.guidance import add_guidance_embedding, guidance_timestep_cond
from diffusers_pd.loss import ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices
from diffusers_pd.lora import add_lora

option, config, batch_size, repeats, device = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device = torch.device(device)
torch.manual_seed(0)
with device:  # built where they run: initialising 2 x 860M parameters on the CPU takes minutes
    teacher = add_guidance_embedding(UNet2DConditionModel(**config), 256).eval().requires_grad_(False)
    student = UNet2DConditionModel.from_config(teacher.config)
student.load_state_dict(teacher.state_dict())
student.train()

def memory():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024

# the window starts with teacher and student built in fp32: what each option adds (or saves) from here
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**20
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM)
    base = int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024
if option == "gradient_checkpointing":
    student.enable_gradient_checkpointing()
if option == "lora_rank_4":
    add_lora(student, 4)
dtype = torch.bfloat16 if option == "bf16_teacher" else torch.float32
teacher.to(dtype)
parameters = [p for p in student.parameters() if p.requires_grad]
if option == "use_8bit_adam":
    import bitsandbytes
    optimizer = bitsandbytes.optim.Adam8bit(parameters, lr=1e-6)
else:
    optimizer = torch.optim.Adam(parameters, lr=1e-6)
ema = EMAModel(student.parameters(), decay=0.999) if option == "ema" else None
scheduler = ProgressiveDistillationScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012, prediction_type="v_prediction")
scheduler.set_timesteps(4)
loss_fn = ProgressiveDistillationLoss(scheduler, "truncated_snr", "epsilon")
size = config["sample_size"]
latents = torch.randn(batch_size, 4, size, size, device=device)
cond = dict(encoder_hidden_states=torch.randn(batch_size, 77, config["cross_attention_dim"], device=device),
            timestep_cond=guidance_timestep_cond(3.0, 256, batch_size).to(device))
noise, indices = draw_noise_and_grid_indices(latents.shape, 4, torch.Generator().manual_seed(0))
noise = noise.to(device)

def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=option == "bf16_teacher"):
        loss = loss_fn(RawOutput(student, **cond), RawOutput(teacher, **cond), latents, noise, indices).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(student.parameters())

times = []
for _ in range(repeats + 1):
    start = time.perf_counter(); step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps({"peak_mib": memory() - base, "median_s": statistics.median(times[1:]),
                  "trainable": sum(p.numel() for p in parameters), "parameters": sum(p.numel() for p in student.parameters())}))
'''


def run_option(option: str, args) -> dict:
    """One option's measurement in a fresh process (None fields where it cannot run here, with the reason)."""
    result = subprocess.run([sys.executable, "-c", ONE_OPTION, option, json.dumps(CONFIGS[args.model]), str(args.batch_size),
                             str(args.repeats), args.device], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="wide", choices=sorted(CONFIGS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.model} UNet2DConditionModel, batch {args.batch_size}, {args.device}, median of {args.repeats} updates\n")
    print("| option | trainable params | peak memory MiB | / baseline | median step s | / baseline |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    base = None
    for option in OPTIONS:  # each row as it is measured: a run stopped early keeps the rows it finished
        row = run_option(option, args)
        if "error" in row:
            print(f"| {option} | not measured: {row['error'][:80]} | | | | |", flush=True)
            continue
        base = base or row
        print(f"| {option} | {row['trainable']:,} | {row['peak_mib']:.0f} | {row['peak_mib'] / base['peak_mib']:.2f} | "
              f"{row['median_s']:.3f} | {row['median_s'] / base['median_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
