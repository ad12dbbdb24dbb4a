"""Typed configuration: dataclasses with a docstring under every field, loaded from YAML recipes
(deploy/configs/*.yaml) with dotted command-line overrides, and validated before anything heavy
starts.

OmegaConf does the merging and type checking (unknown keys, wrong types, missing values), and
reports the dotted key; each config class may add a ``validate()`` method for ranges and cross-field
rules, raising :class:`ConfigError` through :func:`require`. Every error names the field's dotted
path and what was expected, e.g.::

    diffrl: bad config: learner.lr: expected a float > 0, got -1.0
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override is invalid; ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, with ``prefix`` prepended to the dotted field path."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(field, self.message)


def run_command(args: Any) -> int:
    """Run a parsed CLI command (``args.func``): a bad config exits 2 with the field's message,
    Ctrl-C exits 130. Shared by every console entry point."""
    import sys

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"diffrl: bad config: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffrl: interrupted", file=sys.stderr)
        return 130


def require(condition: bool, field: str, expected: str, got: Any = dataclasses.MISSING) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        suffix = "" if got is dataclasses.MISSING else f", got {got!r}"
        raise ConfigError(field, f"expected {expected}{suffix}")


def _validate_tree(obj: Any, path: str = "") -> None:
    """Call ``validate()`` on every dataclass in the tree, children first, prefixing error paths."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        child = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            _validate_tree(value, child)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _validate_tree(item, f"{child}.{i}")
        elif isinstance(value, dict):
            for key, item in value.items():
                _validate_tree(item, f"{child}.{key}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise err.under(path) if path else err
        except ValueError as err:  # plain "field: message" ValueErrors of packages below diffrl
            match = re.match(r"^([A-Za-z_][\w.]*): (.*)$", str(err), re.DOTALL)
            field, message = (match.group(1), match.group(2)) if match else ("", str(err))
            raise ConfigError(field, message).under(path) if path else ConfigError(field, message) from err


def _locate_in_lists(schema: type, loaded: Any, err: OmegaConfBaseException) -> ConfigError:
    """OmegaConf names an error inside a list item without the item's path (``token`` for
    ``rewards[0].token``): find the item by merging each list item into its own schema."""
    import typing

    def walk(cls: Any, node: Any, path: str) -> ConfigError | None:
        if not dataclasses.is_dataclass(cls) or not OmegaConf.is_dict(node):
            return None
        hints = _resolved_hints(cls)
        for key in node:
            ftype, child = hints.get(key), node._get_node(key)
            args = typing.get_args(ftype)
            if typing.get_origin(ftype) is list and args and dataclasses.is_dataclass(args[0]) \
                    and OmegaConf.is_list(child):
                for i, item in enumerate(child):
                    try:
                        OmegaConf.merge(OmegaConf.structured(args[0]), item)
                    except OmegaConfBaseException as inner:
                        where = f"{path}{key}.{i}"
                        return walk(args[0], item, where + ".") or _omegaconf_error(inner).under(where)
            elif dataclasses.is_dataclass(ftype):
                if not OmegaConf.is_dict(child) and node[key] is not None:
                    return ConfigError(f"{path}{key}", f"expected a mapping of {ftype.__name__} keys, "
                                       f"got {node[key]!r}")
                found = walk(ftype, child, f"{path}{key}.")
                if found is not None:
                    return found
        return None

    try:
        return walk(schema, loaded, "") or _omegaconf_error(err)
    except Exception:  # noqa: BLE001 - locating is best effort; the original error stands
        return _omegaconf_error(err)


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    message = str(err).split("\n")[0].strip()
    return ConfigError(str(key), message)


def load_config(schema: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a validated ``schema`` instance from defaults, a YAML recipe and ``key.sub=value``
    overrides (later wins). Raises :class:`ConfigError` naming the dotted field on any problem."""
    loaded = None
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError("", f"recipe not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - YAML syntax errors of any kind
            raise ConfigError("", f"recipe {path} is not valid YAML: {err}") from None
    return _build(schema, loaded, overrides, where=str(recipe))


def load_config_text(schema: type[T], text: str) -> T:
    """A validated ``schema`` instance from YAML text (how configs cross process boundaries)."""
    return _build(schema, OmegaConf.create(text), (), where="config text")


_ABSENT = object()


def _is_open_mapping(cfg: Any, key: str) -> bool:
    """Whether ``key``'s parent is a plain dict field (e.g. reward_weights), where new keys are fine."""
    if "." not in key:
        return False
    parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0], default=None)
    return OmegaConf.is_dict(parent) and OmegaConf.get_type(parent) is dict


_EXTENDED: dict[tuple, type] = {}


def with_sections(cls: type) -> type:
    """``cls`` with its registered sections as fields: a config class may declare
    ``config_sections() -> {name: dataclass}`` (the learner: one section per registered algorithm),
    which this adds, here and in every nested config class, as a subclass made on the fly (cached)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return cls
    hints = _resolved_hints(cls)
    have = {f.name for f in dataclasses.fields(cls)}
    new: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(cls):
        ftype = hints.get(f.name, f.type)
        ext = with_sections(ftype)
        if ext is not ftype:
            new.append((f.name, ext, dataclasses.field(default_factory=ext)))
    sections = cls.config_sections() if hasattr(cls, "config_sections") else {}
    new += [(name, sec, dataclasses.field(default_factory=sec)) for name, sec in sections.items() if name not in have]
    if not new:
        return cls
    key = (cls, tuple((name, t) for name, t, _ in new))
    if key not in _EXTENDED:
        ext = dataclasses.make_dataclass(cls.__name__, new, bases=(cls,))
        ext.__module__, ext.__qualname__, ext.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
        ext.__section_docs__ = {name: (sec.__doc__ or "").strip().split("\n")[0] for name, sec in sections.items()}
        _EXTENDED[key] = ext
    return _EXTENDED[key]


def with_sections_instance(obj: Any) -> Any:
    """``obj`` (a config instance) as an instance of :func:`with_sections` of its class, carrying its
    sections' current values (``to_yaml`` of a config built in code keeps them)."""
    if isinstance(obj, list):
        return [with_sections_instance(v) for v in obj]
    if isinstance(obj, dict):
        return {k: with_sections_instance(v) for k, v in obj.items()}
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    cls = with_sections(type(obj))
    values = {f.name: with_sections_instance(getattr(obj, f.name)) for f in dataclasses.fields(cls) if f.init}
    return cls(**values)


def _build(schema: type[T], loaded: Any, overrides: Sequence[str], where: str) -> T:
    schema = with_sections(schema)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key.sub=value")
    try:
        merged = OmegaConf.structured(schema)
        if loaded is not None:
            if not OmegaConf.is_dict(loaded):
                raise ConfigError("", f"{where} must be a YAML mapping")
            try:
                merged = OmegaConf.merge(merged, loaded)
            except OmegaConfBaseException as err:
                raise _locate_in_lists(schema, loaded, err) from None
        for item in overrides:
            key, text = item.split("=", 1)
            value = OmegaConf.from_dotlist([f"v={text}"])["v"]  # YAML-parsed like recipe values
            if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT and not _is_open_mapping(merged, key):
                raise ConfigError(key, "no such config key (see --help)")
            OmegaConf.update(merged, key, value, merge=True)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(missing[0], "a value is required")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None
    _validate_tree(obj)
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (written to every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(with_sections_instance(cfg)))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(with_sections_instance(cfg)), resolve=True)  # type: ignore[return-value]


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, docstring) for every leaf field, for ``--help`` and docs."""
    rows: list[tuple[str, str, str, str]] = []
    schema = with_sections(schema)
    docs: dict[str, str] = {}
    for klass in reversed(schema.__mro__):  # a class made by with_sections has no source of its own
        docs.update(field_docs(klass) if dataclasses.is_dataclass(klass) else {})
    docs.update({k: f"The {k!r} section: {v}" for k, v in
                 getattr(schema, "__section_docs__", {}).items() if k not in docs})
    hints = _resolved_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        ftype = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(ftype):
            rows.append((key, ftype.__name__, "", docs.get(f.name, "")))
            rows.extend(describe(ftype, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        type_name = getattr(ftype, "__name__", None) or str(ftype).replace("typing.", "")
        rows.append((key, type_name, default, docs.get(f.name, "")))
    return rows


def _resolved_hints(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - best effort for help text
        return {}


def format_help(schema: type) -> str:
    """Human-readable list of every config key, its type, default and meaning."""
    lines = []
    for key, type_name, default, doc in describe(schema):
        if default == "":  # a nested section
            lines.append(f"\n[{key}]  {doc}")
            continue
        lines.append(f"  {key} ({type_name}, default {default})")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(doc, 90))
    return "\n".join(lines).lstrip("\n")
