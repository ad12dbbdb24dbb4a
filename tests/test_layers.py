"""Dependencies point one way: every diffrl module imports only from its own layer's package or from
the layers below it (top-level and function-level imports alike), and the old top-level names
(``import learner``, ``import proto``...) appear nowhere."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"diffrl": "diffrl", "actors": "diffrl.actors", "learner": "diffrl.learner", "models": "diffrl.models",
           "proto": "diffrl.proto", "reward_servers": "diffrl.reward_servers"}
# bottom first; a module may import its own package and the layers below, never a sibling package
LAYERS = [
    ["diffrl.config", "diffrl.utils", "diffrl.run_folder", "diffrl.image_stats"],
    ["diffrl.storage", "diffrl.run_logs"],  # where the run folder lives, one log file per process
    ["diffrl.embedded_redis", "diffrl.proto"],
    ["diffrl.models"],
    ["diffrl.data"],  # prompt sets (the shapes world's splits are built in)
    ["diffrl.reward_servers"],
    ["diffrl.text_eval"],  # the text world's held-out metrics, used by evaluation
    ["diffrl.evaluation", "diffrl.monitoring"],
    ["diffrl.learner", "diffrl.actors"],
    ["diffrl"],  # the commands and the job: cli, job, bench, report, status, schema, ...
]


def unit_of(module: str) -> str:
    """The most specific entry of LAYERS that ``module`` belongs to."""
    best = ""
    for layer in LAYERS:
        for unit in layer:
            if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
                best = unit
    return best


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def modules() -> list[tuple[str, Path]]:
    out = []
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([package, *parts]), path))
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_imports_point_down():
    bad = []
    for module, path in modules():
        mine = unit_of(module)
        for line, name in imports(path):
            if not name.startswith("diffrl"):
                continue
            theirs = unit_of(name)
            if not theirs or theirs == mine or mine.startswith(theirs + "."):
                continue
            if layer_of(theirs) >= layer_of(mine):  # up, or across to a sibling package
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} ({mine}) imports {name} ({theirs})")
    assert not bad, "\n".join(bad)


def test_no_top_level_package_names_remain():
    old = {"actors", "learner", "models", "proto", "reward_servers"}
    bad = []
    for path in [*REPO.glob("*/**/*.py"), *REPO.glob("tests/*.py")]:
        if ".venv" in path.parts or ".git" in path.parts:
            continue
        for line, name in imports(path):
            if name.split(".")[0] in old:
                bad.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not bad, "\n".join(bad)
