"""Reward scorers, one file each, behind the small :class:`~diffrl.reward_servers.scorers.base.Scorer`
interface, and a registry by name: ``get_scorer("ocr", metric="normalized")``.

Built-in names: shapes, shapes_cnn, ocr, compressibility, detector, onnx. Modules are imported on first use
(so serving ``shapes`` does not import onnxruntime). ``register_scorer`` adds more, and any
:class:`~diffrl.reward_servers.scorers.base.Scorer` subclass can be named by its import path,
``pkg.module:Class`` (its module importable, e.g. its folder on ``PYTHONPATH``): see
docs/custom_rewards.md.

``shapes.py`` here is the pure shapes-world detector (``score``, ``score_batch``); its Scorer
wrapper is ``shapes_reward.py``; ``shapes_cnn.py`` serves the differentiable reward network
(``models/reward_cnn.py``) that approximates it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from diffrl.config import ConfigError

_BUILTIN: dict[str, str] = {
    "shapes": "diffrl.reward_servers.scorers.shapes_reward:ShapesScorer",
    "shapes_cnn": "diffrl.reward_servers.scorers.shapes_cnn:ShapesCnnScorer",
    "ocr": "diffrl.reward_servers.scorers.ocr:OcrScorer",
    "compressibility": "diffrl.reward_servers.scorers.compressibility:CompressibilityScorer",
    "detector": "diffrl.reward_servers.scorers.detector:DetectorScorer",
    "onnx": "diffrl.reward_servers.scorers.onnx_model:OnnxScorer",
}
_EXTRA: dict[str, Callable[..., Any]] = {}
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ScorerImportError(ConfigError):
    """A ``pkg.module:Class`` scorer that cannot be loaded; a one-line message under field ``scorer``."""

    def __init__(self, target: str, reason: str):
        self.target, self.reason = target, reason
        super().__init__("scorer", f"{target}: {reason}")


def scorer_names() -> list[str]:
    return sorted({*_BUILTIN, *_EXTRA})


def register_scorer(name: str, cls: type) -> None:
    """Make ``get_scorer(name)`` build ``cls`` (a Scorer subclass with an ``Options`` dataclass)."""
    _EXTRA[name] = cls


def is_import_path(target: str) -> bool:
    """True for a ``pkg.module:Class`` scorer (a name with a colon), False for a registry name."""
    return ":" in target


def scorer_target_problem(target: str) -> str | None:
    """Why ``target`` names no scorer, without importing anything: a message unless it is a registered
    name or a well-formed ``pkg.module:Class`` path (whether that imports is checked when it is served)."""
    if is_import_path(target):
        return None if _IMPORT_PATH.fullmatch(target) else "an import path of the form pkg.module:Class"
    if target in _BUILTIN or target in _EXTRA:
        return None
    return f"a built-in scorer name ({', '.join(scorer_names())}) or pkg.module:Class"


def _import_scorer(target: str) -> type:
    from diffrl.reward_servers.scorers.base import Scorer

    if not _IMPORT_PATH.fullmatch(target):
        raise ScorerImportError(target, "expected an import path of the form pkg.module:Class")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ScorerImportError(target, f"cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                                        "is its folder on PYTHONPATH?") from None
    except Exception as err:  # noqa: BLE001 - any failure of the user's module, reported on one line
        raise ScorerImportError(target, f"importing module {module_name!r} failed: "
                                        f"{type(err).__name__}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScorerImportError(target, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, Scorer)):
        raise ScorerImportError(target, f"{attr} is not a subclass of diffrl.reward_servers.scorers.base.Scorer "
                                        "(see docs/custom_rewards.md)")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ScorerImportError(target, f"{attr} does not implement {missing}")
    if not (inspect.isclass(obj.Options) and dataclasses.is_dataclass(obj.Options)):
        raise ScorerImportError(target, f"{attr}.Options is not a dataclass")
    return obj


def scorer_class(name: str) -> type:
    """The Scorer class registered under ``name``, or named by its import path ``pkg.module:Class``
    (imports its module; a path that does not load raises :class:`ScorerImportError`)."""
    if name in _EXTRA:
        return _EXTRA[name]
    if is_import_path(name):
        return _import_scorer(name)
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
