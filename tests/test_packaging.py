"""Everything installs under ``diffrl``: the built wheel holds no other top-level module, ``import
proto`` stays proto-plus's (a dependency of ray[default]), and the installed package and its command
line work from any directory, editable (this venv) and from the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


CHECK = ("import proto, diffrl.proto.bus, diffrl.learner.learner, diffrl.cli; import importlib.util as u; "
         "assert hasattr(proto, 'Message'), proto.__file__; "
         "assert all(u.find_spec(n) is None for n in ('learner', 'actors', 'models', 'reward_servers')); "
         "print(diffrl.learner.learner.__file__)")


def test_editable_install_imports_only_under_diffrl(tmp_path):
    r = run([sys.executable, "-P", "-c", CHECK], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == REPO / "learner" / "learner.py"
    script = Path(sys.executable).parent / "diffrl"  # the console script, run from elsewhere
    r = run([str(script), "train", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "learner.algorithm" in r.stdout and "learner.crd.beta" in r.stdout, r.stderr
    assert "learner.grpo.clip_range" in r.stdout  # every registered algorithm's section is listed


@pytest.mark.slow
def test_wheel_holds_only_diffrl_and_works_from_anywhere(tmp_path):
    scratch = [p for p in (REPO / "build", REPO / "diffrl.egg-info") if not p.exists()]  # pip builds in-tree
    try:
        check_wheel(tmp_path)
    finally:
        for p in scratch:
            shutil.rmtree(p, ignore_errors=True)


def check_wheel(tmp_path):
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("diffrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"diffrl"}, tops
    for expected in ("diffrl/learner/algorithms/crd.py", "diffrl/proto/experience_pb2.py",
                     "diffrl/reward_servers/scorers/shapes.py", "diffrl/actors/sampler.py", "diffrl/proto/bus.py"):
        assert expected in names
    # install the wheel beside this venv's packages (not the editable finder) and use it elsewhere
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    r = run([sys.executable, "-S", "-P", "-c", f"import site; site.addsitedir({str(site)!r}); {CHECK}"],
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().is_relative_to(site)
