"""`diffrl train` refuses bad recipes and overrides at startup, naming the dotted field, before
anything heavy starts (no Ray, no Redis, no run folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffrl.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "deploy/configs/shapes-cpu.yaml")


def run_train(capsys, tmp_path, *args: str) -> tuple[int, str]:
    code = main(["train", *args, f"run.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, field, hint", [
    (["run.max_steps=0"], "run.max_steps", "int >= 1"),
    (["sampler.kk=4"], "sampler.kk", "no such config key"),
    (["learner.lr=fast"], "learner.lr", "Float"),
    (["sampler.k=1"], "sampler.k", ">= 2"),
    (["sampler.masked_backoff_s=-1"], "sampler.masked_backoff_s", ">= 0"),
    (["sampler.masked_backoff_s=5", "sampler.masked_backoff_max_s=1"], "sampler.masked_backoff_max_s", ">="),
    (["redis.url=http://localhost:6379"], "redis.url", "redis://"),
    (["redis.retry.max_elapsed_s=-1"], "redis.retry.max_elapsed_s", ">= 0"),
    (["rewards.0.token=abc"], "rewards.0.token", "no such config key"),
    (["rewards.0.urls=[ftp://host:1]"], "rewards.0.urls", "http"),
    (["rewards.0.retries=-1"], "rewards.0.retries", ">= 0"),
    (["learner.groups_per_step=3", "learner.world_size=2"], "learner.groups_per_step", "multiple"),
    (["learner.reward_weights.nope=1.0"], "learner.reward_weights", "names among the rewards"),
    (["run.resume=/nonexistent/run"], "run.resume", "checkpoints"),
    (["ray.max_task_events=0"], "ray.max_task_events", ">= 1"),
])
def test_bad_overrides_fail_with_the_field_name(capsys, tmp_path, args, field, hint):
    code, err = run_train(capsys, tmp_path, RECIPE, *args)
    assert code == 2, err
    assert err.startswith(f"diffrl: bad config: {field}:") and hint in err, err
    assert not (tmp_path / "runs").exists()  # nothing was started or written


@pytest.mark.parametrize("text, field", [
    ("run:\n  max_steps: [1, 2]\n", "run.max_steps"),
    ("learner:\n  crd:\n    betta: 0.1\n", "learner.crd.betta"),
    ("rewards:\n  - name: shapes\n    token: s3cret\n", "rewards.0.token"),
    ("rewards:\n  - name: a\n  - name: b\n    timeout_s: soon\n", "rewards.1.timeout_s"),
    ("rewards:\n  - name: a\n  - name: a\n", "rewards"),
    ("sampler: 3\n", "sampler"),
])
def test_bad_recipes_fail_with_the_field_name(capsys, tmp_path, text, field):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, err = run_train(capsys, tmp_path, str(recipe))
    assert code == 2 and err.startswith(f"diffrl: bad config: {field}"), err
    assert "s3cret" not in err


def test_unreadable_recipes(capsys, tmp_path):
    code, err = run_train(capsys, tmp_path, str(tmp_path / "missing.yaml"))
    assert code == 2 and "recipe not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {max_steps: 3\n")
    code, err = run_train(capsys, tmp_path, str(bad))
    assert code == 2 and "not valid YAML" in err
    code, err = run_train(capsys, tmp_path, RECIPE, "run.max_steps")
    assert code == 2 and "key.sub=value" in err


def test_console_script_exit_status_and_message(tmp_path):
    """The installed entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "diffrl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffrl.cli"]
    r = subprocess.run([*cmd, "train", RECIPE, "learner.max_staleness=-3", f"run.output_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "learner.max_staleness" in r.stderr and "Traceback" not in r.stderr, r.stderr
