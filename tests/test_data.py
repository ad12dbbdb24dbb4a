"""Prompt sets (diffrl/data.py): built-in names, .txt and .jsonl files with reward metadata, and clear
start-up errors naming the file and line."""

import json

import pytest

from diffrl.actors.prompts import PromptSource
from diffrl.config import ConfigError, load_config
from diffrl.data import DataConfig, PromptItem, builtin_names, load_prompt_set
from diffrl.models.shapes_world import eval_prompts, train_prompts
from diffrl.schema import TrainConfig


def test_builtin_sets_are_the_shapes_splits():
    assert {"shapes:train", "shapes:eval", "shapes:all"} <= set(builtin_names())
    train = load_prompt_set("shapes:train")
    assert train.prompts == train_prompts() and train.world == "shapes"
    assert all(item.metadata == {} for item in train.items)
    assert load_prompt_set("shapes:eval").prompts == eval_prompts()
    with pytest.raises(ValueError, match="unknown built-in prompt set 'shapes:test'"):
        load_prompt_set("shapes:test")


def test_txt_file_skips_blank_lines_and_comments(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na red circle\n\n  two blue squares  \n")
    ps = load_prompt_set(str(f))
    assert ps.prompts == ["a red circle", "two blue squares"] and ps.world == ""


def test_jsonl_metadata_becomes_the_reward_string_map(tmp_path):
    f = tmp_path / "ocr.jsonl"
    rows = [{"prompt": 'a sign that says "hello"', "metadata": {"text": "hello"}},
            {"prompt": "two dogs", "metadata": {"count": 2, "objects": [{"class": "dog", "count": 2}], "ok": True}},
            {"prompt": "no metadata"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_prompt_set(str(f)).items
    assert items[0] == PromptItem('a sign that says "hello"', {"text": "hello"})
    assert items[1].metadata == {"count": "2", "objects": '[{"class":"dog","count":2}]', "ok": "true"}
    assert items[2].metadata == {}


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"bad\.jsonl:2: not JSON"),
    ('{"prompt": "ok"}\n\n["a list"]\n', r"bad\.jsonl:3: expected an object"),
    ('{"text": "no prompt"}\n', r"bad\.jsonl:1: expected a non-empty \"prompt\" string"),
    ('{"prompt": "x", "metadata": "text"}\n', r"bad\.jsonl:1: \"metadata\" must be an object"),
    ('{"prompt": "x", "meta": {}}\n', r"bad\.jsonl:1: unknown key 'meta'"),
    ("\n\n", r"bad\.jsonl: no prompts in the file"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        DataConfig(train=str(f), eval="shapes:eval").load()
    assert err.value.field == "data.train"


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.eval: .*nope\.txt: no such file"):
        DataConfig(eval=str(tmp_path / "nope.txt")).load()
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="no prompts in the file"):
        DataConfig(train=str(tmp_path / "empty.txt")).load()
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"expected a \.txt or \.jsonl prompt file"):
        DataConfig(train=str(tmp_path / "p.csv")).load()


def test_held_out_prompts_are_never_trained_on(tmp_path):
    (tmp_path / "train.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "eval.txt").write_text("a green triangle\na blue square\n")
    with pytest.raises(ConfigError, match=r"data\.eval: 1 of its prompts are also in data\.train.*'a blue square'"):
        DataConfig(train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.txt")).load()
    with pytest.raises(ConfigError, match="also in data.train"):
        DataConfig(train="shapes:all", eval="shapes:eval").load()
    train, held_out = DataConfig().load()
    assert not set(train.prompts) & set(held_out.prompts)


def test_recipe_field_and_sharding_of_items(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "metadata": {"i": i}}) + "\n" for i in range(7)))
    cfg = load_config(TrainConfig, None, [f"data.train={f}"])
    items = load_prompt_set(cfg.data.train).items
    shards = [PromptSource(items, i, 2, seed=3) for i in range(2)]
    seen = [item for s in shards for item in s.take(len(s._order))]
    assert sorted(seen, key=lambda it: it.prompt) == items  # every item once per epoch, metadata kept
    assert all(item.metadata == {"i": item.prompt[1:]} for item in seen)


def test_train_cli_fails_at_start_naming_the_line(tmp_path, capsys):
    from diffrl.cli import main

    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    code = main(["train", f"data.train={f}", f"run.output_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert f"data.train: {f}:2: expected a non-empty \"prompt\" string" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started, no run folder
