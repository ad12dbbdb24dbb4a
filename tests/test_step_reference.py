"""The algorithm seam changed no number: 3 learner steps of CRD, NFT and GRPO on the tiny model
reproduce the per-step stats and weights recorded before the refactor (tests/step_reference.py,
tests/data/step_reference.json; CPU fp32, equal up to float32 reduction order across CPUs, see
step_reference.close), and the one difference, a fixed bug, is shown to be exactly that bug.

The pre-seam learner blended p_old twice per step whenever p_old was also the sampling snapshot
(DiffusionNFT, and CRD with ``decoupled_sampler=false``): it de-duplicated the two snapshot parameter
lists by ``id`` of two distinct list objects, so the effective decay was d² instead of d. The cases
that hit it are replayed with that double blend put back, which reproduces the record; the fixed
learner blends once (``test_an_ema_role_is_blended_once``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import step_reference as ref
import torch

from diffrl.learner import networks

DOUBLE_BLEND = {"nft", "crd_lora_shared_noise"}


@pytest.fixture(scope="module")
def model_dir():
    with tempfile.TemporaryDirectory() as tmp:
        yield ref.build_model_dir(Path(tmp))


@pytest.mark.parametrize("case", sorted(ref.CASES))
def test_steps_reproduce_the_pre_seam_numbers(case, model_dir, monkeypatch):
    if case in DOUBLE_BLEND:
        blend = networks.Networks.blend

        def pre_seam_blend(self, decays):
            blend(self, decays)
            blend(self, decays)

        monkeypatch.setattr(networks.Networks, "blend", pre_seam_blend)
    want = json.loads(ref.DATA.read_text())[case]
    got = ref.run_case(case, model_dir)
    for i, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        assert set(g) == set(w), (i, set(g) ^ set(w))
        bad = {k: (g[k], w[k]) for k in w if not ref.close(g[k], w[k])}
        assert not bad, (i, bad)
    for which in ("theta", "p_samp"):
        bad = {k: (got[which][k], v) for k, v in want[which].items() if not ref.close(got[which][k], v)}
        assert not bad, (which, bad)


def test_an_ema_role_is_blended_once(model_dir):
    from prometheus_client import CollectorRegistry

    from diffrl.learner.learner import Learner
    from diffrl.models.adapter import FlowModel

    cfg = ref.base_config(ref.CASES["nft"])
    cfg.nft.old_ema.slope = 0.3  # d(1) = 0.3
    learner = Learner(cfg, FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32"),
                      registry=CollectorRegistry())
    sampler_model = FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    old0 = learner.snapshot_state_dict("p_old")
    stats = learner.train_on_groups([ref._group(0, g, sampler_model, cfg) for g in range(ref.G)])
    theta1, old1 = learner.theta_state_dict(), learner.snapshot_state_dict("p_old")
    assert stats["decay_old"] == stats["decay_samp"] == pytest.approx(0.3)
    for k in old1:
        assert torch.allclose(old1[k], 0.3 * old0[k] + 0.7 * theta1[k], atol=1e-6)
    learner.close()
