"""Checkpoint files of the learner: layout, atomic writes, the ``latest`` pointer, RNG states.

Layout (``RUN_DIR/checkpoints/``)::

    step_000010/
        engine_<role>/              per trainable role (CRD, NFT, GRPO: engine_theta): DeepSpeed engine
                                    state (engine.save_checkpoint: weights, optimizer, ZeRO partitions).
                                    DeepSpeed writes these with torch.save (pickle); they are only ever
                                    read back by the learner itself.
        <role>.safetensors          per role, EMA (CRD: p_old, p_samp) and trainable (theta), its
                                    trained tensors by parameter name (LoRA: adapter weights only, peft
                                    naming with the adapter name). The trainable roles' files are not
                                    read on resume (the engine folder is): they are what ``diffrl
                                    export`` reads, so that getting weights out never unpickles.
        state.json                  step, p_samp version, world size, algorithm, roles, LoRA, ZeRO stage
        rank_00000.json             per rank: ledger counters, trained group ids, python/numpy RNG
        rank_00000.safetensors      per rank: torch (and CUDA) RNG state, numpy's MT state vector
    latest                          name of the newest complete checkpoint, written last (atomically)

A checkpoint folder that ``latest`` does not name is incomplete (or older) and is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffrl import run_folder

log = logging.getLogger("diffrl.learner.learner")

CHECKPOINTS = run_folder.CHECKPOINTS
LATEST = "latest"
STATE_FILE = "state.json"
FORMAT_VERSION = 2
"""2: one engine folder and one snapshot file per role (1: a single ``engine`` folder)."""
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def engine_tag(role: str) -> str:
    """The engine folder of a trainable role."""
    return f"engine_{role}"


def snapshot_file(role: str) -> str:
    """The safetensors file of a role's trained tensors (every EMA role, and every trainable role)."""
    return f"{role}.safetensors"


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


class CheckpointOutageError(RuntimeError):
    """No checkpoint could be saved to the run's storage for longer than the configured outage."""


class Checkpointing:
    """Mixin of :class:`~diffrl.learner.learner.Learner`: write and restore checkpoints of every role
    (engines with their optimizers, snapshots), the step, the ledger and the RNG states."""

    def save_checkpoint(self) -> Path | None:
        """Write ``run_dir/checkpoints/step_XXXXXX`` (every rank takes part), point ``latest`` at it,
        prune old ones, then acknowledge the entries it covers. With object storage (``self.storage``)
        each rank writes its files into a staging folder of its own and uploads them, and rank 0 commits
        (manifest, then ``latest``) once every rank's upload succeeded; a failed upload is logged and
        counted, acknowledges nothing and returns None, and :class:`CheckpointOutageError` ends the run
        when no checkpoint could be saved for ``storage.retry.max_checkpoint_outage_s``."""
        if self.run_dir is None:
            raise RuntimeError("no run_dir: checkpoints are off")
        t0 = time.perf_counter()
        name = step_name(self.step)
        if self.storage is None:
            folder = checkpoints_dir(self.run_dir) / name
            self._write_checkpoint(folder, shared=True)
            if self.rank == 0:
                write_latest(self.run_dir, folder)
                prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        else:
            folder = checkpoints_dir(self.run_dir) / f".staging-rank{self.rank:05d}" / name
            self._write_checkpoint(folder, shared=False)
            if not self._commit_to_storage(folder, name):
                return None
        self.dist.barrier()  # `latest` names the new checkpoint: now the entries are committed
        self._last_checkpoint_step = self.step
        self._last_checkpoint_time = time.monotonic()
        self.metrics.last_checkpoint.set(time.time())
        self._ack_pending()
        if self.storage is not None:
            self._upload_trained_groups()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        return folder

    def _write_checkpoint(self, folder: Path, shared: bool) -> None:
        """Every rank writes its files of the checkpoint into ``folder`` (``shared``: one folder for all
        ranks, made by rank 0; else a folder of this rank's own)."""
        if self.rank == 0 or not shared:
            if folder.exists():  # a partial folder from a crashed attempt at this step
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        self.dist.barrier()
        for role, net in self.nets.trained.items():
            net.engine.save_checkpoint(str(folder), tag=engine_tag(role), save_latest=False,
                                       exclude_frozen_parameters=self.is_lora)
            if net.zero3 or self.rank == 0:  # ZeRO-3 gathers the parameters: every rank takes part
                tensors = net.state_dict()  # for `diffrl export` (not read on resume)
                if self.rank == 0:
                    save_tensors(folder / snapshot_file(role), tensors)
        tensors, rng_meta = rng_state()
        save_tensors(folder / rank_tensors(self.rank), tensors)
        write_json_atomic(folder / rank_json(self.rank), {
            "rank": self.rank,
            "counters": self.counters,
            "trained_group_ids": list(self._trained_ids),
            # the (entry, group) pairs this checkpoint commits: acked / recorded again after a crash
            "interval": [list(p) for p in zip(self._pending_ack, self._pending_groups)],
            "rng": rng_meta,
        })
        if self.rank == 0:
            for role, snap in self.nets.snapshots.items():
                save_tensors(folder / snapshot_file(role), snap.state_dict())
            write_json_atomic(folder / STATE_FILE, {
                "format": FORMAT_VERSION,
                "step": self.step,
                "p_samp_version": self.step,
                "world_size": self.world_size,
                "algorithm": self.algorithm.name,
                "roles": self.nets.names(),
                "lora": self.is_lora,
                "zero_stage": self.config.zero_stage,
                "groups_per_step": self.config.groups_per_step,
                "created_at": time.time(),
            })
        self.dist.barrier()  # every rank's files are in place

    def _commit_to_storage(self, staging: Path, name: str) -> bool:
        """Upload this rank's staged files; when every rank succeeded rank 0 commits the checkpoint.
        Whether it was committed (the same answer on every rank)."""
        import torch

        from diffrl.storage import StorageError

        ok = True
        try:
            if self.rank == 0:  # what a crashed attempt at this step left there is not part of this one
                self.storage.remove_tree(f"{CHECKPOINTS}/{name}")
            self.dist.barrier()
            self.storage.put_tree(staging, f"{CHECKPOINTS}/{name}")
        except StorageError as err:
            log.error("checkpoint %s: upload failed: %s", name, err)
            ok = False
        flag = self.dist.all_reduce(torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.dist.device))
        ok = int(flag.item()) == 0
        if ok and self.rank == 0:
            try:
                self.storage.commit_checkpoint(name)
                self.storage.prune_checkpoints(self.config.keep_checkpoints, name)
            except StorageError as err:
                log.error("checkpoint %s: commit failed: %s", name, err)
                ok = False
        if self.world_size > 1:  # rank 0's commit decides
            flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.dist.device)
            ok = int(self.dist.all_reduce(flag).item()) == 0
        shutil.rmtree(staging, ignore_errors=True)
        if ok:
            return True
        self.metrics.checkpoint_failures.inc()
        since = getattr(self, "_last_checkpoint_time", None) or self._started_time
        outage = time.monotonic() - since
        limit = self.storage.retry.max_checkpoint_outage_s
        if outage > limit:
            raise CheckpointOutageError(
                f"no checkpoint could be saved to {self.storage.root} for {outage:.0f} s "
                f"(run.storage_retry.max_checkpoint_outage_s = {limit:g}): stopping instead of training on "
                f"without checkpoints; fix the storage and resume with --resume {self.storage.root}")
        log.warning("training goes on without checkpoint %s (no checkpoint for %.0f s of at most %g s); its "
                    "experience stays unacknowledged", name, outage, limit)
        return False

    def _upload_trained_groups(self) -> None:
        """Mirror ``trained_groups.txt`` (best effort: the checkpoint is what resume relies on)."""
        from diffrl.storage import StorageError

        path = self.trained_groups_file
        if path is None or not path.is_file():
            return
        rel = run_folder.TRAINED_GROUPS if self.rank == 0 else f"trained_groups.rank_{self.rank:05d}.txt"
        try:
            self.storage.put_file(path, rel)
        except StorageError as err:
            log.warning("trained_groups.txt upload failed: %s", err)

    def restore_from_storage(self) -> Path | None:
        """Download the storage's latest complete checkpoint into a folder of this rank's own; the run
        folder to :meth:`resume` from (None: no checkpoint there)."""
        name = self.storage.latest_checkpoint()
        if name is None:
            return None
        local = self.run_dir / f".restore-rank{self.rank:05d}"
        shutil.rmtree(local, ignore_errors=True)
        self.storage.get_tree(f"{CHECKPOINTS}/{name}", checkpoints_dir(local) / name)
        mine = self.trained_groups_file
        if self.rank == 0 and mine is not None and not mine.is_file():  # a node that never had the run folder
            text = self.storage.read_text(run_folder.TRAINED_GROUPS)
            if text is not None:
                mine.parent.mkdir(parents=True, exist_ok=True)
                mine.write_text(text)
        write_latest(local, checkpoints_dir(local) / name)
        return local

    def resume(self, run_dir: str | Path | None = None) -> int | None:
        """Continue from the latest complete checkpoint of ``run_dir`` (default: this learner's):
        every role's weights and optimizer (DeepSpeed), the snapshots, step/version, trained group
        ids, counters and RNG states; then publish p_samp at the restored version. Call before
        training. Returns the restored step, or None when there is no checkpoint (nothing changes).
        Unacknowledged entries come back from the stream by themselves (the consumer re-delivers its
        pending entries)."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if run_dir is None:
            raise ValueError("run_dir: expected a run folder to resume from")
        if self.step != 0:
            raise RuntimeError("resume() must be called before training")
        folder = latest_checkpoint(run_dir)
        if folder is None:
            return None
        state = read_json(folder / STATE_FILE)
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {folder} has format {state.get('format')!r}; this learner reads "
                             f"format {FORMAT_VERSION} (written by this version of diffrl)")
        for key, mine in (("algorithm", self.algorithm.name), ("roles", self.nets.names()), ("lora", self.is_lora)):
            if state.get(key) != mine:
                raise ValueError(f"checkpoint {folder} has {key}={state.get(key)!r}, this learner {mine!r}")
        if self.config.zero_stage > 0 and state.get("world_size") != self.world_size:
            raise ValueError(f"checkpoint {folder} was written by {state.get('world_size')} ranks with ZeRO; "
                             f"this learner has {self.world_size}")
        step = int(state["step"])
        for role, net in self.nets.trained.items():
            load_path, _ = net.engine.load_checkpoint(str(folder), tag=engine_tag(role),
                                                      load_module_strict=not self.is_lora)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {folder / engine_tag(role)}")
            if net.engine.global_steps != step * net.spec.steps_per_batch:
                raise RuntimeError(f"{role}'s engine restored at optimizer step {net.engine.global_steps}, "
                                   f"checkpoint says learner step {step} x {net.spec.steps_per_batch}")
        for role, snap in self.nets.snapshots.items():
            path = folder / snapshot_file(role)
            snap.load(load_tensors(path), str(path))
        trained: list[str] = []
        for path in sorted(folder.glob("rank_*.json")):  # union: any rank may see any group again
            trained += read_json(path)["trained_group_ids"]
        for gid in trained:
            self._remember_trained(gid)
        mine_json = folder / rank_json(self.rank)
        interval: list[tuple[str, str]] = []
        if mine_json.is_file():
            meta = read_json(mine_json)
            self.counters.update(meta["counters"])
            interval = [(str(e), str(g)) for e, g in meta.get("interval", [])]
            set_rng_state(load_tensors(folder / rank_tensors(self.rank)), meta["rng"])
        self.step = step
        self._last_checkpoint_step = step
        self._buffer, self._pending_ack, self._pending_groups = [], [], []
        self._resume_commit = interval
        if self.consumer is not None and interval:
            self._commit_resumed()
        self.metrics.policy_version.set(step)
        self.publish()
        log.info("learner rank %d resumed from %s (step %d)", self.rank, folder, step)
        return step
