"""Command line of the reward servers, plugged into ``diffrl`` (``register``) and also runnable as
``python -m diffrl.reward_servers``::

    diffrl reward serve shapes --port 8101                      # one process, one reward
    diffrl reward serve ocr --host 0.0.0.0 --port 8102 --workers 2 --token-file /run/secrets/reward
    diffrl reward serve onnx scorer.path=model.onnx scorer.mapping=softmax scorer.index=1
    diffrl reward serve --scorer brightness:BrightnessScorer --port 8106 scorer.target=0.6   # your class
    diffrl reward list
    diffrl bench reward shapes                                  # figures for docs/benchmarks.md

Server keys (host, port, workers, limits.*, execution.*) and the reward's options (``scorer.*``)
come from an optional YAML recipe and ``key=value`` overrides; ``--host/--port/--workers`` win.
The bearer token comes from ``--token-file`` or ``DIFFRL_REWARD_TOKEN``, never from a recipe.

``--scorer pkg.module:Class`` serves any Scorer subclass by its import path (its module importable,
e.g. its folder on ``PYTHONPATH``), or a built-in by name; then there is no NAME argument. The
reward's name (``/v1/info``, metrics labels) is the class's ``name`` attribute unless ``--name``
gives one (with NAME or ``--scorer``). See docs/custom_rewards.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

from diffrl.config import ConfigError, describe, format_help, load_config, run_command
from diffrl.reward_servers.config import TOKEN_ENV, RewardServerConfig

SERVE_ENV = "DIFFRL_REWARD_SERVE"
"""Environment variable carrying the resolved serve config (JSON) to uvicorn worker processes."""
TOKEN_FILE_ENV = "DIFFRL_REWARD_TOKEN_FILE"


# ----------------------------------------------------------------------------- config
def serve_schema(name: str) -> type:
    """RewardServerConfig plus a ``scorer`` field holding the options of scorer ``name`` (a built-in
    name or ``pkg.module:Class``)."""
    from diffrl.reward_servers.scorers import scorer_class

    opt_cls = scorer_class(name).Options
    return dataclasses.make_dataclass(
        f"{''.join(c for c in name.title() if c.isalnum())}ServeConfig",
        [("scorer", opt_cls, dataclasses.field(default_factory=opt_cls))],
        bases=(RewardServerConfig,),
    )


def _split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def read_token(token_file: str | None) -> str | None:
    """The bearer token from ``token_file`` or ``$DIFFRL_REWARD_TOKEN`` (None: no auth)."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ConfigError("--token-file", f"expected a readable file, got {token_file!r}")
        token = path.read_text().strip()
        if not token:
            raise ConfigError("--token-file", f"{token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def check_scorer(target: str) -> type:
    """The Scorer class ``target`` names (a built-in name or ``pkg.module:Class``); a one-line
    ConfigError for ``--scorer`` if it names none."""
    from diffrl.reward_servers.scorers import ScorerImportError, scorer_class, scorer_target_problem

    try:
        return scorer_class(target)
    except ScorerImportError as err:
        raise ConfigError(f"--scorer {target}", err.reason) from None
    except KeyError:
        raise ConfigError("--scorer", f"expected {scorer_target_problem(target)}, got {target!r}") from None


def build_scorer(target: str, options, reward_name: str | None = None):
    """Scorer ``target`` built from its ``Options``; named ``reward_name`` when given (else its own name)."""
    from diffrl.reward_servers.scorers import get_scorer

    scorer = get_scorer(target, options)
    if reward_name:
        scorer.name = reward_name
    if not scorer.name:
        raise ConfigError("--name", f"{target} sets no reward name (its name attribute is empty): pass --name NAME")
    return scorer


def _scorer_arg(argv: list[str]) -> str | None:
    """The value of ``--scorer`` in a raw command line (for --help, which runs before parsing ends)."""
    for i, arg in enumerate(argv):
        if arg == "--scorer" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--scorer="):
            return arg.partition("=")[2]
    return None


def _options_help(argv: list[str] | None = None) -> str:
    from diffrl.reward_servers.scorers import scorer_class, scorer_names

    target = _scorer_arg(list(argv or []))
    lines = ["", "reward options (scorer.KEY=VALUE):"]
    for name in [target] if target else scorer_names():
        try:
            cls = scorer_class(name)
        except Exception as err:  # noqa: BLE001 - help must not fail on an optional dependency
            lines.append(f"\n[{name}]  (unavailable: {err})")
            continue
        rows = describe(cls.Options, "scorer.")
        lines.append(f"\n[{name}]" + ("" if rows else "  no options"))
        for key, type_name, default, doc in rows:
            lines.append(f"  {key} ({type_name}, default {default})")
            lines.extend("      " + line for line in textwrap.wrap(doc, 90))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- serve
def build_app_from_env():
    """uvicorn factory for worker processes (``workers > 1``): config from ``$DIFFRL_REWARD_SERVE``."""
    from diffrl.reward_servers.app import create_app

    spec = json.loads(os.environ[SERVE_ENV])
    cfg = load_config(serve_schema(spec["name"]), spec["recipe"], spec["overrides"])
    token = read_token(os.environ.get(TOKEN_FILE_ENV) or None)
    scorer = build_scorer(spec["name"], cfg.scorer, spec.get("reward_name"))
    return create_app(scorer, cfg.limits, token=token, execution=cfg.execution)


def _latency_note(cfg) -> str:
    ex = cfg.execution
    if ex.latency_ms <= 0:
        return ""
    return f" (simulated latency {ex.latency_ms:g} +- {ex.latency_jitter_ms:g} ms per request)"


def serve(name: str, cfg, token: str | None, recipe: str | None = None, overrides: list[str] | None = None,
          token_file: str | None = None, reward_name: str | None = None) -> int:
    """Serve scorer ``name`` (a built-in name or ``pkg.module:Class``) with the resolved ``cfg`` until
    SIGINT/SIGTERM, as reward ``reward_name`` (default: the scorer's own name). With ``workers > 1``
    the worker processes rebuild the config from ``recipe`` and ``overrides``."""
    import uvicorn

    from diffrl.reward_servers.app import create_app

    if cfg.workers == 1:
        scorer = build_scorer(name, cfg.scorer, reward_name)
        app = create_app(scorer, cfg.limits, token=token, execution=cfg.execution)
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        print(f"diffrl reward server {scorer.name!r} (version {scorer.version}) on http://{cfg.host}:{port}"
              f"{' (bearer token required)' if token else ''}{_latency_note(cfg)}", flush=True)
        server.run(sockets=[sock])
        return 0
    # Several worker processes: uvicorn's supervisor spawns them; each builds its app from the env.
    mp_dir = tempfile.mkdtemp(prefix="diffrl-reward-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    os.environ[SERVE_ENV] = json.dumps({"name": name, "recipe": str(Path(recipe).resolve()) if recipe else None,
                                        "overrides": list(overrides or []), "reward_name": reward_name})
    if token_file:
        os.environ[TOKEN_FILE_ENV] = str(Path(token_file).resolve())
    elif token:
        os.environ[TOKEN_ENV] = token
    print(f"diffrl reward server {reward_name or name!r} with {cfg.workers} workers on http://{cfg.host}:{cfg.port}"
          f"{' (bearer token required)' if token else ''}{_latency_note(cfg)}", flush=True)
    try:
        uvicorn.run("diffrl.reward_servers.cli:build_app_from_env", factory=True, host=cfg.host, port=cfg.port,
                    workers=cfg.workers, log_level=cfg.log_level, access_log=False, timeout_graceful_shutdown=5)
    finally:
        shutil.rmtree(mp_dir, ignore_errors=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    extra = []
    if args.host is not None:
        extra.append(f"host={args.host}")
    if args.port is not None:
        extra.append(f"port={args.port}")
    if args.workers is not None:
        extra.append(f"workers={args.workers}")
    target = args.scorer or args.name
    if args.scorer:
        check_scorer(target)
    if args.reward_name is not None and not args.reward_name.strip():
        raise ConfigError("--name", "expected a non-empty reward name")
    recipe, overrides = _split_recipe(list(args.config))
    cfg = load_config(serve_schema(target), recipe, [*overrides, *extra])
    token = read_token(args.token_file)
    return serve(target, cfg, token, recipe=recipe, overrides=[*overrides, *extra], token_file=args.token_file,
                 reward_name=args.reward_name)


def cmd_list(args: argparse.Namespace) -> int:
    from diffrl.reward_servers.scorers import scorer_class, scorer_names

    for name in scorer_names():
        doc = (sys.modules[scorer_class(name).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:<16} {doc}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from diffrl.reward_servers.bench import RewardBenchConfig, bench_reward, format_report

    recipe, overrides = _split_recipe(list(args.config))
    cfg = load_config(RewardBenchConfig, recipe, [f"name={args.name}", *overrides])
    result = bench_reward(cfg)
    print(json.dumps(result, indent=2))
    print(format_report(result))
    return 0


# ----------------------------------------------------------------------------- parsers
class _IntermixedParser(argparse.ArgumentParser):
    """Lets options and ``key=value`` overrides come in any order after NAME
    (``serve ocr --port 8102 scorer.psm=6``): parses with ``parse_known_intermixed_args``."""

    _busy = False
    _lazy_epilog = None  # a callable(argv) adding text to --help only when help is shown (imports scorers)
    _post_parse = None  # a callable(namespace) -> an error message or None; may normalise the namespace
    _argv: tuple[str, ...] = ()

    def format_help(self) -> str:
        text = super().format_help()
        return text + "\n" + self._lazy_epilog(self._argv) + "\n" if self._lazy_epilog else text

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:
            return super().parse_known_args(args, namespace)
        self._busy = True
        self._argv = tuple(sys.argv[1:] if args is None else args)
        try:
            ns, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False
        problem = self._post_parse(ns) if self._post_parse else None
        if problem:
            self.error(problem)
        return ns, extras


def _intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.__class__ = _IntermixedParser
    return parser


def _reward_names() -> list[str]:
    from diffrl.reward_servers.scorers import scorer_names

    return scorer_names()


def _serve_post_parse(ns: argparse.Namespace) -> str | None:
    """NAME is a built-in reward unless --scorer is given; then a first positional is the recipe or an override."""
    names = _reward_names()
    if ns.scorer is None:
        if ns.name is None:
            return "the following arguments are required: NAME (or --scorer pkg.module:Class)"
        if ns.name not in names:
            return f"argument NAME: invalid choice: {ns.name!r} (choose from {', '.join(map(repr, names))})"
    elif ns.name is not None:
        if ns.name in names:
            return f"argument NAME: give NAME or --scorer, not both (got {ns.name!r} and --scorer {ns.scorer})"
        ns.config.insert(0, ns.name)
        ns.name = None
    return None


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve one reward over HTTP (protobuf and JSON)",
                       usage="%(prog)s (NAME | --scorer pkg.module:Class) [--name NAME] [options] "
                             "[RECIPE] [key=value ...]",
                       description="Run one reward server process: POST /v1/score, GET /v1/info, /healthz, "
                                   "/metrics. See docs/reward_servers.md and docs/custom_rewards.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", metavar="NAME", help=f"built-in reward: {', '.join(_reward_names())}")
    p.add_argument("--scorer", metavar="pkg.module:Class",
                   help="serve this Scorer subclass (its module importable, e.g. on PYTHONPATH) instead of "
                        "a built-in NAME; a built-in name works too (docs/custom_rewards.md)")
    p.add_argument("--name", dest="reward_name", metavar="NAME",
                   help="the reward's name in /v1/info and metrics (default: the scorer's name attribute)")
    p.add_argument("--host", help="interface (default 127.0.0.1; host=...)")
    p.add_argument("--port", type=int, help="TCP port (default 8100; 0 = any free port, printed)")
    p.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    p.add_argument("--token-file", help=f"file holding a bearer token to require (else ${TOKEN_ENV} if set)")
    p.add_argument("config", nargs="*", metavar="[RECIPE] [key=value ...]",
                   help="optional YAML recipe, then dotted overrides (limits.*, execution.*, scorer.*)")
    p.epilog = "server keys:\n" + format_help(RewardServerConfig)
    p.set_defaults(func=cmd_serve)
    _intermixed(p)._lazy_epilog = _options_help
    p._post_parse = _serve_post_parse
    return p


def add_list_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list", help="list the rewards that can be served")
    p.set_defaults(func=cmd_list)
    return p


def add_bench_parser(sub, name: str = "reward") -> argparse.ArgumentParser:
    from diffrl.reward_servers.bench import RewardBenchConfig

    p = sub.add_parser(name, help="reward server images/s: HTTP+protobuf and JSON vs in-process",
                       description="Start a reward server, score batches over HTTP (protobuf, then JSON) and "
                                   "compare images/s with calling the scorer in-process on the same cores.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=_reward_names(), metavar="NAME")
    p.add_argument("config", nargs="*", metavar="[RECIPE] [key=value ...]")
    p.epilog = "config keys:\n" + format_help(RewardBenchConfig)
    p.set_defaults(func=cmd_bench)
    return _intermixed(p)


def register(subparsers, bench_subparsers) -> None:
    """Add ``diffrl reward {serve,list}`` and ``diffrl bench reward`` to the diffrl CLI."""
    p = subparsers.add_parser("reward", help="reward servers: serve one reward over HTTP, list rewards",
                              description="Reward servers (docs/reward_servers.md).")
    sub = p.add_subparsers(dest="reward_command", required=True, metavar="WHAT")
    add_serve_parser(sub)
    add_list_parser(sub)
    add_bench_parser(bench_subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffrl.reward_servers {serve,list,bench} ...``"""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="python -m diffrl.reward_servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_list_parser(sub)
    add_bench_parser(sub, "bench")
    return run_command(parser.parse_args(argv))
