"""Reuse the teacher rows of an earlier `examples/evaluate.py` run in a new one, instead of sampling them again.

    python benchmarks/reuse_rows.py --from benchmarks/results/fashion-mnist-cpu/results.json -- \
        <the evaluate.py arguments of the new run>

evaluate.py reuses a row only when `<output_dir>/rows/<row>.json` holds it under the same key (everything its FID
depends on). This writes such files for the new run's teacher rows (DDIM, DPM-Solver++(2M), ceiling) that the earlier
results.json has at the same NFE, after checking that both runs share the protocol (data set, split, reference size,
samples, batch, seed, Inception weights). The teacher itself is taken on trust: pass the same teacher weights (the
earlier results.json keeps no weight hash). Student rows are never reused.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import evaluate  # noqa: E402

from diffusers_pd.atomic import atomic_write_text  # noqa: E402
from diffusers_pd.evaluation import default_inception_path, file_sha256  # noqa: E402

PROTOCOL = ("dataset_name", "dataset_config_name", "train_data_dir", "split", "num_samples", "batch_size", "seed")


def main(argv=None) -> None:
    """Write rows/<row>.json for every teacher row of the new run found in the earlier results.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="results.json of the earlier evaluate.py run.")
    parser.add_argument("evaluate_args", nargs=argparse.REMAINDER, help="-- then the new run's evaluate.py arguments.")
    args = parser.parse_args(argv)
    eval_args = evaluate.parse_args([a for a in args.evaluate_args if a != "--"] if args.evaluate_args else [])
    with open(args.source) as handle:
        source = json.load(handle)
    config = source["config"]
    inception_sha256 = file_sha256(eval_args.inception_weights or default_inception_path())
    mismatched = [k for k in PROTOCOL if config.get(k) != getattr(eval_args, k)]
    if config["inception_sha256"] != inception_sha256:
        mismatched.append("inception_sha256")
    if mismatched:
        sys.exit(f"error: {args.source} used another protocol ({', '.join(mismatched)}): evaluate those rows again.")

    teacher = evaluate.load_unet_pipeline(eval_args.teacher, "cpu")
    unet_sha256 = evaluate.weights_sha256(teacher.unet)
    earlier = {(r["sampler"], r["nfe"]): r for r in source["rows"] if r["sampler"].startswith("teacher")}
    source_dir = os.path.dirname(os.path.abspath(args.source))
    for row in evaluate.build_rows(eval_args, teacher, {}):
        result = earlier.get((row.sampler, row.nfe))
        if result is None:
            print(f"{row.sampler} NFE {row.nfe}: not in {args.source}, evaluate.py will compute it")
            continue
        key = evaluate.row_key(row, eval_args, config["num_reference"], inception_sha256, unet_sha256)
        samples = os.path.join("samples", f"{row.slug}.png")
        os.makedirs(os.path.join(eval_args.output_dir, "samples"), exist_ok=True)
        shutil.copyfile(os.path.join(source_dir, result["samples"]), os.path.join(eval_args.output_dir, samples))
        reused = {**result, "model": row.model, "samples": samples, "reused_from": args.source}
        path = os.path.join(eval_args.output_dir, "rows", f"{row.slug}.json")
        atomic_write_text(path, json.dumps({"key": key, "result": reused}, indent=2))
        print(f"{row.sampler} NFE {row.nfe}: FID {result['fid']:.2f} reused from {args.source}")


if __name__ == "__main__":
    main()
