"""The text world: grammar, splits, renders, the character-level tokenizer, the OCR reward on renders
and on wrong images, the held-out metrics, and the ocr-cpu recipe through a real OCR server."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffrl import text_eval
from diffrl.data import load_prompt_set
from diffrl.models import text_world as tw
from diffrl.reward_servers.scorers.ocr import OcrOptions, OcrScorer

REPO = Path(__file__).resolve().parents[1]
EVAL_DIGEST = hashlib.sha256("\n".join(tw.eval_words()).encode()).hexdigest()


# ------------------------------------------------------------------------------ grammar and splits
@pytest.mark.parametrize("bad", ["", "lamp", 'a sign that says lamp', 'a sign that says "la"',
                                 'a sign that says "lamps"', 'a sign that says "l4mp"', 'a sign saying "lamp"',
                                 'a sign that says "lamp" twice', 'a sign that says ""'])
def test_parse_prompt_refuses_what_is_not_the_grammar(bad):
    with pytest.raises(ValueError, match="prompt"):
        tw.parse_prompt(bad)


def test_parse_prompt_round_trips_and_tolerates_case_space_and_curly_quotes():
    for word in tw.WORDS[::37]:
        assert tw.parse_prompt(tw.format_prompt(word)) == word
    assert tw.parse_prompt('  A  Sign that SAYS "LaMp" ') == "lamp"
    assert tw.parse_prompt("a sign that says \u201clamp\u201d") == "lamp"
    with pytest.raises(ValueError, match="letters"):
        tw.format_prompt("lamps")


def test_splits_are_disjoint_fixed_and_keep_every_letter_in_training():
    train, held = tw.train_words(), tw.eval_words()
    assert not set(train) & set(held) and sorted(train + held) == sorted(tw.WORDS)
    assert len(set(tw.WORDS)) == len(tw.WORDS) == 868
    sizes = tw.split_sizes()
    assert sizes["eval"] == len(held) and 0.10 < sizes["eval"] / sizes["all"] < 0.14
    assert sizes["eval_3_letters"] > 20 and sizes["eval_4_letters"] > 40  # both lengths held out
    assert set("".join(train)) == set("abcdefghijklmnopqrstuvwxyz")  # unseen words, seen letters
    assert hashlib.sha256("\n".join(tw.eval_words()).encode()).hexdigest() == EVAL_DIGEST
    # the built-in prompt sets are the splits, tagged with their world
    for split, words in (("train", train), ("eval", held)):
        s = load_prompt_set(f"text:{split}")
        assert s.world == "text" and [tw.parse_prompt(p) for p in s.prompts] == words


# ------------------------------------------------------------------------------ renders
def test_renders_are_deterministic_ink_only_the_text_band_and_vary_with_the_seed():
    prompts = tw.split_prompts("eval")[:24]
    a = tw.render_batch(prompts, range(24))
    assert a.shape == (24, tw.IMAGE_SIZE, tw.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, tw.render_batch(prompts, range(24)))
    assert np.array_equal(a[3], tw.render_prompt(prompts[3], 3))
    ink = text_eval.ink_mask(a)
    m = tw.MARGIN_ROWS
    assert not ink[:, :m].any() and not ink[:, -m:].any() and ink.sum(axis=(1, 2)).min() > 20
    b = tw.render_batch(prompts, range(100, 124))
    assert (a != b).any(axis=(1, 2, 3)).mean() > 0.5  # colour and offset change with the seed
    # longer words take more columns: the fixed pitch puts letter i in slot i
    three = tw.render_prompt(tw.format_prompt("cat"), 0)
    four = tw.render_prompt(tw.format_prompt("cats"), 0)
    cols = [text_eval.ink_mask(x[None])[0].any(axis=0).sum() for x in (three, four)]
    assert cols[1] >= cols[0] + 4


def test_the_base_model_tokenizer_is_character_level(tmp_path):
    from diffrl.models.tiny_sd3 import write_clip_tokenizer

    tok = write_clip_tokenizer(tmp_path, words=[], max_length=24, chars=tw.TEXT_TOKENIZER_CHARS)
    ids = tok(tw.format_prompt("lamp")).input_ids
    assert len(ids) <= 24 and tok.unk_token_id not in ids[1:-1]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-6:-1] == ["l", "a", "m", "p</w>", '"</w>']  # one token per letter


# ------------------------------------------------------------------------------ the OCR reward
@pytest.fixture(scope="module")
def ocr():
    scorer = OcrScorer(OcrOptions(metric="normalized"))
    yield scorer
    scorer.close()


def test_ocr_reads_ground_truth_renders_and_refuses_blank_and_wrong_words(ocr):
    prompts = tw.split_prompts("eval")[:40]
    renders = list(tw.render_batch(prompts, range(40)))
    scores, _ = ocr.score_batch(renders, prompts, [{}] * 40)
    assert np.mean(np.array(scores) == 1.0) >= 0.9 and np.mean(scores) >= 0.95
    blank = [np.full_like(renders[0], 245)] * 4
    assert ocr.score_batch(blank, prompts[:4], [{}] * 4)[0] == [0.0] * 4
    # each image shows another prompt's word: low, though letters in common still earn a little
    wrong, _ = ocr.score_batch(renders[1:] + renders[:1], prompts, [{}] * 40)
    assert np.mean(wrong) < 0.3 and np.mean(np.array(wrong) == 1.0) == 0.0
    # 32 px signs are enlarged before recognition; unenlarged tesseract misses most of them
    raw = OcrScorer(OcrOptions(metric="normalized", upscale=1))
    try:
        raw_exact = np.mean(np.array(raw.score_batch(renders, prompts, [{}] * 40)[0]) == 1.0)
        assert raw_exact < np.mean(np.array(scores) == 1.0) - 0.1  # 0.75 against 1.0 here
    finally:
        raw.close()


# ------------------------------------------------------------------------------ held-out metrics
def test_held_out_metrics_are_perfect_on_renders_and_fall_with_damage():
    prompts = [p for p in tw.split_prompts("eval")[:16] for _ in range(2)]
    seeds = list(range(len(prompts)))
    renders = tw.render_batch(prompts, seeds)
    clean = text_eval.text_world_metrics(renders, prompts, [s + 500 for s in seeds], judge=False)
    assert clean["fidelity"] == 1.0 and clean["background_clean"] == 1.0 and clean["ocr_exact"] >= 0.9
    assert clean["fid_text"] < 1.0 and clean["diversity"] > 0.02 and "rapid_exact" not in clean
    noisy = np.clip(renders + np.random.default_rng(0).normal(0, 40, renders.shape), 0, 255).astype(np.uint8)
    damaged = text_eval.text_world_metrics(noisy, prompts, seeds, judge=False)
    assert damaged["fidelity"] < 0.6 and damaged["background_clean"] < 0.6
    assert damaged["fid_text"] > 10 * max(clean["fid_text"], 0.1)
    same = np.repeat(renders[::2], 2, axis=0)  # both seeds of each prompt give one picture
    assert text_eval.text_world_metrics(same, prompts, seeds, judge=False)["diversity"] == 0.0
    sem = clean["ocr_exact_sem"]
    assert math.isclose(sem, math.sqrt(clean["ocr_exact"] * (1 - clean["ocr_exact"]) / len(prompts)))


def test_rapidocr_judge_reads_renders():
    pytest.importorskip("rapidocr_onnxruntime")
    prompts = tw.split_prompts("eval")[:20]
    reads = text_eval.rapid_read(list(tw.render_batch(prompts, range(20))))
    exact = np.mean([r.lower().replace(" ", "") == tw.parse_prompt(p) for r, p in zip(reads, prompts)])
    assert exact >= 0.8


def test_pretrain_refuses_an_image_size_that_is_not_the_worlds():
    from diffrl.config import ConfigError, load_config
    from diffrl.models.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="image_size"):
        load_config(PretrainConfig, str(REPO / "deploy/configs/pretrain-text.yaml"), ["unet.image_size=64"]).validate()
    with pytest.raises(ConfigError, match="world"):
        load_config(PretrainConfig, None, ["world=clouds"]).validate()


# ------------------------------------------------------------------------------ the recipe, end to end
@pytest.mark.slow
def test_ocr_recipe_trains_three_steps_through_a_real_ocr_server(tmp_path):
    from diffrl.config import load_config
    from diffrl.job import train
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, str(REPO / "deploy/configs/ocr-cpu.yaml"), [
        f"model.path={REPO / 'assets/text-base'}", f"run.output_dir={tmp_path}", "run.name=ocr", "run.max_steps=3",
        "run.eval_every=3", "run.progress=false", "eval.max_prompts=3", "eval.num_steps=2", "sampler.k=4",
        "sampler.groups_per_round=1", "sampler.max_pending_groups=2", "sampler.sampling.num_steps=2",
        "learner.groups_per_step=2", "learner.crd.num_noise_levels=2", "learner.crd.num_sampling_steps=2",
        "ray.temp_dir=/tmp/diffrl-ray-test"])
    run_dir = train(cfg)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == [1, 2, 3]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and math.isfinite(r["loss"]) for r in train_steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_counters"]["groups_trained"] == 6
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3]
    for e in evals:  # the OCR server's reward and the world's own metrics, on the held-out words
        assert e["images"] == 3 * 2 and e["eval_groups_masked"] == 0
        assert 0 <= e["reward_ocr"] <= 1 and 0 <= e["pass_ocr"] <= 1 and 0 <= e["ocr_exact"] <= 1
        assert 0 <= e["fidelity"] <= 1 and e["fid_text"] >= 0 and "strict" not in e
    assert (run_dir / "grids" / "step_000003.png").is_file()


def test_diffrl_eval_scores_text_prompts_with_the_ocr_reward_by_default():
    import argparse

    from diffrl.cli import load_eval_config

    def args(*config, prompts=None):
        return argparse.Namespace(config=list(config), split=None, prompts=prompts, model=None)

    cfg, _ = load_eval_config(args(prompts="text:eval"))
    assert [(r.name, r.serve_args) for r in cfg.rewards] == [("ocr", ["scorer.metric=normalized"])]
    assert [r.name for r in load_eval_config(args())[0].rewards] == ["shapes"]
    assert load_eval_config(args("rewards=[]", prompts="text:eval"))[0].rewards == []  # the user's choice stands


def test_pretrain_text_world_then_continue_from_its_output(tmp_path):
    """``diffrl pretrain world=text`` trains on the world's renders with a character-level tokenizer;
    ``init=`` continues from a saved pipeline; ``snapshot_every`` saves intermediate EMA weights."""
    import torch

    from diffrl.config import load_config
    from diffrl.models.adapter import FlowModel
    from diffrl.models.pretrain import PretrainConfig, pretrain

    small = ["unet.channels=[8,16]", "unet.text_hidden=16", "unet.text_projection=16", "batch_size=4",
             "warmup_steps=1", "unet.attention_head_dim=8"]
    first = load_config(PretrainConfig, str(REPO / "deploy/configs/pretrain-text.yaml"),
                        [f"output={tmp_path / 'a'}", "max_steps=2", "snapshot_every=1", *small])
    assert pretrain(first, progress=False)["steps"] == 2
    assert (tmp_path / "a-step1" / "model_index.json").is_file()
    tokens = FlowModel.from_pretrained(str(tmp_path / "a"), device="cpu").pipe.tokenizer.tokenize('"lamp"')
    assert tokens == ['"</w>', "l", "a", "m", "p</w>", '"</w>']
    again = load_config(PretrainConfig, str(REPO / "deploy/configs/pretrain-text.yaml"),
                        [f"output={tmp_path / 'b'}", f"init={tmp_path / 'a'}", "max_steps=1", "snapshot_every=0",
                         "lr=0.1", *small])
    pretrain(again, progress=False)
    a = FlowModel.from_pretrained(str(tmp_path / "a"), device="cpu").transformer.state_dict()
    b = FlowModel.from_pretrained(str(tmp_path / "b"), device="cpu").transformer.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained on from a
    assert not (tmp_path / "b-step1").exists()
    with pytest.raises(Exception, match="init"):
        load_config(PretrainConfig, None, [f"init={tmp_path / 'nothing'}"]).validate()


def test_shipped_text_base_spells_some_words_and_draws_the_world():
    """assets/text-base (docs/text_world.md, "The base model"): diffusers loads it, its tokenizer is
    character-level, and it writes legible words on clean signs; a random model reads as nothing."""
    from diffrl.models.adapter import FlowModel

    model = FlowModel.from_pretrained(str(REPO / "assets/text-base"), device="cpu")
    assert model.pipe.tokenizer.tokenize('"zinc"') == ['"</w>', "z", "i", "n", "c</w>", '"</w>']
    prompts = tw.split_prompts("train")[::48]  # 16 training words
    seeds = list(range(len(prompts)))
    images = model.generate(prompts, seeds, num_steps=10, guidance_scale=1.0)
    assert images.shape == (len(prompts), 32, 32, 3) and images.dtype == np.uint8
    m = text_eval.text_world_metrics(images, prompts, seeds, judge=False)
    assert m["ocr_score"] >= 0.5 and m["ocr_exact"] >= 0.2, m
    assert m["fidelity"] >= 0.97 and m["background_clean"] >= 0.97, m
