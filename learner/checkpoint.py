"""Checkpoint files of the learner: layout, atomic writes, the ``latest`` pointer, RNG states.

Layout (``RUN_DIR/checkpoints/``)::

    step_000010/
        engine/                     DeepSpeed engine state (engine.save_checkpoint: θ, optimizer,
                                    ZeRO partitions). DeepSpeed writes these with torch.save (pickle);
                                    they are only ever read back by the learner itself.
        p_old.safetensors           the slow reference snapshot (LoRA: adapter weights only)
        p_samp.safetensors          the sampling snapshot (absent when p_samp is p_old)
        state.json                  step, p_samp version, world size, algorithm, LoRA, ZeRO stage
        rank_00000.json             per rank: ledger counters, trained group ids, python/numpy RNG
        rank_00000.safetensors      per rank: torch (and CUDA) RNG state, numpy's MT state vector
    latest                          name of the newest complete checkpoint, written last (atomically)

A checkpoint folder that ``latest`` does not name is incomplete (or older) and is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ENGINE_TAG = "engine"
STATE_FILE = "state.json"
P_OLD_FILE = "p_old.safetensors"
P_SAMP_FILE = "p_samp.safetensors"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_json(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def rank_tensors(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file of CPU copies (atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest``, or None when there is no complete checkpoint."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_RE.match(name):
        raise ValueError(f"{pointer}: does not name a checkpoint folder: {name[:80]!r}")
    folder = root / name
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {name}, which has no {STATE_FILE}")
    return folder


def write_latest(run_dir: str | Path, folder: Path) -> None:
    write_text_atomic(checkpoints_dir(run_dir) / LATEST, folder.name + "\n")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (never the one ``latest`` names, never
    newer folders that may be in progress). ``keep == 0`` keeps everything."""
    if keep <= 0:
        return []
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    latest_step = int(_STEP_RE.match(latest.name).group(1))
    older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= latest_step]
    doomed = [p for _, p in older[:-keep]] if len(older) > keep else []
    for p in doomed:
        if p != latest:
            shutil.rmtree(p, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) capturing the torch (CPU, CUDA), numpy and python RNG states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(list(torch.cuda.get_rng_state_all()))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        states = list(tensors["torch_cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    npm = meta["numpy"]
    np.random.set_state((npm["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"],
                         npm["has_gauss"], npm["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
