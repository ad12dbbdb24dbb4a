"""A differentiable shapes-world reward: a small CNN that counts objects of each kind.

The exact shapes-world reward (``reward_servers/scorers/shapes.py``) is a rule-based detector with
no gradient. Algorithms that follow the reward's gradient through the image (DIDR) use this network
instead: it maps an image ``[B, 3, H, W]`` in [0, 1] to count logits ``[B, 13, 6]``, one 6-way
classification (0, 1, 2, 3, 4, 5 or more) per slot of ``KINDS``: the 12 (colour, shape) kinds in
``COLORS`` x ``SHAPES`` order, then "other" (objects whose colour is off the palette, which the
detector reports with colour ``OTHER``).

The default head counts the way the detector does, object by object: a 1x1 convolution of the last
feature map gives, per position and slot, a non-negative density, and the slot's count estimate c is
the density's total over the image; the logits of the count classes are -w (c - n)^2 + b[n], a
discretised bell around c (b learnt per slot, the sharpness w > 0 per image and slot from the averaged
features: crisp images get sharp bells, blurry ones wide). A sum over positions generalises to unseen
compositions of counts (the eval prompts) far better than an MLP of the averaged features
(``head="mlp"``): trained alike for 90 s on renders, 0.99 against 0.31 of eval-prompt renders get
every count right.

A prompt asks for a count per slot (``want_counts``: the prompt's count for the kinds it names, 0
for every other kind and for "other"), so the detector's strict pass ("the detected multiset equals
the prompt's") is "every slot's count equals the wanted count". The reward is the network's
probability of that event, with the slots treated as independent::

    P(strict | image, prompt) = prod_k softmax(logits[k])[want_k]

``score="prob"`` returns P (in [0, 1]), ``score="log_prob"`` returns log P (a sum of log-softmax
terms, whose gradient does not vanish when P is tiny).

Files (``save_pretrained`` / ``load_reward_model``): ``config.json`` (``"class"``, the network
config with the score mode, the slot names) and ``model.safetensors``. ``load_reward_model`` picks
the class by ``config.json``'s ``"class"`` through ``REWARD_MODEL_LOADERS`` and returns a frozen
module in eval mode: gradients reach the input image only. The shipped model,
``assets/shapes-reward-cnn``, is trained by ``diffrl reward-model`` (``diffrl/reward_model.py``;
docs/shapes_world.md has its data mix and held-out agreement with the detector).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from diffrl.config import ConfigError, require
from diffrl.models.shapes_world import COLORS, IMAGE_SIZE, SHAPES, parse_prompt

OTHER = "other"
"""Name of the off-palette slot; the detector's colour name for off-palette objects."""
KINDS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES) + (OTHER,)
"""The 13 count slots: "red circle", "red square", ..., "yellow triangle" (``COLORS`` x ``SHAPES``
order), then "other"."""
KIND_INDEX: dict[tuple[str, str], int] = {(c, s): i for i, (c, s) in
                                          enumerate((c, s) for c in COLORS for s in SHAPES)}
"""(colour, shape) -> slot index of the 12 palette kinds."""
OTHER_INDEX: int = len(KINDS) - 1
"""Slot index of "other" (12)."""
NUM_SLOTS: int = len(KINDS)
MAX_COUNT: int = 5
"""Largest count class; it stands for "5 or more"."""
NUM_CLASSES: int = MAX_COUNT + 1
"""Count classes per slot: 0, 1, ..., MAX_COUNT."""
SCORES: tuple[str, ...] = ("prob", "log_prob")
HEADS: tuple[str, ...] = ("density", "mlp")
CLASS_NAME = "shapes_reward_cnn"
"""The ``"class"`` of this network's config.json."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Prompts -> wanted counts
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _want_row(prompt: str) -> tuple[int, ...]:
    row = [0] * NUM_SLOTS
    for clause in parse_prompt(prompt):  # ValueError for a prompt outside the grammar
        row[KIND_INDEX[clause.kind]] = clause.count
    return tuple(row)


def want_counts(prompts: Sequence[str]) -> torch.Tensor:
    """LongTensor ``[B, 13]``: per slot of ``KINDS`` the count the prompt asks for (0 for kinds it does
    not name and for "other"). ValueError for a prompt outside the shapes-world grammar."""
    if isinstance(prompts, str):
        raise TypeError("want_counts takes a sequence of prompts, not one str")
    return torch.tensor([_want_row(p) for p in prompts], dtype=torch.long).reshape(len(prompts), NUM_SLOTS)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


@dataclass
class RewardNetConfig:
    """Sizes of :class:`ShapesRewardNet` and how its reward is reported."""

    channels: list[int] = field(default_factory=lambda: [24, 32, 48, 64, 96, 96])
    """Output channels of the 3x3 convolutions, in order."""
    strides: list[int] = field(default_factory=lambda: [1, 2, 1, 1, 2, 1])
    """Stride of each convolution (as long as ``channels``); the first must be 1 (the input is not
    down-sampled before any feature sees it: objects are 7-10 px)."""
    hidden: int = 128
    """Width of the hidden layer of the mlp head (after global average pooling)."""
    head: str = "density"
    """density: per position and slot a non-negative density whose image total is the slot's count
    estimate c, and logits[n] = -w (c - n)^2 + b[n] (counting as a sum over objects; w per image and
    slot); mlp: a two-layer MLP of the averaged features."""
    score: str = "prob"
    """What ``reward`` returns: prob (P(strict), in [0, 1]) or log_prob (log P, in (-inf, 0])."""

    def validate(self) -> None:
        require(len(self.channels) >= 1 and all(int(c) >= 1 for c in self.channels), "channels",
                "a non-empty list of ints >= 1", list(self.channels))
        require(len(self.strides) == len(self.channels) and all(int(s) in (1, 2) for s in self.strides),
                "strides", f"{len(self.channels)} strides of 1 or 2 (one per channel entry)",
                list(self.strides))
        require(int(self.strides[0]) == 1, "strides", "a first stride of 1", list(self.strides))
        require(self.hidden >= 1, "hidden", "an int >= 1", self.hidden)
        require(self.head in HEADS, "head", f"one of {', '.join(HEADS)}", self.head)
        require(self.score in SCORES, "score", f"one of {', '.join(SCORES)}", self.score)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardNetConfig:
        """The config from ``to_dict``'s output; ValueError (a ConfigError) on unknown keys or bad values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            names = ", ".join(sorted(known))
            raise ConfigError(unknown[0], f"unknown key of RewardNetConfig (known: {names})")
        cfg = cls(**data)
        cfg.validate()
        return cfg


class ShapesRewardNet(nn.Module):
    """Image ``[B, 3, H, W]`` in [0, 1] -> count logits ``[B, 13, 6]`` (any H, W: the features are
    averaged over the image before the head), and the strict-pass reward built on them."""

    def __init__(self, config: RewardNetConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else RewardNetConfig()
        config.validate()
        layers: list[nn.Module] = []
        width = 3
        for out, stride in zip(config.channels, config.strides):
            # BatchNorm, not GroupNorm or LayerNorm: those normalise over the image's positions, which
            # would wash out how many positions hold an object; in eval mode (as loaded) it is affine
            layers += [nn.Conv2d(width, int(out), 3, stride=int(stride), padding=1, bias=False),
                       nn.BatchNorm2d(int(out)), nn.SiLU()]
            width = int(out)
        self.features = nn.Sequential(*layers)
        # average pooling makes the features the mean over positions: a count is that mean times the
        # area, so the head learns counts for the training resolution (32 px)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if config.head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, config.hidden), nn.SiLU(),
                                      nn.Linear(config.hidden, NUM_SLOTS * NUM_CLASSES))
        else:
            self.density = nn.Conv2d(width, NUM_SLOTS, 1)
            # log w per image and slot from the averaged features: sharp bells for crisp images, wide
            # ones for blurry or ambiguous ones (one w for all would be as unsure on clean renders)
            self.sharpness = nn.Linear(width, NUM_SLOTS)
            nn.init.zeros_(self.sharpness.weight)
            nn.init.zeros_(self.sharpness.bias)
            self.class_bias = nn.Parameter(torch.zeros(NUM_SLOTS, NUM_CLASSES))
        # positions of the last feature map at the world's image size: the average density times this
        # is a count (a picture resized to another size keeps roughly its count)
        down = 1
        for stride in config.strides:
            down *= int(stride)
        self.positions = float((IMAGE_SIZE // down) ** 2)
        if config.head == "density":  # start at about half an object per slot, whatever the positions
            nn.init.constant_(self.density.bias, math.log(math.expm1(0.5 / self.positions)))

    @property
    def score(self) -> str:
        return self.config.score

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Count logits ``[B, 13, 6]`` of images ``[B, 3, H, W]`` in [0, 1]."""
        _check_images(images)
        param = next(self.parameters())
        x = images.to(param.dtype) * 2.0 - 1.0  # centre the input (the background is near 1)
        feats = self.features(x)  # [B, C, h, w]
        if self.config.head == "mlp":
            return self.head(self.pool(feats).flatten(1)).view(-1, NUM_SLOTS, NUM_CLASSES)
        counts = self.counts(feats)  # [B, 13]
        log_w = self.sharpness(self.pool(feats).flatten(1)).clamp(-6.0, 6.0)  # [B, 13]
        n = torch.arange(NUM_CLASSES, dtype=counts.dtype, device=counts.device)
        sq = (counts.unsqueeze(-1) - n) ** 2  # [B, 13, 6]
        return -log_w.exp().unsqueeze(-1) * sq + self.class_bias

    def counts(self, feats: torch.Tensor) -> torch.Tensor:
        """Density head: the continuous count estimate ``[B, 13]`` of each slot from the features."""
        density = F.softplus(self.density(feats))  # [B, 13, h, w], >= 0
        return self.pool(density).flatten(1) * self.positions

    def log_reward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """log P(strict) ``[B]``: the sum over the 13 slots of log softmax(logits)[slot, want]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        want = want_counts(prompts).clamp_(max=MAX_COUNT).to(images.device)  # [B, 13]
        logp = F.log_softmax(self(images).float(), dim=-1)  # [B, 13, 6]
        return logp.gather(-1, want.unsqueeze(-1)).squeeze(-1).sum(dim=-1)  # [B]

    def reward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The reward ``[B]``, differentiable w.r.t. ``images``: P(strict) (``score="prob"``) or log P
        (``score="log_prob"``)."""
        log_p = self.log_reward(images, prompts)
        return log_p.exp() if self.config.score == "prob" else log_p

    @torch.no_grad()
    def predict_counts(self, images: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[B, 13]``: the most likely count class of each slot (MAX_COUNT = "5 or more")."""
        return self(images).argmax(dim=-1)

    @torch.no_grad()
    def predicted_strict(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """BoolTensor ``[B]``: every slot's most likely count equals the prompt's (the network's verdict on
        the detector's strict pass)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        want = want_counts(prompts).to(images.device)
        return (self.predict_counts(images) == want).all(dim=-1)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``folder/config.json`` and ``folder/model.safetensors``; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"class": CLASS_NAME, "format_version": FORMAT_VERSION, "score": self.config.score,
                "config": self.config.to_dict(), "kinds": list(KINDS), "max_count": MAX_COUNT,
                "input": "images [B, 3, H, W] in [0, 1], RGB", "output": "count logits [B, 13, 6]"}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"class": CLASS_NAME})
        return folder


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor in [0, 1], got {images.dtype}")


# --------------------------------------------------------------------------------------------
# Loading any differentiable reward model by path
# --------------------------------------------------------------------------------------------

RewardModelLoader = Callable[[dict[str, Any], Path], nn.Module]


def _load_shapes_cnn(meta: dict[str, Any], folder: Path) -> ShapesRewardNet:
    config_path = folder / CONFIG_FILE
    if meta.get("kinds", list(KINDS)) != list(KINDS) or meta.get("max_count", MAX_COUNT) != MAX_COUNT:
        raise ValueError(f"{config_path}: its slots {meta.get('kinds')} / max_count {meta.get('max_count')} "
                         f"differ from this code's {list(KINDS)} / {MAX_COUNT}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is a ValueError, the loader's one error type
            f"{config_path}: expected a \"config\" object with the network's sizes")
    config = dict(config)
    if "score" in meta:
        config.setdefault("score", meta["score"])
    try:
        net = ShapesRewardNet(RewardNetConfig.from_dict(config))
    except (ConfigError, TypeError) as err:
        raise ValueError(f"{config_path}: bad network config: {err}") from None
    net.load_state_dict(_read_weights(folder, net.state_dict()))
    return net


def _read_weights(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors``, checked against ``expected`` names and shapes."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a reward model folder holds {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE})")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: tensors do not match {CONFIG_FILE}'s network (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match {CONFIG_FILE}'s network: "
                         f"{'; '.join(wrong[:4])}")
    return tensors


REWARD_MODEL_LOADERS: dict[str, RewardModelLoader] = {CLASS_NAME: _load_shapes_cnn}
"""config.json ``"class"`` -> loader(meta, folder) returning the module (weights loaded)."""

_REPO_ROOT = Path(__file__).resolve().parents[1]


def register_reward_model(name: str, loader: RewardModelLoader) -> None:
    """Make ``load_reward_model`` load folders whose config.json says ``"class": name``."""
    REWARD_MODEL_LOADERS[name] = loader


def resolve_reward_path(folder: str | Path) -> Path:
    """``folder`` as given, or, when it is relative and absent here, under the repository (so the shipped
    assets/shapes-reward-cnn is found from any working directory)."""
    path = Path(folder)
    if not path.is_absolute() and not path.exists() and (_REPO_ROOT / path).exists():
        return _REPO_ROOT / path
    return path


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The differentiable reward model saved in ``folder`` (config.json + model.safetensors), chosen by
    config.json's ``"class"``, on ``device``, in eval mode and frozen (``requires_grad=False`` on every
    parameter: gradients reach the input only). ValueError naming the file on anything missing or
    inconsistent."""
    folder = resolve_reward_path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such reward model folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: no such file (a reward model folder holds {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or "class" not in meta:
        raise ValueError(f"{config_path}: expected a JSON object with a \"class\" "
                         f"(one of {', '.join(sorted(REWARD_MODEL_LOADERS))})")
    loader = REWARD_MODEL_LOADERS.get(meta["class"])
    if loader is None:
        raise ValueError(f"{config_path}: unknown reward model class {meta['class']!r} "
                         f"(known: {', '.join(sorted(REWARD_MODEL_LOADERS))})")
    model = loader(meta, folder)
    model.to(device).eval()
    model.requires_grad_(False)
    return model
