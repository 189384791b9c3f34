"""Checkpoint bookkeeping without a training run: which folder `latest` finds, pruning, and the resume refusals."""

import json

import pytest

from diffusers_pd import checkpoints


def make_checkpoint(output_dir, step, **progress):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps({"global_step": step, **progress}))
    return folder


def test_latest_is_the_highest_complete_checkpoint_numerically(tmp_path):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)  # "10" < "9" as text: the order must be numeric
    (tmp_path / "checkpoint-11").mkdir()  # no progress.json: incomplete, never resumed from
    (tmp_path / ".checkpoint-12.tmp").mkdir()  # a save in flight
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    assert checkpoints.find_checkpoint(tmp_path, "checkpoint-9").name == "checkpoint-9"
    assert checkpoints.find_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="no checkpoint there"):
        checkpoints.find_checkpoint(tmp_path, "checkpoint-11")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    checkpoints.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    checkpoints.prune_checkpoints(tmp_path, 0)  # 0 / None: no limit
    assert len(checkpoints.list_checkpoints(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # nothing half-deleted left


STAGES, BUDGETS = ["4 -> 2", "2 -> 1"], [3, 2]


@pytest.mark.parametrize(
    "progress, state, refusal",
    [
        ({"stages": ["8 -> 4", "4 -> 2"], "budgets": BUDGETS}, {}, "was made for stages.*--start_steps / --end_steps, --prediction_type"),
        ({"stages": [*STAGES, "1 -> 0"], "budgets": [3, 2, 2]}, {}, "was made for stages"),  # a longer run: not a prefix
        ({"stages": ["2 -> 1"], "budgets": [2]}, {}, "was made for stages"),  # these stages' last: not their first
        ({"stages": [], "budgets": []}, {}, "was made for stages"),
        ({"stages": STAGES[:1], "budgets": [2]}, {}, r"\[2\] iterations per stage, these arguments give \[3\]"),
        ({"stages": STAGES, "budgets": [3, 3]}, {}, r"\[3, 3\] iterations per stage.*--iterations_per_stage"),
        ({"stages": STAGES, "budgets": BUDGETS, "teacher_clip_range": 1.0}, {"teacher_clip_range": None},
         r"clamped to \[-1, 1\].*these arguments give unclipped: pass the run's --teacher_clip_sample"),
        ({"stages": STAGES, "budgets": BUDGETS, "teacher_clip_range": None}, {"teacher_clip_range": 1.0},
         "--teacher_clip_sample"),
    ],
)
def test_resume_refuses_another_run(tmp_path, progress, state, refusal):
    with pytest.raises(ValueError, match=refusal):
        checkpoints.check_resumable(tmp_path, progress, STAGES, BUDGETS, state)


@pytest.mark.parametrize(
    "progress, state",
    [
        ({"stages": STAGES, "budgets": BUDGETS, "teacher_clip_range": 1.0}, {"teacher_clip_range": 1.0}),
        ({"stages": STAGES}, {"teacher_clip_range": 1.0}),  # a checkpoint from before budgets and clipping were kept
        ({"stages": STAGES[:1], "budgets": BUDGETS[:1]}, {}),  # a run to fewer steps, extended by a smaller --end_steps
    ],
)
def test_resume_accepts_the_same_run(tmp_path, progress, state):
    checkpoints.check_resumable(tmp_path, progress, STAGES, BUDGETS, state)
