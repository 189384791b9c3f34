"""diffusers_pd.hub end to end, through a loopback stand-in for the Hub (tests/hub_standin.py).

Pushes and loads run in subprocesses whose HF_ENDPOINT points at the stand-in: huggingface_hub reads it
at import time. The real Hub is never contacted.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline
from PIL import Image

import diffusers_pd.hub as hub
from diffusers_pd.hub import HubPushError, folder_digest, is_pushed, read_marker, student_branch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_unet  # noqa: E402
from hub_standin import GITATTRIBUTES, Repo, run_standin  # noqa: E402

TOKEN = "hf_standin_TOKEN_that_must_never_leak_7c41e9"
STEPS = (8, 4, 2)
# What a push of one student folder must put on its branch (besides the Hub's own .gitattributes).
EXPECTED_FILES = {
    "README.md",
    "model_index.json",
    "samples.png",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}

PUSH_AND_LOAD = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
from diffusers_pd.hub import push_student

output_dir, repo_id, images_file = sys.argv[1:4]
commits = {n: push_student(f"{output_dir}/student-{n}steps", repo_id, n, private=True) for n in (8, 4, 2)}
images = {}
for revision, n in [("student-8steps", 8), ("student-4steps", 4), ("student-2steps", 2), (None, 2)]:
    pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision)
    generator = torch.Generator().manual_seed(0)
    images[str(revision)] = pipe(batch_size=2, generator=generator, num_inference_steps=n, output_type="np").images
np.savez(images_file, **images)
print(json.dumps(commits))
"""

PUSH_PENDING = """
import json, logging, sys
from diffusers_pd.hub import HubPushError, push_pending

logging.basicConfig(level=logging.DEBUG)  # every library log line, so the token check sees them all
errors = {}
for repo_id, output_dir in json.loads(sys.argv[1]).items():
    try:
        push_pending(output_dir, repo_id)
        errors[repo_id] = None
    except HubPushError as err:
        errors[repo_id] = str(err)
print(json.dumps(errors))
"""


def tiny_student(num_steps: int) -> DDPMPipeline:
    """A tiny random UNet (seeded by `num_steps`, from conftest) with a trailing v-prediction DDIM scheduler."""
    unet = tiny_unet(seed=num_steps)
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction")
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def sample(pipe: DiffusionPipeline, num_steps: int) -> np.ndarray:
    """Two images from seed 0, as the subprocess samples them."""
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, generator=generator, num_inference_steps=num_steps, output_type="np").images


def png_bytes(seed: int) -> bytes:
    """A small random PNG, standing in for samples.png."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 16), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` except push markers, as {relative path: bytes}."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != hub.MARKER_NAME
    }


def hub_env(server, hf_home: Path, token: str | None = TOKEN) -> dict[str, str]:
    """Environment of a subprocess that talks to the stand-in only (no HF_* variable inherited)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `python *args`, capturing its output."""
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def branch_files(server, repo_id: str, branch: str) -> dict[str, bytes]:
    """Files at the head of a branch of the stand-in, without the Hub's .gitattributes."""
    repo = server.repos[repo_id]
    files = dict(repo.commits[repo.branches[branch]])
    files.pop(".gitattributes")
    return files


def assert_token_nowhere(outputs: list[str], *folders: Path) -> None:
    """The token is in no captured output and in no file under `folders`."""
    for text in outputs:
        assert TOKEN not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def server():
    with run_standin(token=TOKEN) as standin:
        yield standin


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> Path:
    """An output folder with students of 8, 4 and 2 steps, plus a temporary and a hidden file in each."""
    output_dir = tmp_path_factory.mktemp("output")
    for num_steps in STEPS:
        folder = output_dir / f"student-{num_steps}steps"
        tiny_student(num_steps).save_pretrained(folder)
        card = f"---\nlibrary_name: diffusers\ntags:\n- progressive-distillation\n---\n# {num_steps}-step student\n"
        (folder / "README.md").write_text(card)
        (folder / "samples.png").write_bytes(png_bytes(num_steps))
        (folder / "train_state.tmp").write_bytes(b"scratch")
        (folder / "unet" / ".DS_Store").write_bytes(b"junk")
    return output_dir


@pytest.fixture(scope="module")
def references(students) -> dict[int, np.ndarray]:
    """Images sampled from each local student folder, before any push."""
    return {n: sample(DiffusionPipeline.from_pretrained(students / f"student-{n}steps"), n) for n in STEPS}


def test_resolve_token_prefers_argument_then_env_then_login(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "from-login")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub.resolve_token() == "from-login"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert hub.resolve_token() == "from-env"
    assert hub.resolve_token("from-arg") == "from-arg"


def test_push_without_any_token_fails_clearly_before_contacting_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    folder = tmp_path / "student-4steps"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(HubPushError, match=r"user/model \(branch student-4steps\): no Hugging Face token") as info:
        hub.push_student(folder, "user/model", 4, private=True)
    assert str(info.value).endswith(f"push {tmp_path} --hub_model_id user/model --private")  # stays private
    assert read_marker(folder) is None


CHECK_PUSH_ACCESS = """
import json, sys
from diffusers_pd.hub import check_push_access

errors = {}
for repo_id in sys.argv[1:]:
    try:
        check_push_access(repo_id, private=True)
        errors[repo_id] = None
    except ValueError as err:
        errors[repo_id] = str(err)
print(json.dumps(errors))
"""


def test_push_access_is_checked_before_any_work(server, tmp_path):
    """The --push_to_hub preflight: a token, one the Hub takes, a repo it creates or finds, write access; one line."""
    server.read_only.add("pd-test/read-only")
    with server.lock:  # two repos that exist before the check
        for repo_id in ("pd-test/read-only", "pd-test/preexisting"):
            repo = server.repos[repo_id] = Repo(private=False)
            repo.branches["main"] = server.new_commit(repo, {".gitattributes": GITATTRIBUTES})
    commits_before = len(server.commit_log)
    repos = ["pd-test/preflight-new", "pd-test/preexisting", "pd-test/read-only"]
    answers = {}
    for name, token in [("good", TOKEN), ("wrong", "hf_not_the_token"), ("none", None)]:
        result = run_python(["-c", CHECK_PUSH_ACCESS, *repos], hub_env(server, tmp_path / "hf_home", token=token))
        assert result.returncode == 0, result.stderr[-3000:]
        answers[name] = json.loads(result.stdout.splitlines()[-1])
        assert TOKEN not in result.stdout + result.stderr
    assert answers["good"]["pd-test/preflight-new"] is None and server.repos["pd-test/preflight-new"].private
    assert answers["good"]["pd-test/preexisting"] is None
    assert answers["good"]["pd-test/read-only"].startswith("--push_to_hub: cannot check write access to pd-test/read-only")
    assert "403" in answers["good"]["pd-test/read-only"]
    for repo_id in repos:
        assert answers["wrong"][repo_id].startswith("--push_to_hub: cannot check the token (")
        assert "the token is invalid or lacks write access" in answers["wrong"][repo_id]
        assert answers["none"][repo_id].startswith("--push_to_hub needs a Hugging Face token: set HF_TOKEN")
    for message in [m for answer in answers.values() for m in answer.values() if m]:
        assert "\n" not in message
    assert len(server.commit_log) == commits_before  # nothing uploaded


def test_find_students_orders_by_steps_and_skips_unfinished_folders(tmp_path):
    for name in ("student-2steps", "student-16steps", "student-4steps", "other"):
        (tmp_path / name).mkdir()
    for name in ("student-2steps", "student-16steps", "other"):
        (tmp_path / name / "model_index.json").write_text("{}")
    assert hub.find_students(tmp_path) == [(16, tmp_path / "student-16steps"), (2, tmp_path / "student-2steps")]
    assert student_branch(4) == "student-4steps"


def test_marker_is_stale_for_another_repo_or_changed_files(students, tmp_path):
    folder = shutil.copytree(students / "student-2steps", tmp_path / "student-2steps")
    hub._write_marker(folder, {"repo_id": "user/model", "digest": folder_digest(folder)})
    assert is_pushed(folder, "user/model")
    assert not is_pushed(folder, "user/other-model")
    (folder / "train_state.tmp").write_bytes(b"not uploaded, so not part of the digest")
    assert is_pushed(folder, "user/model")
    (folder / "README.md").write_text("edited model card")
    assert not is_pushed(folder, "user/model")


def test_push_pending_never_moves_main_back_to_an_older_student(students, tmp_path, monkeypatch):
    output_dir = Path(shutil.copytree(students, tmp_path / "output"))
    newest = output_dir / "student-2steps"
    hub._write_marker(newest, {"repo_id": "user/model", "digest": folder_digest(newest)})
    calls = []

    def fake_push_student(folder, repo_id, num_steps, token=None, private=False, update_main=True):
        calls.append((num_steps, update_main))

    monkeypatch.setattr(hub, "push_student", fake_push_student)
    assert hub.push_pending(output_dir, "user/model", token="unused") == ["student-8steps", "student-4steps"]
    assert calls == [(8, False), (4, False)]


def test_pushed_students_load_back_by_branch_and_sample_the_same_images(server, students, references, tmp_path):
    repo_id = "pd-test/roundtrip"
    images_file = tmp_path / "images.npz"
    result = run_python(
        ["-c", PUSH_AND_LOAD, str(students), repo_id, str(images_file)], hub_env(server, tmp_path / "hf_home")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    commits = json.loads(result.stdout.splitlines()[-1])

    # The students really differ, so loading the wrong branch could not pass.
    for a, b in [(8, 4), (4, 2), (8, 2)]:
        assert np.abs(references[a] - references[b]).max() > 1e-3
    images = np.load(images_file)
    for num_steps in STEPS:
        np.testing.assert_allclose(images[student_branch(num_steps)], references[num_steps], rtol=0, atol=1e-6)
    np.testing.assert_allclose(images["None"], references[2], rtol=0, atol=1e-6)  # main = newest student

    repo = server.repos[repo_id]
    assert repo.private
    for num_steps in STEPS:
        folder = students / f"student-{num_steps}steps"
        local = files_of(folder)
        assert set(branch_files(server, repo_id, student_branch(num_steps))) == EXPECTED_FILES
        assert branch_files(server, repo_id, student_branch(num_steps)) == {p: local[p] for p in EXPECTED_FILES}
        marker = read_marker(folder)
        assert marker["repo_id"] == repo_id and marker["branch"] == student_branch(num_steps)
        assert marker["commit"] == commits[str(num_steps)] == repo.branches[student_branch(num_steps)]
    assert read_marker(students / "student-2steps")["main_commit"] == repo.branches["main"]
    assert branch_files(server, repo_id, "main") == branch_files(server, repo_id, "student-2steps")
    assert_token_nowhere([result.stdout, result.stderr], students, tmp_path)


def test_failed_push_leaves_students_intact_and_the_cli_pushes_the_rest(server, students, tmp_path):
    # One repo fails on the 2nd student's branch commit, the other on its `main` commit (branch done).
    failures = {
        "pd-test/fails-on-branch": {"revision": "student-4steps"},
        "pd-test/fails-on-main": {"revision": "main", "skip": 1},
    }
    output_dirs = {}
    for repo_id, rule in failures.items():
        output_dir = tmp_path / repo_id.split("/")[1]
        shutil.copytree(students, output_dir, ignore=shutil.ignore_patterns(hub.MARKER_NAME))
        stale = output_dir / "student-8steps"  # pushed once to another repo: must be pushed again
        hub._write_marker(stale, {"repo_id": "someone/else", "digest": folder_digest(stale)})
        server.fail_commits(repo_id=repo_id, **rule)
        output_dirs[repo_id] = output_dir
    before = {repo_id: files_of(output_dir) for repo_id, output_dir in output_dirs.items()}
    hf_home = tmp_path / "hf_home"

    to_push = json.dumps({repo_id: str(output_dir) for repo_id, output_dir in output_dirs.items()})
    first = run_python(["-c", PUSH_PENDING, to_push], hub_env(server, hf_home))
    assert first.returncode == 0, first.stderr[-3000:]
    errors = json.loads(first.stdout.splitlines()[-1])
    for repo_id, output_dir in output_dirs.items():
        branch = failures[repo_id]["revision"]
        message = errors[repo_id]
        assert "\n" not in message
        assert f"{output_dir / 'student-4steps'} to Hub repo {repo_id} (branch {branch})" in message
        assert "507" in message and "Injected failure" in message
        assert f"python -m diffusers_pd.hub push {output_dir} --hub_model_id {repo_id}" in message
        assert files_of(output_dir) == before[repo_id]  # byte-identical, nothing half-written
        # a failed student does not stop the others: 8 and 2 went up, 4 failed, and main holds the newest (2)
        assert read_marker(output_dir / "student-8steps")["repo_id"] == repo_id
        assert read_marker(output_dir / "student-4steps") is None
        assert read_marker(output_dir / "student-2steps")["repo_id"] == repo_id
        assert branch_files(server, repo_id, "main") == branch_files(server, repo_id, "student-2steps")
    heads = {repo_id: {branch: server.repos[repo_id].branches[branch] for branch in ("student-8steps", "student-2steps", "main")}
             for repo_id in output_dirs}

    outputs = [first.stdout, first.stderr]
    for repo_id, output_dir in output_dirs.items():
        commits_before = len(server.commit_log)
        retry = run_python(
            ["-m", "diffusers_pd.hub", "push", str(output_dir), "--hub_model_id", repo_id, "--hub_token", TOKEN],
            hub_env(server, hf_home, token=None),
        )
        outputs += [retry.stdout, retry.stderr]
        assert retry.returncode == 0, retry.stderr[-3000:]
        assert "Pushed 1 student(s)" in retry.stderr
        new_commits = [c for c in server.commit_log[commits_before:] if c["repo_id"] == repo_id]
        assert not {"student-8steps", "student-2steps", "main"} & {commit["revision"] for commit in new_commits}
        assert {branch: server.repos[repo_id].branches[branch] for branch in heads[repo_id]} == heads[repo_id]
        if failures[repo_id]["revision"] == "main":  # the branch was already complete: no new commit there
            assert "student-4steps" not in {commit["revision"] for commit in new_commits}
        for num_steps in STEPS:
            folder = output_dir / f"student-{num_steps}steps"
            assert is_pushed(folder, repo_id)
            local = files_of(folder)
            assert branch_files(server, repo_id, student_branch(num_steps)) == {p: local[p] for p in EXPECTED_FILES}
        assert branch_files(server, repo_id, "main") == branch_files(server, repo_id, "student-2steps")
    assert_token_nowhere(outputs, tmp_path)
