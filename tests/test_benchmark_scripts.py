"""Every benchmark script imports: a renamed library function breaks the benchmark run that needs it (hours in), not
this test. The scripts are imported (their main() is not run) in one subprocess with the benchmarks folder first on
the path, as `python benchmarks/x.py` sees it."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

IMPORT_EACH = r"""
import importlib, json, sys, traceback
sys.path.insert(0, sys.argv[1])
failed = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-2)
print(json.dumps(failed))
"""


def test_every_benchmark_script_imports():
    scripts = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert {"memory_options", "text_to_image_teacher", "text_to_image_eval", "sfd_report"} <= set(scripts)
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(BENCHMARKS), *scripts], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
