"""The algorithm seam: a test-only algorithm (tests/rwr_algorithm.py, two trainable roles and an EMA)
registered from here loads from config, trains end to end through a real Redis stream and DeepSpeed,
and checkpoints and resumes every role's weights and optimizer state; no learner code names an
algorithm."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_learner import bus, make_group, model_dir, poll_until_step, redis_server  # noqa: F401 - fixtures

from diffrl.config import ConfigError, load_config, to_yaml
from diffrl.learner.algorithms import base
from diffrl.learner.config import LearnerConfig
from diffrl.learner.learner import Learner
from diffrl.models.adapter import FlowModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rwr():
    import rwr_algorithm

    base.register(rwr_algorithm.RWR)
    yield rwr_algorithm
    base.unregister("rwr")


def rwr_config(**over) -> LearnerConfig:
    cfg = load_config(LearnerConfig, overrides=[
        "algorithm=rwr", "rwr.temperature=0.5", "groups_per_step=2", "torch_threads=1", "checkpoint_every=0",
        "read_block_ms=20", "lr=1e-3", "device=cpu", "dtype=float32", *[f"{k}={v}" for k, v in over.items()]])
    return cfg


def test_a_registered_algorithm_gets_a_validated_config_section(rwr):
    cfg = rwr_config()
    assert cfg.algorithm_config is cfg.rwr and cfg.rwr.temperature == 0.5
    assert "temperature: 0.5" in to_yaml(cfg)  # crosses process boundaries with the rest
    with pytest.raises(ConfigError) as err:
        rwr_config(**{"rwr.temperature": -1})
    assert err.value.field == "rwr.temperature"
    with pytest.raises(ConfigError) as err:
        rwr_config(**{"rwr.nope": 1})
    assert err.value.field == "rwr.nope"
    w = rwr.rwr_weights(torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[True, True], [True, False]]), 1.0)
    e = torch.e
    assert torch.allclose(w, torch.tensor([[2 / (1 + e), 2 * e / (1 + e)], [1.0, 0.0]]))


def test_two_trainable_roles_train_through_the_bus_and_resume(rwr, model_dir, bus, tmp_path):  # noqa: F811
    r, stream, producer = bus
    model = FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    learner = Learner(rwr_config(), model, run_dir=tmp_path / "run", registry=CollectorRegistry())
    learner.connect_bus(r, stream=stream)
    assert sorted(learner.nets.names()) == ["base", "fake", "p_samp", "theta"] and learner.T == 2
    theta0, fake0 = learner.theta_state_dict(), learner.theta_state_dict("fake")
    samp0 = learner.snapshot_state_dict("p_samp")
    for _ in range(2):
        producer.publish(make_group())
    stats = poll_until_step(learner, 1)[-1]
    assert stats["loss"] > 0 and stats["fake_loss"] > 0 and stats["decay_samp"] == 0.5
    theta1, fake1 = learner.theta_state_dict(), learner.theta_state_dict("fake")
    for before, after in ((theta0, theta1), (fake0, fake1)):
        assert any(not torch.equal(before[k], after[k]) for k in before)  # each role took its step
    samp1 = learner.snapshot_state_dict("p_samp")
    for k in samp1:  # the EMA blended once: 0.5·p_samp + 0.5·θ
        assert torch.allclose(samp1[k], 0.5 * samp0[k] + 0.5 * theta1[k], atol=1e-6)
    for _ in range(2):
        producer.publish(make_group())
    poll_until_step(learner, 2)
    folder = learner.save_checkpoint()
    assert {"engine_theta", "engine_fake", "p_samp.safetensors"} <= {p.name for p in folder.iterdir()}
    again = Learner(rwr_config(), FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32"),
                    run_dir=tmp_path / "run", registry=CollectorRegistry())
    assert again.resume() == 2
    for role in ("theta", "fake"):
        mine, theirs = learner.theta_state_dict(role), again.theta_state_dict(role)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        opt_a = learner.nets.trained[role].engine.optimizer.state_dict()["state"]
        opt_b = again.nets.trained[role].engine.optimizer.state_dict()["state"]
        assert opt_a.keys() == opt_b.keys() and opt_a
        for key in opt_a:
            assert torch.equal(opt_a[key]["exp_avg"], opt_b[key]["exp_avg"])
            assert torch.equal(opt_a[key]["exp_avg_sq"], opt_b[key]["exp_avg_sq"])
    samp = learner.snapshot_state_dict("p_samp")
    assert all(torch.equal(samp[k], v) for k, v in again.snapshot_state_dict("p_samp").items())
    learner.close()
    again.close()


def test_no_code_outside_the_registry_compares_algorithm_names():
    r = subprocess.run(["grep", "-rn", r"algorithm ==\|alg ==", "learner", "diffrl", "actors"], cwd=REPO, check=False,
                       capture_output=True, text=True)
    assert r.stdout == "", r.stdout
    names = sorted(base.registry())
    assert names == ["crd", "didr", "grpo", "nft", "sdpo", "tdmr1"]
    alt = "|".join(names)
    pattern = re.compile(rf"""==\s*["']({alt})["']|["']({alt})["']\s*==""")
    for path in [*REPO.glob("learner/*.py"), *REPO.glob("diffrl/*.py"), *REPO.glob("actors/*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path}:{i}: {line}"
