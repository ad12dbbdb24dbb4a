"""Prompt sets: what the samplers train on (``data.train``) and what evaluation holds out (``data.eval``).

A prompt set is named by a built-in name or a file:

- built-in: ``shapes:train``, ``shapes:eval`` (held out), ``shapes:all`` (the shapes world's
  splits, docs/shapes_world.md) and ``text:train``, ``text:eval``, ``text:all`` (the text world's,
  docs/text_world.md); other worlds register theirs with :func:`register_prompt_set`.
- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
- ``.jsonl``: one JSON object per line, ``{"prompt": "...", "metadata": {...}}`` (metadata optional).
  The metadata reaches the reward servers as the item's metadata (e.g. ``{"text": "hello"}`` for the
  OCR reward, ``{"count": 2}`` for the detector). Reward metadata is a string map: string values
  pass as they are, numbers and booleans as their JSON text (``2`` -> ``"2"``), lists and objects as
  compact JSON (GenEval-style object lists).

A relative path is looked up in the working directory, then in the repository (so the shipped
``deploy/data`` files are found from anywhere). Every problem (a missing or empty file, a line that
is not JSON, an object without a ``prompt`` string) fails when the run starts, naming the file and
the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffrl.config import ConfigError, require

FILE_SUFFIXES = (".txt", ".jsonl")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PromptItem:
    """One prompt and the metadata its rewards read."""

    prompt: str = ""
    """The prompt text the model is conditioned on."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Per-prompt metadata sent to every reward server with the prompt's group."""


@dataclass
class PromptSet:
    """A loaded prompt set."""

    name: str = ""
    """What the user gave: a built-in name or a file path."""
    items: list[PromptItem] = field(default_factory=list)
    """The prompts, in file order."""
    world: str = ""
    """The built-in world the prompts belong to ('shapes', 'text'; '' for files): evaluation adds that
    world's own metrics."""

    @property
    def prompts(self) -> list[str]:
        return [item.prompt for item in self.items]


_BUILTIN: dict[str, tuple[str, Callable[[], list[str]]]] = {}


def register_prompt_set(name: str, world: str, prompts: Callable[[], list[str]]) -> None:
    """Make ``name`` (``world:split``) a built-in prompt set whose prompts ``prompts()`` returns."""
    _BUILTIN[name] = (world, prompts)


def builtin_names() -> list[str]:
    _register_worlds()
    return sorted(_BUILTIN)


def _register_worlds() -> None:
    """The built-in worlds' splits: ``shapes:train`` ... ``text:all``."""
    if "shapes:train" in _BUILTIN:
        return
    from diffrl.models.worlds import WORLDS, get_world

    for world in WORLDS:
        for split in ("train", "eval", "all"):
            register_prompt_set(f"{world}:{split}", world,
                                lambda world=world, split=split: get_world(world).split_prompts(split))


def metadata_value(value) -> str:
    """A JSON metadata value as the string the reward servers receive."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def resolve_file(path: str) -> Path:
    """``path`` as given, else relative to the repository (shipped data files)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def _parse_jsonl_line(line: str, where: str) -> PromptItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise ValueError(f"{where}: expected an object like {{\"prompt\": ...}}, got {kind}")  # noqa: TRY004
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: expected a non-empty \"prompt\" string")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise ValueError(f"{where}: \"metadata\" must be an object, got {kind}")  # noqa: TRY004
    unknown = sorted(set(record) - {"prompt", "metadata"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (keys: prompt, metadata)")
    return PromptItem(prompt, {str(k): metadata_value(v) for k, v in metadata.items()})


def read_prompt_file(path: str) -> list[PromptItem]:
    """The items of a .txt or .jsonl prompt file (ValueError naming the file and line on bad input)."""
    file = resolve_file(path)
    if file.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: expected a .txt or .jsonl prompt file or a built-in set "
                         f"({', '.join(builtin_names())})")
    if not file.is_file():
        raise ValueError(f"{path}: no such file")
    items = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or (file.suffix == ".txt" and text.startswith("#")):
                continue
            items.append(_parse_jsonl_line(text, f"{path}:{number}") if file.suffix == ".jsonl"
                         else PromptItem(text))
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def load_prompt_set(spec: str) -> PromptSet:
    """The prompt set named by ``spec`` (a built-in name or a file)."""
    _register_worlds()
    if spec in _BUILTIN:
        world, prompts = _BUILTIN[spec]
        return PromptSet(spec, [PromptItem(p) for p in prompts()], world)
    if ":" in spec and Path(spec).suffix not in FILE_SUFFIXES:
        raise ValueError(f"unknown built-in prompt set {spec!r} (built-in: {', '.join(builtin_names())})")
    return PromptSet(spec, read_prompt_file(spec))


def load_field(spec: str, name: str) -> PromptSet:
    """:func:`load_prompt_set` with problems raised as a ConfigError of config field ``name``."""
    try:
        return load_prompt_set(spec)
    except ValueError as err:
        raise ConfigError(name, str(err)) from None


@dataclass
class DataConfig:
    """The prompts of a run."""

    train: str = "shapes:train"
    """Prompts the samplers train on: a built-in set (shapes:train|eval|all, text:train|eval|all) or a
    .txt (one prompt per line) or .jsonl ({"prompt": ..., "metadata": {...}} per line) file."""
    eval: str = "shapes:eval"
    """Held-out prompts of the evaluations (same forms); none of them may be in data.train."""

    def validate(self) -> None:
        require(bool(self.train.strip()), "train", "a built-in prompt set or a .txt/.jsonl file", self.train)
        require(bool(self.eval.strip()), "eval", "a built-in prompt set or a .txt/.jsonl file", self.eval)

    def load(self) -> tuple[PromptSet, PromptSet]:
        """Both sets, checked: readable, non-empty, and no held-out prompt among the training prompts."""
        train, held_out = load_field(self.train, "data.train"), load_field(self.eval, "data.eval")
        overlap = set(train.prompts) & set(held_out.prompts)
        if overlap:
            raise ConfigError("data.eval", f"{len(overlap)} of its prompts are also in data.train "
                              f"(held-out prompts are never trained on), e.g. {min(overlap)!r}")
        return train, held_out
