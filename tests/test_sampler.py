"""The sampler in-process with real parts: a tiny SD3 model, a real shapes reward server process over
HTTP, a real embedded Redis, and the local weight channel."""

import threading
import time

import pytest
import torch

from diffrl.actors.config import SamplerConfig
from diffrl.actors.prompts import PromptSource
from diffrl.actors.sampler import MaskedRoundsError, Sampler, sample_seeds
from diffrl.data import PromptItem
from diffrl.embedded_redis import EmbeddedRedis
from diffrl.models.adapter import FlowModel
from diffrl.models.config import SamplingConfig
from diffrl.models.shapes_world import train_prompts
from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer
from diffrl.proto.codec import tensor_from_proto
from diffrl.proto.weight_sync import LocalWeightChannel
from diffrl.reward_servers.client import RewardClientConfig, RewardEndpointConfig, SyncRewardClient
from diffrl.reward_servers.process import LocalRewardServer
from diffrl.utils import free_port

K, G = 4, 2


def test_prompt_source_shards_are_disjoint_and_cover_everything():
    prompts = [f"p{i}" for i in range(10)]
    shards = [PromptSource(prompts, i, 3, seed=5) for i in range(3)]
    epoch = [[item.prompt for item in s.take(len(s._order))] for s in shards]
    flat = [p for shard in epoch for p in shard]
    assert sorted(flat) == sorted(prompts)  # one epoch: each prompt exactly once over all shards
    again = PromptSource(prompts, 1, 3, seed=5)
    assert [item.prompt for item in again.take(len(epoch[1]))] == epoch[1]  # deterministic
    nxt = [item.prompt for item in shards[0].take(len(epoch[0]))]
    assert sorted(nxt) == sorted(epoch[0]) or set(nxt) != set(epoch[0])  # next epoch re-permuted
    with pytest.raises(ValueError):
        PromptSource([], 0, 1)


def test_sample_seeds_are_distinct_and_reproducible():
    a = sample_seeds(0, "s0", "abc", 3, 64)
    assert len(set(a)) == 64 and a == sample_seeds(0, "s0", "abc", 3, 64)
    assert set(a).isdisjoint(sample_seeds(0, "s0", "abc", 4, 64))
    assert set(a).isdisjoint(sample_seeds(0, "s1", "abc", 3, 64))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    pipe = build_tiny_sd3(TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16),
                          root / "w")
    pipe.save_pretrained(str(root / "model"))
    return FlowModel.from_pretrained(str(root / "model"), device="cpu")


@pytest.fixture(scope="module")
def shapes_server():
    with LocalRewardServer("shapes") as server:
        yield server


@pytest.fixture()
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def make_sampler(model, url, redis_server, weights=None, prompts=None, **overrides):
    cfg = SamplerConfig(**{"k": K, "groups_per_round": G, "sampling": SamplingConfig(num_steps=2), **overrides})
    client = SyncRewardClient(RewardClientConfig(rewards=[RewardEndpointConfig(name="shapes", urls=[url],
                                                                                retries=1, timeout_s=10)]))
    producer = ExperienceProducer(redis_server.client(), stream="experience")
    source = PromptSource(prompts or train_prompts(), 0, 1)
    return Sampler("s0", cfg, model, client, producer, source, weights=weights), client


def test_round_publishes_scored_groups_and_follows_new_weights(model, shapes_server, redis_server):
    weights = LocalWeightChannel()
    sampler, client = make_sampler(model, shapes_server.url, redis_server, weights=weights)
    consumer = ExperienceConsumer(redis_server.client(), stream="experience")
    try:
        result = sampler.run_round()
        assert result.groups == G and result.masked == 0 and result.images == G * K and result.version == 0
        entries = consumer.read(max_groups=10, block_ms=100)
        assert len(entries) == G
        ids = {group.group_id for _, group in entries}
        assert len(ids) == G
        for _, group in entries:
            assert group.sampler_id == "s0" and group.policy_version == 0 and not group.masked
            assert len(group.samples) == K
            seeds = [s.seed for s in group.samples]
            assert len(set(seeds)) == K
            for s in group.samples:
                assert tensor_from_proto(s.latent).shape == model.latent_shape
                assert 0.0 <= s.rewards["shapes"] <= 1.0
        # the sample stored is exactly what the seed regenerates
        _, first = entries[0]
        regenerated = model.sample([first.prompt], [first.samples[0].seed], num_steps=2)
        assert torch.allclose(regenerated[0], tensor_from_proto(first.samples[0].latent), atol=1e-5)

        # a newer p_samp is picked up before the next round
        new_state = {k: v + 0.01 for k, v in model.transformer.state_dict().items()}
        weights.publish(1, new_state)
        result = sampler.run_round()
        assert sampler.version == 1 and result.version == 1
        assert torch.allclose(model.transformer.state_dict()[next(iter(new_state))], next(iter(new_state.values())))
        entries = consumer.read(max_groups=10, block_ms=100)
        assert [g.policy_version for _, g in entries] == [1] * G
        assert not ids & {g.group_id for _, g in entries}
    finally:
        client.close()


def test_failed_reward_masks_the_whole_group_never_zero(model, redis_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sampler, client = make_sampler(model, dead, redis_server)
    try:
        result = sampler.run_round()
        assert result.groups == G and result.masked == G
        entries = ExperienceConsumer(redis_server.client(), stream="experience").read(max_groups=10, block_ms=100)
        for _, group in entries:
            assert group.masked and "shapes" in group.mask_reason
            assert all(len(s.rewards) == 0 for s in group.samples)  # no made-up scores
    finally:
        client.close()


def test_rejected_prompts_are_masked_counted_and_the_sampler_gives_up(model, shapes_server, redis_server):
    """A prompt the reward refuses (422: outside the shapes grammar) masks its group with the reason;
    after max_masked_rounds all-masked rounds in a row the sampler stops with that reason."""
    prompts = [PromptItem("a photo of a cat"), PromptItem("a sign that says \"hi\"")]
    sampler, client = make_sampler(model, shapes_server.url, redis_server, prompts=prompts, max_masked_rounds=3,
                                   masked_backoff_s=0.0)
    try:
        with pytest.raises(MaskedRoundsError, match=r"every group of the last 3 rounds was masked.*rejected"):
            sampler.run(max_rounds=10)
        assert sampler.rounds == 3 and sampler.masked_rounds_in_row == 3
        assert sampler.metrics.masked.labels("s0", "rejected")._value.get() == 3 * G
        entries = ExperienceConsumer(redis_server.client(), stream="experience").read(max_groups=50, block_ms=100)
        assert len(entries) == 3 * G and all(g.masked and "422" in g.mask_reason for _, g in entries)
    finally:
        client.close()
    # one scored round resets the count
    mixed = [PromptItem("a photo of a cat"), PromptItem(train_prompts()[0])]
    sampler, client = make_sampler(model, shapes_server.url, redis_server, prompts=mixed, max_masked_rounds=3,
                                   masked_backoff_s=0.0, groups_per_round=1)
    try:  # one group per round: at most 2 cats in a row (the end of one epoch, the start of the next)
        assert sampler.run(max_rounds=6) == 6
    except MaskedRoundsError:
        pytest.fail("a round with a scored group must reset the all-masked count")
    finally:
        client.close()


def test_backpressure_pauses_until_the_learner_catches_up(model, shapes_server, redis_server):
    sampler, client = make_sampler(model, shapes_server.url, redis_server, max_pending_groups=1,
                                   backpressure_poll_s=0.05)
    consumer = ExperienceConsumer(redis_server.client(), stream="experience")
    try:
        sampler.run_round()  # G = 2 groups > max_pending_groups = 1
        done = threading.Event()
        thread = threading.Thread(target=lambda: (sampler.run_round(), done.set()))
        thread.start()
        time.sleep(1.0)
        assert not done.is_set()  # paused: nothing consumed yet
        entries = consumer.read(max_groups=10, block_ms=100)
        consumer.ack([entry_id for entry_id, _ in entries])  # the learner catches up
        thread.join(60)
        assert done.is_set() and sampler.published == 2 * G
        assert sampler.metrics.backpressure._value.get() >= 0.9
    finally:
        client.close()


def test_lora_update_is_applied_exactly(tmp_path):
    """A kind=lora update (peft naming, as the learner publishes) gives the sampler the same denoiser."""
    import copy

    from peft import get_peft_model_state_dict

    from diffrl.models.lora import LoraConfig, inject_lora

    pipe = build_tiny_sd3(TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16),
                          tmp_path / "w")
    pipe.save_pretrained(str(tmp_path / "m"))
    model = FlowModel.from_pretrained(str(tmp_path / "m"), device="cpu")
    lora = LoraConfig(enabled=True, rank=2, alpha=4.0)
    trained = inject_lora(copy.deepcopy(model.transformer), lora)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    weights = LocalWeightChannel()
    weights.publish(3, get_peft_model_state_dict(trained), kind="lora")

    class NoSink:
        def publish(self, group):
            return ""

        def backlog(self):
            return 0

    sampler = Sampler("s-lora", SamplerConfig(k=2), model, scorer=None, sink=NoSink(),
                      prompts=PromptSource(train_prompts(), 0, 1), weights=weights, lora=lora)
    assert sampler.maybe_update_weights() and sampler.version == 3
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.9])
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.allclose(model.velocity(x, sigma, cond), model.velocity(x, sigma, cond, transformer=trained),
                              atol=1e-6)
