"""Differentiable rewards given by path: r(images, prompts) with gradients with respect to the images.

DIDR's Diffused Reward Proxy differentiates a reward of the decoded image. A reward is given by path:

* a folder with a ``config.json`` naming its class (``"class": "shapes_reward_cnn"``: the shapes
  world's CNN, models/reward_cnn.py, shipped in assets/shapes-reward-cnn);
* an exported program (``torch.export.save``, a ``.pt2`` file) whose forward takes images
  ``[B, 3, H, W]`` in [0, 1] and returns ``[B]`` rewards (prompt-free rewards: an aesthetic head);
* a TorchScript file (``torch.jit.save``) whose ``forward(images)`` or ``forward(images, prompts)``
  takes the images (and a ``List[str]`` of prompts, which torch.export cannot take) and returns ``[B]``.

Either brings any PyTorch reward model (PickScore or ImageReward with their processing folded in)
without code here.

Every parameter is frozen (``requires_grad`` False, eval mode): gradients flow to the input only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from diffrl.models.adapter import resolve_model_path


class DifferentiableReward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images ``[B, 3, H, W]`` in [0, 1] -> rewards ``[B]``, differentiable in ``images``."""


class TorchScriptReward:
    """A TorchScript reward module; ``takes_prompts`` from its forward's arity."""

    def __init__(self, module: torch.jit.ScriptModule, path: Path):
        self.module = module
        self.path = path
        args = [a for a in module.forward.schema.arguments if a.name != "self"]
        if len(args) not in (1, 2):
            raise ValueError(f"{path}: forward takes {len(args)} arguments; expected (images) or (images, prompts)")
        self.takes_prompts = len(args) == 2

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.module(images, list(prompts)) if self.takes_prompts else self.module(images)
        if out.shape != (images.shape[0],):
            raise ValueError(f"{self.path}: returned shape {tuple(out.shape)}, expected ({images.shape[0]},)")
        return out


class _ExportedReward:
    """A ``torch.export`` program of a prompt-free reward (its parameters are constants of the graph)."""

    def __init__(self, module, path: Path):
        self.module = module
        self.path = path

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.module(images)
        if out.shape != (images.shape[0],):
            raise ValueError(f"{self.path}: returned shape {tuple(out.shape)}, expected ({images.shape[0]},)")
        return out


class _RewardOfNet:
    """Adapts a network with ``reward(images, prompts)`` to the call form."""

    def __init__(self, net):
        self.net = net

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.net.reward(images, prompts)


def _freeze(module: torch.nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def load_differentiable_reward(path: str, device: torch.device | str = "cpu") -> DifferentiableReward:
    """The reward at ``path`` (module docstring), frozen, on ``device``. ValueError when it is missing
    or of an unknown kind."""
    where = Path(resolve_model_path(path))
    if where.is_dir():
        if not (where / "config.json").is_file():
            raise ValueError(f"{where}: a reward model folder needs a config.json naming its class")
        from diffrl.models.reward_cnn import load_reward_model

        return _RewardOfNet(load_reward_model(str(where), device=device))  # loaded frozen
    if where.is_file() and where.suffix == ".pt2":
        program = torch.export.load(str(where))
        return _ExportedReward(program.module().to(device), where)
    if where.is_file():
        try:
            module = torch.jit.load(str(where), map_location=device)
        except RuntimeError as err:
            raise ValueError(f"{where}: not a TorchScript reward ({str(err).splitlines()[0]})") from err
        _freeze(module)
        return TorchScriptReward(module, where)
    raise ValueError(f"{path}: no differentiable reward model there (a folder with config.json or a "
                     "TorchScript file)")
