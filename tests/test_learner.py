"""The learner on a tiny random SD3 model, a real redis-server (EmbeddedRedis) and real DeepSpeed on
CPU (gloo): steps, publishing, staleness/masking/dedup ledger, ack-after-checkpoint, resume, LoRA,
two ranks, and a learning signal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from diffrl.config import ConfigError, load_config
from diffrl.embedded_redis import EmbeddedRedis, connect
from diffrl.learner import checkpoint as ckpt
from diffrl.learner import metrics as M
from diffrl.learner.algorithms.crd import CRD
from diffrl.learner.config import LearnerConfig
from diffrl.learner.learner import Learner
from diffrl.models.adapter import FlowModel
from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.proto import experience_pb2
from diffrl.proto.bus import ExperienceProducer
from diffrl.proto.codec import tensor_to_proto
from diffrl.proto.weight_sync import LocalWeightChannel
from diffrl.utils import free_port

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 16, 16)
PROMPTS = ("a red circle", "two blue squares", "three green triangles", "a yellow square")


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny_sd3")
    arch = TinySD3Arch(image_size=16, patch_size=4, num_layers=2, num_heads=2, head_dim=16, text_hidden=32,
                       text_projection=16)
    pipe = build_tiny_sd3(arch, work / "tok", seed=0)
    out = work / "model"
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def bus(redis_server):
    """(client, unique stream name, producer)."""
    r = connect(redis_server.url)
    stream = f"experience-{uuid.uuid4().hex[:8]}"
    yield r, stream, ExperienceProducer(r, stream=stream)
    r.delete(stream)
    r.close()


def small_config(**overrides) -> LearnerConfig:
    cfg = LearnerConfig(groups_per_step=2, torch_threads=1, checkpoint_every=0, read_block_ms=20, lr=1e-3,
                        max_staleness=4, seed=0, device="cpu", dtype="float32")
    cfg.crd.num_noise_levels = 3
    cfg.crd.kl_cfg_scale = 2.0
    cfg.lora.rank = 4
    cfg.lora.alpha = 8.0
    for key, value in overrides.items():
        obj = cfg
        *path, last = key.split("__")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return cfg


def make_learner(model_dir, cfg: LearnerConfig, run_dir=None, publisher=None, registry=None) -> Learner:
    model = FlowModel.from_pretrained(str(model_dir), device=cfg.device, dtype=cfg.dtype)
    return Learner(cfg, model, publisher=publisher, run_dir=run_dir, registry=registry or CollectorRegistry())


_counter = iter(range(10**9))


def make_group(version: int = 0, k: int = 4, masked: bool = False, shape=SHAPE, gid: str | None = None,
               seed: int | None = None, rewards: bool = True) -> experience_pb2.Group:
    """K latents with different brightness; reward 'bright' = mean of x0 (and an unused 'noise')."""
    seed = next(_counter) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    g = experience_pb2.Group(group_id=gid or f"grp-{seed}-{uuid.uuid4().hex[:8]}", prompt=PROMPTS[seed % 4],
                             policy_version=version, sampler_id="test", created_at=time.time(), masked=masked,
                             mask_reason="reward server down" if masked else "")
    for j in range(k):
        x = (torch.rand(shape, generator=gen) * 2 - 1) * 0.5 + (torch.rand(1, generator=gen) - 0.5)
        s = g.samples.add(seed=seed * 100 + j, latent=tensor_to_proto(x))
        if rewards:
            s.rewards["bright"] = float(x.mean())
            s.rewards["noise"] = float(torch.rand(1, generator=gen))
    return g


def pending_ids(r, stream: str, group: str = "learner") -> set[str]:
    rows = r.xpending_range(stream, group, min="-", max="+", count=10_000)
    return {row["message_id"].decode() if isinstance(row["message_id"], bytes) else row["message_id"]
            for row in rows}


def poll_until_step(learner: Learner, step: int, max_polls: int = 50) -> list[dict]:
    out = []
    for _ in range(max_polls):
        if learner.step >= step:
            return out
        stats = learner.poll_and_step()
        if stats is not None:
            out.append(stats)
    raise AssertionError(f"learner stuck at step {learner.step}, wanted {step}")


def sample_value(registry, name, labels=None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# -------------------------------------------------------------------------------------------- config


def test_config_defaults_validate_and_load_with_dotted_errors():
    LearnerConfig().validate()
    cfg = load_config(LearnerConfig, overrides=["lr=0.01", "reward_weights.ocr=2.0", "lora.enabled=true",
                                                "crd.old_ema.max_decay=0.99", "grad_clip=0.5", "zero_stage=2"])
    assert cfg.lr == 0.01 and cfg.reward_weights == {"ocr": 2.0} and cfg.lora.enabled
    assert cfg.crd.old_ema.max_decay == 0.99 and cfg.grad_clip == 0.5 and cfg.algorithm_config is cfg.crd
    for override, field in [("lr=-1", "lr"), ("zero_stage=4", "zero_stage"), ("algorithm=ppo", "algorithm"),
                            ("dtype=float16", "dtype"), ("max_staleness=-1", "max_staleness")]:
        with pytest.raises(ConfigError) as err:
            load_config(LearnerConfig, overrides=[override])
        assert field in str(err.value)
    with pytest.raises(ValueError, match="groups_per_step"):
        LearnerConfig(world_size=2, groups_per_step=3).validate()
    with pytest.raises(ValueError, match=r"lora\.rank"):
        small_config(lora__rank=0).validate()
    assert LearnerConfig(groups_per_step=8, world_size=2, micro_groups=3).num_chunks == 2


# ---------------------------------------------------------------------------------------- one step


def test_steps_through_the_bus_publish_versions_and_metrics(model_dir, bus, tmp_path):
    r, stream, producer = bus
    channel = LocalWeightChannel()
    registry = CollectorRegistry()
    learner = make_learner(model_dir, small_config(), publisher=channel, registry=registry)
    learner.connect_bus(r, stream=stream)
    assert learner.consumer.consumer_name == "learner-0"
    assert learner.engine.gradient_accumulation_steps() == 3  # T x 1 chunk
    theta0 = learner.theta_state_dict()
    for _ in range(6):
        producer.publish(make_group(version=0))
    stats = poll_until_step(learner, 3)
    assert learner.step == 3 and learner.engine.global_steps == 3  # exactly one optimizer step each
    for st in stats:
        for key in ("loss", "matching_loss", "kl", "implicit_reward_mean", "implicit_reward_std", "reward_mean",
                    "reward_std", "advantage_std", "grad_norm", "step_seconds"):
            assert math.isfinite(st[key]), (key, st[key])
        assert st["samples"] == 8 and st["groups"] == 2 and st["beta"] == 1.0
        assert set(st["reward_mean_by"]) == {"bright", "noise"}
        assert st["advantage_std"] == pytest.approx(1.0, abs=1e-6)
    assert [st["version"] for st in stats] == [1, 2, 3]
    assert [st["staleness"] for st in stats] == [[0, 0], [1, 1], [2, 2]]
    theta = learner.theta_state_dict()
    assert any(not torch.equal(theta0[k], theta[k]) for k in theta)
    # p_samp: an exact copy of θ during the first 75 steps; p_old: an EMA that lags behind θ
    samp = learner.snapshot_state_dict("p_samp")
    old = learner.snapshot_state_dict("p_old")
    assert all(torch.equal(samp[k], theta[k]) for k in theta)
    assert any(not torch.allclose(old[k], theta[k]) for k in theta)
    # the publisher has the newest version, a full state dict in the model dtype
    version, kind, tensors = channel.fetch_newer(-1)
    assert (version, kind) == (3, "full")
    assert set(tensors) == set(learner.anchor.state_dict())
    assert torch.equal(tensors["transformer_blocks.0.attn.to_q.weight"], samp["transformer_blocks.0.attn.to_q.weight"])
    # no checkpoints: trained entries are acknowledged right after their step
    assert pending_ids(r, stream) == set()
    # metrics
    assert sample_value(registry, M.OPTIMIZER_STEPS_TOTAL) == 3
    assert sample_value(registry, M.GROUPS_CONSUMED_TOTAL) == 6
    assert sample_value(registry, M.SAMPLES_TOTAL) == 24
    assert sample_value(registry, M.POLICY_VERSION) == 3
    assert sample_value(registry, M.STEP_SECONDS + "_count") == 3
    assert sample_value(registry, M.STALENESS_VERSIONS + "_count") == 6
    assert sample_value(registry, M.STALENESS_VERSIONS + "_sum") == 0 + 0 + 1 + 1 + 2 + 2
    assert sample_value(registry, M.REWARD_MEAN, {"reward": "bright"}) == pytest.approx(stats[-1]["reward_mean_by"]["bright"])
    assert sample_value(registry, M.LOSS) == pytest.approx(stats[-1]["loss"])
    assert sample_value(registry, M.KL) == pytest.approx(stats[-1]["kl"])
    assert sample_value(registry, CRD.gauges["beta"][0]) == 1.0
    assert registry.get_sample_value(M.BACKLOG_GROUPS) == 0


def test_micro_chunks_do_not_change_the_gradient(model_dir):
    """Loss scaling of the accumulation: 1 chunk of 2 groups vs 2 chunks of 1 group give the same
    gradient (norm before clipping) and the same step."""
    groups = [make_group(seed=11), make_group(seed=12)]
    results = []
    for micro in (0, 1):
        learner = make_learner(model_dir, small_config(micro_groups=micro, grad_clip=0.0))
        assert learner.engine.gradient_accumulation_steps() == 3 * (1 if micro == 0 else 2)
        stats = learner.train_on_groups(groups)
        assert learner.engine.global_steps == 1
        results.append((stats, learner.theta_state_dict()))
    (s1, th1), (s2, th2) = results
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-4)
    assert all(torch.allclose(th1[k], th2[k], atol=1e-6) for k in th1)


def test_group_shared_noise_cancels_what_the_group_has_in_common(model_dir):
    """crd.group_shared_noise draws one ε per (group, t): for a group whose K samples are the same
    image (with different rewards) the implicit rewards are then equal, the centered contrast has
    nothing to act on and the gradient is exactly 0 at θ = p_old; with one ε per sample it is not."""
    def same_image_group(seed: int) -> experience_pb2.Group:
        x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        g = experience_pb2.Group(group_id=f"same-{seed}", prompt=PROMPTS[seed % 4], policy_version=0,
                                 sampler_id="test", created_at=time.time())
        for j in range(4):
            g.samples.add(seed=j, latent=tensor_to_proto(x)).rewards["bright"] = float(j)
        return g

    norms = {}
    for shared in (True, False):
        learner = make_learner(model_dir, small_config(grad_clip=0.0, crd__use_kl_anchor=False,
                                                       crd__group_shared_noise=shared))
        stats = learner.train_on_groups([same_image_group(1), same_image_group(2)])
        norms[shared] = stats["grad_norm"]
    assert norms[True] < 1e-6 * norms[False] and norms[False] > 1e-6, norms


def test_anchor_only_levels_add_only_the_kl_anchor(model_dir):
    """crd.num_anchor_levels: T_a extra levels with the KL anchor alone. At LoRA init θ is the frozen
    model, so with CFG scale 1 the anchor term is 0 at every level; the step's loss is then the one
    matching level's loss averaged over all T + T_a levels, and the matching statistics are means over
    the matching level alone."""
    cfg = small_config(grad_clip=0.0, crd__num_noise_levels=1, crd__num_anchor_levels=2, crd__top_fraction=0.3,
                       crd__kl_cfg_scale=1.0)
    learner = make_learner(model_dir, cfg)
    assert learner.engine.gradient_accumulation_steps() == 3
    stats = learner.train_on_groups([make_group(seed=21), make_group(seed=22)])
    assert learner.engine.global_steps == 1
    assert stats["anchor_kl_mean"] < 1e-10 and stats["kl_loss"] < 1e-10
    assert stats["matching_loss"] > 0.01  # R̂ = 0 at θ = p_old: (s/β)·mean ãc²
    assert stats["loss"] == pytest.approx(stats["matching_loss"] / 3, rel=1e-6)
    # with the anchor guided (CFG 2) the anchor-only levels pull θ: their KL is positive
    learner = make_learner(model_dir, small_config(crd__num_noise_levels=1, crd__num_anchor_levels=2,
                                                   crd__top_fraction=0.3))
    stats = learner.train_on_groups([make_group(seed=21), make_group(seed=22)])
    assert stats["anchor_kl_mean"] > 1e-6 and stats["anchor_kl_loss"] > 0


def test_nft_baseline_steps(model_dir):
    learner = make_learner(model_dir, small_config(algorithm="nft", nft__num_noise_levels=2,
                                                   gradient_checkpointing=True))
    assert learner.p_samp is learner.p_old  # NFT: one EMA model is both sampler and reference
    stats = learner.train_on_groups([make_group(), make_group(k=3)])  # uneven K: padded and masked
    assert math.isfinite(stats["loss"]) and learner.step == 1 and stats["samples"] == 7


# ------------------------------------------------------------------------------------------ ledger


def test_stale_masked_duplicate_invalid_groups_are_counted_and_acked(model_dir, bus):
    r, stream, producer = bus
    registry = CollectorRegistry()
    learner = make_learner(model_dir, small_config(max_staleness=1), registry=registry)
    learner.connect_bus(r, stream=stream)
    first = [make_group(version=0), make_group(version=0)]
    for g in first:
        producer.publish(g)
    poll_until_step(learner, 1)
    # at version 1 a version-0 group is 1 behind (fine); one more step makes version 0 stale
    for _ in range(2):
        producer.publish(make_group(version=1))
    poll_until_step(learner, 2)
    assert learner.step == 2
    stale = make_group(version=0)  # 2 versions behind > max_staleness 1
    masked = make_group(version=2, masked=True)
    duplicate = experience_pb2.Group()
    duplicate.CopyFrom(first[0])
    duplicate.policy_version = 2  # a re-published, already trained group
    wrong_shape = make_group(version=2, shape=(3, 8, 8))
    no_reward = make_group(version=2, rewards=False)
    single = make_group(version=2, k=1)
    bad = [producer.publish(g) for g in (stale, masked, duplicate, wrong_shape, no_reward, single)]
    good = [producer.publish(make_group(version=2)) for _ in range(2)]
    poll_until_step(learner, 3)
    c = learner.counters
    assert (c["dropped_stale"], c["masked"], c["duplicate"], c["invalid"]) == (1, 1, 1, 3)
    assert c["groups_trained"] == 6
    assert sample_value(registry, M.GROUPS_DROPPED_STALE_TOTAL) == 1
    assert sample_value(registry, M.GROUPS_MASKED_TOTAL) == 1
    assert sample_value(registry, M.GROUPS_DUPLICATE_TOTAL) == 1
    assert sample_value(registry, M.GROUPS_INVALID_TOTAL) == 3
    assert sample_value(registry, M.GROUPS_CONSUMED_TOTAL) == 6
    assert not (set(bad) | set(good)) & pending_ids(r, stream)  # discarded explicitly = acknowledged
    # a malformed entry is counted (by the consumer) and skipped
    r.xadd(stream, {b"group": b"\xff not a protobuf"})
    assert learner.poll_and_step(block_ms=10) is None
    assert sample_value(registry, M.ENTRIES_MALFORMED_TOTAL) == 1
    with pytest.raises(ValueError, match="masked"):
        learner.train_on_groups([masked, make_group()])


# ------------------------------------------------------------------------- checkpoints and resume


class _AckFault:
    """Fault injection: a consumer whose acks are lost (the process 'dies' before XACK)."""

    def __init__(self, consumer):
        self._consumer = consumer
        self.drop_acks = False

    def ack(self, ids, **kw):
        if self.drop_acks:
            return 0
        return self._consumer.ack(ids, **kw)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def test_ack_after_checkpoint_resume_and_idempotent_redelivery(model_dir, bus, tmp_path):
    r, stream, producer = bus
    run_dir = tmp_path / "run"
    cfg = small_config(checkpoint_every=2, keep_checkpoints=2)
    channel = LocalWeightChannel()
    a = make_learner(model_dir, cfg, run_dir=run_dir, publisher=channel)
    a.connect_bus(r, stream=stream)
    groups = [make_group(version=0) for _ in range(12)]
    ids = [producer.publish(g) for g in groups]
    poll_until_step(a, 1)
    assert pending_ids(r, stream) == set(ids[:2])  # trained, not yet covered by a checkpoint
    assert ckpt.latest_checkpoint(run_dir) is None
    poll_until_step(a, 2)
    folder = ckpt.latest_checkpoint(run_dir)
    assert folder is not None and folder.name == "step_000002"
    assert pending_ids(r, stream) == set()  # acknowledged once the checkpoint is complete
    names = {p.name for p in folder.iterdir()}
    assert {"engine_theta", "p_old.safetensors", "p_samp.safetensors", "state.json", "rank_00000.json",
            "rank_00000.safetensors"} <= names
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 2 and state["p_samp_version"] == 2
    old2 = a.snapshot_state_dict("p_old")
    assert all(torch.equal(load_file(folder / "p_old.safetensors")[k], old2[k]) for k in old2)

    poll_until_step(a, 3)  # trained after the checkpoint: stays pending
    assert pending_ids(r, stream) == set(ids[4:6])
    # step 4 writes a checkpoint, but the acks get lost: the process "dies" right after `latest`
    a.consumer = _AckFault(a.consumer)
    a.consumer.drop_acks = True
    poll_until_step(a, 4)
    assert ckpt.latest_checkpoint(run_dir).name == "step_000004"
    assert pending_ids(r, stream) == set(ids[4:8])
    theta4 = a.theta_state_dict()
    trained_by_a = set(a._trained_ids)

    # restart: resume from step 4; the checkpoint lists the entries it commits, so the lost acks are
    # made good on resume (counted as trained in the ledger once) and nothing is trained twice
    registry = CollectorRegistry()
    b = make_learner(model_dir, cfg, run_dir=run_dir, publisher=channel, registry=registry)
    assert b.resume() == 4 and b.step == 4 and b.engine.global_steps == 4
    theta_b = b.theta_state_dict()
    assert all(torch.equal(theta_b[k], theta4[k]) for k in theta4)
    assert channel.latest_version() == 4
    b.connect_bus(r, stream=stream)
    stats = poll_until_step(b, 5)
    assert b.counters["duplicate"] == 0 and sample_value(registry, M.GROUPS_DUPLICATE_TOTAL) == 0
    assert not pending_ids(r, stream) & set(ids[4:8])  # acknowledged by the resume, never re-read
    assert set(b._trained_ids) - trained_by_a == {groups[8].group_id, groups[9].group_id}
    ledger = b.consumer.ledger()
    assert ledger["produced"] == 12 and ledger["trained"] == 8 and ledger["balanced"], ledger
    assert stats[-1]["version"] == 5 and channel.latest_version() == 5

    # a second restart from step 4 (b dies before its next checkpoint): same step 5, exactly
    c = make_learner(model_dir, cfg, run_dir=run_dir)
    assert c.resume() == 4
    c.connect_bus(r, stream=stream)
    poll_until_step(c, 5)  # ids[8:10] are pending for learner-0 (b read them): re-delivered first
    theta_c, theta_b5 = c.theta_state_dict(), b.theta_state_dict()
    assert all(torch.allclose(theta_c[k], theta_b5[k], atol=1e-6) for k in theta_c)  # optimizer state restored
    c.finish()  # final checkpoint at step 5 acknowledges them
    assert ckpt.latest_checkpoint(run_dir).name == "step_000005"
    assert pending_ids(r, stream) == set()
    ledger = c.consumer.ledger()
    assert ledger["trained"] == 10 and ledger["balanced"] and ledger["pending"] == 2, ledger
    lines = (run_dir / "trained_groups.txt").read_text().splitlines()
    assert sorted(ln.split("\t")[0] for ln in lines) == sorted(g.group_id for g in groups[:10])
    kept = [p.name for _, p in ckpt.list_checkpoints(run_dir)]
    assert kept == ["step_000004", "step_000005"]  # keep_checkpoints=2


def test_resume_without_checkpoint_is_a_no_op(model_dir, tmp_path):
    learner = make_learner(model_dir, small_config(checkpoint_every=1), run_dir=tmp_path / "run")
    assert learner.resume() is None and learner.step == 0


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapter_weights(model_dir, tmp_path):
    channel = LocalWeightChannel()
    learner = make_learner(model_dir, small_config(lora__enabled=True, checkpoint_every=1), run_dir=tmp_path / "run",
                           publisher=channel)
    names = learner.nets.trained["theta"].names
    assert names and all(".lora_" in n for n in names)
    assert any("attn.to_q" in n for n in names) and any("attn.add_k_proj" in n for n in names)
    anchor0 = {k: v.clone() for k, v in learner.anchor.state_dict().items()}
    base = dict(learner.engine.module.named_parameters())
    frozen0 = {n: p.detach().clone() for n, p in base.items() if ".lora_" not in n}
    lora0 = learner.theta_state_dict()
    for _ in range(3):
        learner.train_on_groups([make_group(), make_group()])
    frozen = {n: p.detach() for n, p in learner.engine.module.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(frozen0[n], frozen[n]) for n in frozen0)
    assert all(torch.equal(anchor0[k], v) for k, v in learner.anchor.state_dict().items())
    lora = learner.theta_state_dict()
    changed = [k for k in lora if not torch.equal(lora0[k], lora[k])]
    assert len(changed) >= len(lora) - 2  # (the last block's text-query adapter gets no gradient)
    version, kind, tensors = channel.fetch_newer(-1)
    assert (version, kind) == (3, "lora") and tensors and all("lora_" in k for k in tensors)
    folder = learner.save_checkpoint()
    assert set(load_file(folder / "p_samp.safetensors")) == set(names)
    # the engine checkpoint leaves the frozen base out
    engine_files = list((folder / "engine_theta").iterdir())
    assert sum(f.stat().st_size for f in engine_files) < 0.5 * sum(p.numel() * 4 for p in frozen0.values())
    # resume restores the adapters of θ, p_old and p_samp
    again = make_learner(model_dir, small_config(lora__enabled=True, checkpoint_every=1), run_dir=tmp_path / "run")
    assert again.resume() == 3
    restored = again.theta_state_dict()
    assert all(torch.equal(restored[k], lora[k]) for k in lora)
    old, old_again = learner.snapshot_state_dict("p_old"), again.snapshot_state_dict("p_old")
    assert all(torch.equal(old[k], old_again[k]) for k in old)


def test_bf16_lora_zero2_step(model_dir):
    """bf16 (DeepSpeed bf16, fp32 master weights) with LoRA under ZeRO-2; the snapshots stay fp32."""
    learner = make_learner(model_dir, small_config(dtype="bfloat16", lora__enabled=True, zero_stage=2))
    assert next(learner.engine.module.parameters()).dtype == torch.bfloat16
    lora0 = learner.theta_state_dict()
    for _ in range(2):
        stats = learner.train_on_groups([make_group(), make_group()])
        assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    lora = learner.theta_state_dict()
    assert any(not torch.equal(lora0[k], lora[k]) for k in lora)
    assert {t.dtype for t in learner.snapshot_state_dict("p_old").values()} == {torch.float32}
    tensors, kind = learner.publish_tensors()
    assert kind == "lora" and {t.dtype for t in tensors.values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ learning


def test_implicit_reward_learns_to_rank_by_the_reward(model_dir):
    """Rewards favour brighter x0 within each group: after a few steps the implicit reward of fresh
    groups (measured before each update) correlates with the centered advantage."""
    learner = make_learner(model_dir, small_config(groups_per_step=4, crd__num_noise_levels=4,
                                                   crd__kl_cfg_scale=1.0))
    corr = []
    for _ in range(10):
        stats = learner.train_on_groups([make_group(version=learner.step) for _ in range(4)])
        corr.append(stats["implicit_reward_corr"])
    assert corr[0] == 0.0  # θ = p_old at the first step: no implicit reward yet
    assert sum(corr[3:]) / len(corr[3:]) > 0.3, corr


# --------------------------------------------------------------------------------------- two ranks

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import CollectorRegistry
    from safetensors.torch import save_file
    from diffrl.embedded_redis import connect
    from diffrl.learner.config import LearnerConfig
    from diffrl.learner.learner import Learner
    from diffrl.models.adapter import FlowModel
    from diffrl.proto.weight_sync import LocalWeightChannel

    model_dir, url, stream, run_dir, out_dir, steps, zero = sys.argv[1:8]
    cfg = LearnerConfig(world_size=2, groups_per_step=4, torch_threads=1, checkpoint_every=2, read_block_ms=50,
                        lr=1e-3, zero_stage=int(zero), device="cpu", dtype="float32")
    cfg.crd.num_noise_levels = 2
    cfg.crd.kl_cfg_scale = 2.0
    channel = LocalWeightChannel()
    learner = Learner(cfg, FlowModel.from_pretrained(model_dir, device="cpu"), publisher=channel,
                      run_dir=run_dir, registry=CollectorRegistry())
    learner.connect_bus(connect(url), stream=stream)
    losses = []
    while learner.step < int(steps):
        stats = learner.poll_and_step()
        if stats is not None:
            losses.append(stats["loss"])
    learner.finish()
    save_file(learner.theta_state_dict(), f"{out_dir}/theta_{learner.rank}.safetensors")
    save_file(learner.snapshot_state_dict("p_old"), f"{out_dir}/old_{learner.rank}.safetensors")
    with open(f"{out_dir}/rank_{learner.rank}.json", "w") as f:
        json.dump({"losses": losses, "consumer": learner.consumer.consumer_name, "trained": list(learner._trained_ids),
                   "published": channel.latest_version()}, f)
    learner.close()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_identical_theta(model_dir, bus, redis_server, tmp_path, zero_stage):
    r, stream, producer = bus
    steps = 3
    gids = []
    for _ in range(4 * steps):
        g = make_group(version=0)
        gids.append(g.group_id)
        producer.publish(g)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(model_dir), redis_server.url, stream, str(tmp_path / "run"), str(out),
             str(steps), str(zero_stage)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    th0, th1 = load_file(out / "theta_0.safetensors"), load_file(out / "theta_1.safetensors")
    assert th0.keys() == th1.keys() and all(torch.equal(th0[k], th1[k]) for k in th0)
    o0, o1 = load_file(out / "old_0.safetensors"), load_file(out / "old_1.safetensors")
    assert all(torch.equal(o0[k], o1[k]) for k in o0)
    info = [json.loads((out / f"rank_{i}.json").read_text()) for i in range(2)]
    assert [i["consumer"] for i in info] == ["learner-0", "learner-1"]
    for i in info:
        assert len(i["losses"]) == steps and all(math.isfinite(x) for x in i["losses"])
    assert info[0]["losses"] == pytest.approx(info[1]["losses"])  # reduced over ranks
    trained0, trained1 = set(info[0]["trained"]), set(info[1]["trained"])
    assert not trained0 & trained1 and trained0 | trained1 == set(gids)  # G/world_size groups per rank
    assert info[0]["published"] == steps and info[1]["published"] == -1  # rank 0 publishes
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert folder.name == f"step_{steps:06d}"
    assert {"rank_00000.json", "rank_00001.json"} <= {p.name for p in folder.iterdir()}
    assert pending_ids(r, stream) == set()
