"""Sampling overhead: wall time of the pipeline at N steps over N x one UNet forward of the same batch.

    python benchmarks/sampling_overhead.py [--device cuda] [--model cifar] [--batch_size 64] [--repeats 20]

Target: at most 1.05 for N in {1, 2, 4, 8}. Both our `ProgressiveDistillationPipeline` and the stock
`DDPMPipeline` that a saved student loads as are measured, all in one interleaved run.
"""

import tempfile

import torch
from diffusers import DiffusionPipeline

from common import benchmark_parser, benchmark_unet, interleaved_medians, machine
from diffusers_pd import ProgressiveDistillationPipeline, ProgressiveDistillationScheduler, initial_noise, save_student


def main():
    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    device = torch.device(args.device)
    unet = benchmark_unet(args.model).to(device).eval()
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    ours = ProgressiveDistillationPipeline(unet=unet, scheduler=scheduler).to(device)
    ours.set_progress_bar_config(disable=True)
    folder = tempfile.mkdtemp() + "/student"
    rows = []
    for num_steps in (1, 2, 4, 8):
        save_student(folder, unet, scheduler, num_steps)
        stock = DiffusionPipeline.from_pretrained(folder).to(device)
        stock.set_progress_bar_config(disable=True)
        latents = initial_noise(unet, args.batch_size, torch.Generator().manual_seed(0)).to(device)
        t = torch.full((args.batch_size,), 999, device=device)

        def forwards(n=num_steps):
            with torch.no_grad():
                for _ in range(n):
                    unet(latents, t)

        def run_ours(n=num_steps):
            ours(latents=latents, num_inference_steps=n, output_type="pt")

        def run_stock(n=num_steps):
            stock(batch_size=args.batch_size, num_inference_steps=n, output_type="pt",
                  generator=torch.Generator(device).manual_seed(0))

        medians = interleaved_medians({"forwards": forwards, "ours": run_ours, "stock": run_stock}, args.repeats, device)
        rows.append((num_steps, medians))
    print(f"\nSampling overhead: {args.model} UNet, batch {args.batch_size}, {machine(device)}, median of {args.repeats}\n")
    print("| N | N x forward ms | ProgressiveDistillationPipeline ms | ratio | stock DDPMPipeline ms | ratio |")
    print("|---|---|---|---|---|---|")
    for num_steps, m in rows:
        print(f"| {num_steps} | {m['forwards'] * 1e3:.1f} | {m['ours'] * 1e3:.1f} | {m['ours'] / m['forwards']:.3f} "
              f"| {m['stock'] * 1e3:.1f} | {m['stock'] / m['forwards']:.3f} |")


if __name__ == "__main__":
    main()
