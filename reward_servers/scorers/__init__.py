"""Reward scorers, one file each, behind the small :class:`~diffrl.reward_servers.scorers.base.Scorer`
interface, and a registry by name: ``get_scorer("ocr", metric="normalized")``.

Built-in names: shapes, ocr, compressibility, detector, onnx. Modules are imported on first use
(so serving ``shapes`` does not import onnxruntime). ``register_scorer`` adds more.

``shapes.py`` here is the pure shapes-world detector (``score``, ``score_batch``); its Scorer
wrapper is ``shapes_reward.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from diffrl.config import ConfigError

_BUILTIN: dict[str, str] = {
    "shapes": "diffrl.reward_servers.scorers.shapes_reward:ShapesScorer",
    "ocr": "diffrl.reward_servers.scorers.ocr:OcrScorer",
    "compressibility": "diffrl.reward_servers.scorers.compressibility:CompressibilityScorer",
    "detector": "diffrl.reward_servers.scorers.detector:DetectorScorer",
    "onnx": "diffrl.reward_servers.scorers.onnx_model:OnnxScorer",
}
_EXTRA: dict[str, Callable[..., Any]] = {}


def scorer_names() -> list[str]:
    return sorted({*_BUILTIN, *_EXTRA})


def register_scorer(name: str, cls: type) -> None:
    """Make ``get_scorer(name)`` build ``cls`` (a Scorer subclass with an ``Options`` dataclass)."""
    _EXTRA[name] = cls


def scorer_class(name: str) -> type:
    """The Scorer class registered under ``name`` (imports its module)."""
    if name in _EXTRA:
        return _EXTRA[name]
    target = _BUILTIN.get(name)
    if target is None:
        raise KeyError(f"unknown reward {name!r} (known: {', '.join(scorer_names())})")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def make_options(name: str, /, **options: Any) -> Any:
    """The validated ``Options`` instance of scorer ``name`` from keyword options."""
    cls = scorer_class(name)
    opt_cls = cls.Options
    known = {f.name for f in dataclasses.fields(opt_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"scorer.{unknown[0]}", f"unknown option of reward {name!r} "
                          f"(known: {', '.join(sorted(known)) or 'none'})")
    opts = opt_cls(**options)
    validate = getattr(opts, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise err.under("scorer") from None
    return opts


def get_scorer(name: str, options: Any = None, /, **kwargs: Any):
    """Build scorer ``name`` from an ``Options`` instance or keyword options."""
    cls = scorer_class(name)
    if options is None:
        options = make_options(name, **kwargs)
    elif kwargs:
        raise TypeError("pass either an Options instance or keyword options, not both")
    return cls(options)
