"""Push distilled students to the Hugging Face Hub, one branch per student.

Layout: one model repo `hub_model_id`. The student with N sampling steps (the local pipeline folder
`OUTPUT_DIR/student-{N}steps/`) goes to branch `student-{N}steps`, and `main` always holds the newest
(fewest-steps) student pushed so far. Each branch holds exactly that student's folder. Load with

    DiffusionPipeline.from_pretrained(repo_id)                              # newest student
    DiffusionPipeline.from_pretrained(repo_id, revision="student-4steps")  # a given student

A push that fails raises `HubPushError` and leaves the local folder untouched. After a successful push,
a marker `.hub_push.json` (repo id, branch, commit ids and a digest of the files; never the token) is
written into the folder; hidden and temporary files, the marker included, are never uploaded. The
retry path pushes every folder whose marker is missing or stale, without retraining:

    python -m diffusers_pd.hub push OUTPUT_DIR --hub_model_id ID [--hub_token T] [--private]

The token comes from `--hub_token`, else `HF_TOKEN`, else `hf auth login`; prefer the last two, since
a command-line argument is visible to other users of the machine. It is never logged or written.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import filter_repo_objects

logger = logging.getLogger(__name__)

MARKER_NAME = ".hub_push.json"
# Never uploaded: hidden files and folders (the marker included) and temporary files.
IGNORE_PATTERNS = (".*", "*/.*", "*.tmp", "*~")
STUDENT_DIR = re.compile(r"^student-(\d+)steps$")


class HubPushError(RuntimeError):
    """A student could not be pushed; the message names the repo, the branch, the cause and the retry."""


def resolve_token(hub_token: str | None = None) -> str | None:
    """The Hub token: `hub_token` if given, else the `HF_TOKEN` environment variable, else the login token."""
    return hub_token or os.environ.get("HF_TOKEN") or get_token()


def check_push_access(repo_id: str, token: str | None = None, private: bool = False) -> None:
    """Before any training: a token is there, the Hub takes it, and `repo_id` exists (or is created now) and the
    token may write to it. Raises ValueError with one line naming the fix; uploads nothing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub "
                         "(and push later with `python -m diffusers_pd.hub push`).")
    token = resolve_token(token)
    if token is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                         "(or pass --hub_token).")
    api = HfApi(token=token)
    step = "check the token"
    try:
        role = ((api.whoami().get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise ValueError(f"--push_to_hub: the Hugging Face token is read-only, so it cannot push to {repo_id}: "
                             "use a token with write access.")
        step = f"create {repo_id}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        step = f"check write access to {repo_id}"
        api.auth_check(repo_id, write=True)
    except ValueError:
        raise
    except Exception as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = ("the token is invalid or lacks write access to this repo or namespace" if status in (401, 403)
                else f"is the Hub at {constants.ENDPOINT} reachable?" if status is None else "see the Hub's message")
        raise ValueError(f"--push_to_hub: cannot {step} ({_describe(err)}): {hint}. Nothing was trained or written.") from None


def student_branch(num_steps: int) -> str:
    """Branch name of the student that samples in `num_steps` steps."""
    return f"student-{num_steps}steps"


def uploaded_files(folder: str | Path) -> list[str]:
    """Relative paths (POSIX) of the files of `folder` that a push uploads, sorted."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=list(IGNORE_PATTERNS)))


def folder_digest(folder: str | Path) -> str:
    """sha256 over the names and contents of the uploaded files: a marker is stale if this changes."""
    digest = hashlib.sha256()
    for relpath in uploaded_files(folder):
        digest.update(relpath.encode() + b"\0")
        digest.update(hashlib.sha256((Path(folder) / relpath).read_bytes()).digest())
    return digest.hexdigest()


def read_marker(folder: str | Path) -> dict | None:
    """The push marker of `folder`, or None if there is none or it cannot be read."""
    try:
        return json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_pushed(folder: str | Path, repo_id: str) -> bool:
    """True if `folder` was pushed to `repo_id` and has not changed since."""
    marker = read_marker(folder)
    return marker is not None and marker.get("repo_id") == repo_id and marker.get("digest") == folder_digest(folder)


def _write_marker(folder: Path, marker: dict) -> None:
    """Write the marker atomically (temporary file, then rename), so a crash never leaves half a marker."""
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=f"{MARKER_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as tmp_file:
            json.dump(marker, tmp_file, indent=2)
        os.replace(tmp_path, folder / MARKER_NAME)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise


def _failure(folder: Path, repo_id: str, branch: str, cause: str, private: bool) -> HubPushError:
    """The one-line error of a failed push, with the command that retries it."""
    retry = f"python -m diffusers_pd.hub push {folder.parent} --hub_model_id {repo_id}"
    retry += " --private" if private else ""
    return HubPushError(
        f"Could not push {folder} to Hub repo {repo_id} (branch {branch}): {cause}. "
        f"The student is safe on disk; retry with: {retry}"
    )


def _describe(err: Exception) -> str:
    """First line of an exception, with the server's own message when the Hub sent one."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    server_message = getattr(err, "server_message", None)
    if server_message:
        text += f" ({' '.join(server_message.split())})"
    return text


def _upload(api: HfApi, folder: Path, repo_id: str, revision: str, num_steps: int) -> str:
    """Make `revision` hold exactly the uploaded files of `folder`; return the commit id."""
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=f"Upload {num_steps}-step student",
        ignore_patterns=list(IGNORE_PATTERNS),
        delete_patterns=["*"],  # drop files of an earlier student that this one does not have
    )
    return info.oid


def push_student(
    folder: str | Path,
    repo_id: str,
    num_steps: int,
    token: str | None = None,
    private: bool = False,
    update_main: bool = True,
) -> str:
    """Upload a student folder to branch `student-{N}steps`, then to `main`; return the branch commit id."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pipeline folder (it has no model_index.json)")
    branch = student_branch(num_steps)
    token = resolve_token(token)
    if token is None:
        cause = "no Hugging Face token (pass --hub_token, set HF_TOKEN or run `hf auth login`)"
        raise _failure(folder, repo_id, branch, cause, private)
    digest = folder_digest(folder)  # of what is uploaded now, in case the folder changes meanwhile
    api = HfApi(token=token)
    revision = branch  # the revision being written, for the error message
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = _upload(api, folder, repo_id, branch, num_steps)
        main_commit = None
        if update_main:
            revision = "main"
            main_commit = _upload(api, folder, repo_id, revision, num_steps)
    except Exception as err:
        raise _failure(folder, repo_id, revision, _describe(err), private) from err
    marker = {"repo_id": repo_id, "branch": branch, "commit": commit, "main_commit": main_commit}
    _write_marker(folder, {**marker, "digest": digest})
    also = " and main" if update_main else ""
    logger.info("Pushed %s to %s (branch %s%s, commit %s)", folder, repo_id, branch, also, commit)
    return commit


def find_students(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(num_steps, folder) of every finished `student-{N}steps` folder of `output_dir`, most steps first."""
    students = []
    for path in Path(output_dir).iterdir():
        match = STUDENT_DIR.match(path.name)
        if match is None or not path.is_dir():
            continue
        if not (path / "model_index.json").is_file():
            logger.warning("Skipping %s: no model_index.json, so it is not a finished pipeline folder.", path)
            continue
        students.append((int(match[1]), path))
    return sorted(students, reverse=True)


def push_pending(output_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> list[str]:
    """Push, most steps first, every student of `output_dir` not yet on `repo_id`; return their branches.

    A failed push does not stop the others: each student gets its try, then one HubPushError names every student
    that failed (one line each).
    """
    students = find_students(output_dir)
    done = [num_steps for num_steps, folder in students if is_pushed(folder, repo_id)]
    token = resolve_token(token)
    pushed, failures = [], []
    for num_steps, folder in students:
        if num_steps in done:
            logger.info("Already on %s: %s", repo_id, folder)
            continue
        # `main` only moves forward: it keeps a newer student that is already there.
        newer_on_hub = any(steps < num_steps for steps in done)
        try:
            push_student(folder, repo_id, num_steps, token=token, private=private, update_main=not newer_on_hub)
        except HubPushError as err:
            failures.append(str(err))
            continue
        done.append(num_steps)
        pushed.append(student_branch(num_steps))
    if failures:
        raise HubPushError("\n".join(failures))
    return pushed


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m diffusers_pd.hub push OUTPUT_DIR --hub_model_id ID`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m diffusers_pd.hub", description="Push distilled students.")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push every student folder of OUTPUT_DIR not pushed yet")
    push.add_argument("output_dir", help="training output folder holding student-{N}steps/ folders")
    push.add_argument("--hub_model_id", required=True, help="repo id, e.g. user/ddpm-distilled")
    push.add_argument("--hub_token", default=None, help="default: HF_TOKEN, else the `hf auth login` token")
    push.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    args = parser.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        parser.error(f"{args.output_dir} is not a folder")
    logging.basicConfig(format="%(message)s")  # warnings from libraries, progress from this module
    logger.setLevel(logging.INFO)
    try:
        branches = push_pending(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.private)
    except HubPushError as err:
        logger.error("HubPushError: %s", err)
        return 1
    summary = ", ".join(branches) or "nothing was pending"
    logger.info("Pushed %d student(s) to %s: %s", len(branches), args.hub_model_id, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
