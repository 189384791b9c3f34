"""Cost of one distillation step (2 teacher forwards + student forward/backward/update) over one plain training step.

    python benchmarks/distill_step_cost.py [--device cuda] [--model cifar] [--batch_size 128] [--repeats 30]

The floor is 1 + 2 x (teacher forward / training step): about 1.65 for an fp32 teacher. Prints a Markdown table of
median times and ratios, all measured in one interleaved run; also peak memory where CUDA is available.
"""

import copy
import subprocess
import sys

import torch

from common import benchmark_parser, benchmark_unet, interleaved_medians, machine
from diffusers_pd import ProgressiveDistillationScheduler
from diffusers_pd.loss import DiffusionLoss, ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices


class Step:
    """One optimizer update of `loss(student, ...)`, with the teacher run as configured."""

    def __init__(self, student, teacher, images, num_steps, teacher_mode="no_grad", teacher_dtype=None, distill=True):
        self.student, self.teacher, self.images, self.distill = student, teacher, images, distill
        self.optimizer = torch.optim.Adam(student.parameters(), lr=1e-6)
        scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
        scheduler.set_timesteps(num_steps)
        self.distill_loss = ProgressiveDistillationLoss(scheduler, "truncated_snr")
        self.plain_loss = DiffusionLoss(scheduler, "snr_plus_one")
        self.noise, self.indices = draw_noise_and_grid_indices(images.shape, num_steps, torch.Generator().manual_seed(0))
        self.noise = self.noise.to(images.device)
        self.teacher_mode, self.teacher_dtype = teacher_mode, teacher_dtype

    def teacher_fn(self, z, t):
        """The teacher under inference mode / no_grad, optionally in bf16 autocast."""
        context = torch.inference_mode() if self.teacher_mode == "inference_mode" else torch.no_grad()
        with context, torch.autocast(self.images.device.type, dtype=self.teacher_dtype, enabled=self.teacher_dtype is not None):
            return self.teacher(z, t).sample.float()

    def __call__(self):
        if self.distill:
            loss = self.distill_loss(RawOutput(self.student), self.teacher_fn, self.images, self.noise, self.indices)
        else:
            loss = self.plain_loss(RawOutput(self.student), self.images, self.noise, self.indices * 0 + 500)
        loss.mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peak_rss_growth_mib(variant: str, model: str, batch_size: int) -> float:
    """Peak RSS above the pre-step RSS over 3 steps of `variant`, in a fresh process (Linux; CUDA has its own counter)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks');"
        "import distill_step_cost as b, copy; from common import benchmark_unet;"
        f"t = benchmark_unet('{model}').eval().requires_grad_(False); x = torch.rand({batch_size}, 3, 32, 32) * 2 - 1;"
        f"step = b.Step(copy.deepcopy(t).train().requires_grad_(True), t, x, 8, distill={variant == 'distill'});"
        "import gc, re; gc.collect(); kib = lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read())[1]);"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kib('VmRSS');"  # '5' resets the peak (VmHWM)
        "[step() for _ in range(3)];"
        "print((kib('VmHWM') - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--compile", action="store_true", help="Also measure torch.compile'd student and teacher.")
    args = parser.parse_args()
    device = torch.device(args.device)
    teacher = benchmark_unet(args.model).to(device).eval().requires_grad_(False)
    images = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1

    def student():
        return copy.deepcopy(teacher).train().requires_grad_(True)

    forward_input = torch.randn_like(images)
    t = torch.full((args.batch_size,), 500, device=device)

    def teacher_forward():
        with torch.no_grad():
            teacher(forward_input, t)

    variants = {
        "train step (plain)": Step(student(), teacher, images, 8, distill=False),
        "teacher forward": teacher_forward,
        "distill step, teacher no_grad": Step(student(), teacher, images, 8),
        "distill step, teacher inference_mode": Step(student(), teacher, images, 8, teacher_mode="inference_mode"),
        "distill step, teacher bf16 autocast": Step(student(), teacher, images, 8, teacher_dtype=torch.bfloat16),
    }
    teacher_cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    variants["distill step, channels_last"] = Step(student().to(memory_format=torch.channels_last), teacher_cl,
                                                   images.contiguous(memory_format=torch.channels_last), 8)
    if args.compile:
        compiled_teacher = torch.compile(copy.deepcopy(teacher))
        variants["train step (plain), compiled"] = Step(torch.compile(student()), teacher, images, 8, distill=False)
        variants["distill step, compiled"] = Step(torch.compile(student()), compiled_teacher, images, 8)
    medians = interleaved_medians(variants, args.repeats, device)
    train = medians["train step (plain)"]
    floor = 1 + 2 * medians["teacher forward"] / train
    print(f"\nDistillation step cost: {args.model} UNet, batch {args.batch_size}, {machine(device)}, median of {args.repeats}\n")
    print("| variant | median ms | / plain train step |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / train:.2f} |")
    print(f"\nfloor 1 + 2 x forward / train step = {floor:.2f}")
    if device.type == "cuda":
        peaks = {}
        for name in ("train step (plain)", "distill step, teacher no_grad"):
            torch.cuda.reset_peak_memory_stats(device)
            variants[name]()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
        label = "peak CUDA memory allocated"
    else:
        peaks = {"train step (plain)": peak_rss_growth_mib("plain", args.model, args.batch_size),
                 "distill step, teacher no_grad": peak_rss_growth_mib("distill", args.model, args.batch_size)}
        label = "peak RSS growth over 3 steps"
    for name, mib in peaks.items():
        print(f"{label}, {name}: {mib:.0f} MiB")
    print(f"peak memory ratio, distill / train: {peaks['distill step, teacher no_grad'] / peaks['train step (plain)']:.2f}")


if __name__ == "__main__":
    main()
