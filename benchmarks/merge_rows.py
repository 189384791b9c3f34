"""Merge the FID rows of several `examples/evaluate.py` runs into one results folder.

    python benchmarks/merge_rows.py --output runs/fashion-sfd/eval --runs runs/eval-a runs/eval-b \
        [--base benchmarks/results/fashion-mnist-cpu/results.json]

On a machine of few cores, one evaluate.py per group of students in parallel (each single-threaded, each into its
own --output_dir) finishes sooner than one process for all; this gathers their rows afterwards. Rows are read from
each run's results.json in the order given, --base's first (an earlier results.json of the same protocol, e.g. the
PD students and the teacher rows); a row of a (sampler, model, NFE) already taken is dropped, and so is a teacher row
of a (sampler, NFE) already taken (the runs evaluate one teacher, perhaps from different paths). Every run must share
--base's protocol (data set, split, reference size, samples, batch, seed, Inception weights), else nothing is
written. Sample grids are copied into <output>/samples/ under names that tell apart students of the same folder name
from different runs; results.json, results.md and fid_vs_nfe.png are written as evaluate.py writes them.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import evaluate  # noqa: E402
from reuse_rows import PROTOCOL as SAMPLING_PROTOCOL  # noqa: E402

PROTOCOL = (*SAMPLING_PROTOCOL, "num_reference", "inception_sha256")  # the settings every merged row must share


def load_run(path: str) -> dict:
    """A run's results.json (a folder or the file itself), with its folder."""
    path = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist: pass evaluate.py output folders (or their results.json).")
    with open(path) as handle:
        report = json.load(handle)
    return dict(report, folder=os.path.dirname(os.path.abspath(path)), path=path)


def merge(runs: list) -> list:
    """The rows of `runs` in order, the first of each (sampler, model, NFE) kept (teacher rows: of each (sampler, NFE)),
    each with its source sample path."""
    protocol = {key: runs[0]["config"].get(key) for key in PROTOCOL}
    for run in runs[1:]:
        other = [key for key in PROTOCOL if run["config"].get(key) != protocol[key]]
        if other:
            raise SystemExit(f"error: {run['path']} used another protocol than {runs[0]['path']} ({', '.join(other)}): "
                             "its FIDs are not comparable; evaluate those rows again.")
    rows, seen = [], set()
    for run in runs:
        for row in run["rows"]:
            teacher = row["sampler"].startswith("teacher")  # one teacher for all runs, whatever path each loaded it from
            key = (row["sampler"], None if teacher else os.path.normpath(row["model"]), row["nfe"])
            if key not in seen:
                seen.add(key)
                rows.append(dict(row, source=os.path.join(run["folder"], row["samples"])))
    return rows


def main(argv=None) -> None:
    """Write the merged results folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="evaluate.py output folders (or their results.json).")
    parser.add_argument("--base", default=None, help="An earlier results.json whose rows come first.")
    parser.add_argument("--output", required=True, help="The merged results folder.")
    args = parser.parse_args(argv)
    runs = [load_run(path) for path in ([args.base] if args.base else []) + args.runs]
    rows = merge(runs)
    # sample file names as evaluate.py names them, made unique across runs
    named = evaluate.name_rows_uniquely([evaluate.Row(r["sampler"], r["model"], r["nfe"], None, None) for r in rows])
    os.makedirs(os.path.join(args.output, "samples"), exist_ok=True)
    results = []
    for row, name in zip(rows, named):
        samples = os.path.join("samples", f"{name.slug}.png")
        if os.path.isfile(row["source"]):
            shutil.copyfile(row["source"], os.path.join(args.output, samples))
        results.append({key: value for key, value in row.items() if key != "source"} | {"samples": samples})
    config = dict(runs[-1]["config"], output_dir=args.output, merged_from=[run["path"] for run in runs])
    evaluate.write_outputs(args.output, config, results)
    print(evaluate.markdown_table(results))


if __name__ == "__main__":
    main()
