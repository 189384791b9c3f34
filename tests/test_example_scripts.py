"""What a newcomer meets first: the README's set-up installs everything the example scripts import, and every
script's `--help` answers without torch, diffusers or the optional extras, documenting every flag and its default.
"""

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Imported only when a user picks them (`--report_to tensorboard / wandb`): not required by any script.
CHOSEN_BY_FLAG = {"tensorboard", "wandb", "peft", "bitsandbytes"}  # --report_to, --lora_rank, --use_8bit_adam
# Heavy or optional: `--help` must answer without any of them.
BLOCKED = ("torch", "diffusers", "accelerate", "transformers", "datasets", "huggingface_hub", "safetensors", "numpy",
           "matplotlib", "torchmetrics", "scipy", "tensorboard", "PIL", "sklearn", "tqdm", "peft")

HELP_WITHOUT = """
import runpy, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)

BLOCKED = set(sys.argv[2].split(","))
sys.meta_path.insert(0, Blocker())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def readme_setup_extras() -> set:
    """The extras of the package in the README's set-up command (`pip install -e ".[eval]"` -> {"eval"})."""
    setup = re.search(r"## Two commands.*?```bash\n(.*?)```", README, flags=re.S)[1]
    match = re.search(r'pip install -e "?\.(?:\[([\w,]+)\])?"?', setup)
    assert match, f"no `pip install -e .` in the README's set-up: {setup}"
    return set((match[1] or "").split(",")) - {""}


def package_requirements(tmp_path) -> list:
    """Requires-Dist of the package as pip installs it from this checkout's setup.py (fresh: the installed copy of
    the metadata may predate a change to setup.py)."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    distribution = importlib.metadata.PathDistribution(next(tmp_path.glob("*.egg-info")))
    assert canonicalize_name(distribution.metadata["Name"]) == "diffusers-pd"
    return [Requirement(line) for line in distribution.requires]


def imported_modules(path: Path, seen: set) -> set:
    """Top-level modules imported by a file and, transitively, by the diffusers_pd modules it imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative, inside diffusers_pd
            names = [f"diffusers_pd.{node.module}" if node.module else "diffusers_pd"]
        else:
            continue
        for name in names:
            found.add(name.split(".")[0])
            spec = None
            if name.startswith("diffusers_pd"):
                try:
                    spec = importlib.util.find_spec(name)
                except ImportError:  # `from diffusers_pd.atomic import atomic_write_text`: a name, not a module
                    pass
            if spec is not None and spec.origin and spec.origin.endswith(".py") and spec.origin not in seen:
                seen.add(spec.origin)
                found |= imported_modules(Path(spec.origin), seen)
    return found


def test_readme_setup_installs_every_module_the_example_scripts_import(tmp_path):
    extras = readme_setup_extras()
    installed = {canonicalize_name(req.name) for req in package_requirements(tmp_path)
                 if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras)}
    providers = importlib.metadata.packages_distributions()
    for script in SCRIPTS:
        modules = imported_modules(script, set()) - set(sys.stdlib_module_names) - {"diffusers_pd", "__future__"}
        modules -= CHOSEN_BY_FLAG
        assert {"torch", "diffusers"} <= modules  # the scan sees through the lazy package and the scripts
        missing = {m for m in modules if not {canonicalize_name(d) for d in providers.get(m, [m])} & installed}
        assert not missing, f"{script.name} imports {sorted(missing)}, which the README's set-up does not install"
    assert "matplotlib" in imported_modules(ROOT / "examples" / "evaluate.py", set())  # the case of the issue


def help_entries(text: str) -> dict:
    """{option strings: help text} of an argparse --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            option, _, rest = line.strip().partition("  ")
            current = option
            entries[current] = rest.strip()
        elif current and re.match(r"^ {6,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_help_answers_without_heavy_modules_and_documents_every_flag_and_default(script):
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT, str(script), ",".join(BLOCKED)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = help_entries(result.stdout)
    assert len(entries) >= 15 if script.name != "evaluate.py" else len(entries) >= 10
    for option, text in entries.items():
        if option.startswith("-h"):
            continue
        assert re.search(r"\w.*\(default: [^)]*\)$", text), f"{script.name} {option}: no help or no default: {text!r}"
        assert text.lower().count("default:") == 1, f"{script.name} {option} states its default twice: {text!r}"
    if script.name == "train_teacher.py":  # nothing about distillation in the teacher's help
        assert not re.search(r"student|distill|the teacher's", result.stdout, flags=re.I), result.stdout


def test_teacher_aliases_of_diffusers_scripts(tmp_path):
    spec = importlib.util.spec_from_file_location("train_distill", ROOT / "examples" / "train_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for flag in ("--teacher", "--pretrained_teacher_model", "--pretrained_model_name_or_path"):
        assert module.parse_args([flag, "you/teacher"]).teacher == "you/teacher"
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "/pd-output/" in gitignore and "/teacher-output/" in gitignore  # the scripts' default output folders
    assert module.parse_args([]).output_dir == "pd-output"
