"""Experiment tracking (diffrl/tracking.py): what each tracker wrote, read back with that tracker's own
reader (TensorBoard's event accumulator, the W&B offline run file, MLflow's client); resume; a failing
tracker is counted while the others go on; config and missing-package errors name tracking.backends."""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from diffrl.config import ConfigError, load_config
from diffrl.schema import TrackingConfig, TrainConfig
from diffrl.tracking import TRACKING_ERRORS_TOTAL, Tracker, check_backends, scalars

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"run": {"name": "t", "max_steps": 3}, "learner": {"lr": 0.001, "crd": {"beta": 1.0}},
          "rewards": [{"name": "shapes", "weight": 1.0}], "tracking": {"backends": ["tensorboard"]}}
# exactly representable in float32 (TensorBoard stores float32), so read-back values compare exactly
STEP1 = {"loss": 0.5, "kl": 0.25, "reward_mean_by": {"shapes": 0.75}, "note": "x", "nan": float("nan"),
         "flag": True, "staleness_max": 2}
STEP2 = {"loss": 0.375, "kl": 0.125, "reward_mean_by": {"shapes": 0.875}}
EVAL = {"strict": 0.625, "fidelity": 0.9375, "inf": float("inf")}


def grid_png(path: Path) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def log_a_run(tracker: Tracker, grid: Path) -> None:
    tracker.log_eval(0, EVAL)  # no grid file yet: metrics only
    tracker.log_train(1, STEP1)
    tracker.log_train(2, STEP2)
    tracker.log_eval(2, EVAL, grid)
    tracker.close()


def test_only_finite_numbers_are_scalars_and_nested_stats_are_flattened():
    assert scalars(STEP1, prefix="train/") == {"train/loss": 0.5, "train/kl": 0.25,
                                               "train/reward_mean_by/shapes": 0.75, "train/staleness_max": 2.0}


# ------------------------------------------------------------------------------------- tensorboard
def read_tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_grid_read_back_then_resume(tmp_path):
    pixels = grid_png(tmp_path / "grids" / "step_000002.png")
    cfg = TrackingConfig(backends=["tensorboard"])
    log_a_run(Tracker.open(cfg, tmp_path, "t", CONFIG, resumed=False, registry=CollectorRegistry()),
              tmp_path / "grids" / "step_000002.png")

    acc = read_tensorboard(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/kl", "train/reward_mean_by/shapes",
                                          "train/staleness_max", "eval/strict", "eval/fidelity"}
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert series["train/loss"] == [(1, 0.5), (2, 0.375)]
    assert series["train/reward_mean_by/shapes"] == [(1, 0.75), (2, 0.875)]
    assert series["train/staleness_max"] == [(1, 2.0)]
    assert series["eval/strict"] == [(0, 0.625), (2, 0.625)]
    (image,) = acc.Images("eval/grid")
    assert image.step == 2 and (image.width, image.height) == (20, 12)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), pixels)

    # resumed from a checkpoint at step 1: step 2 is trained again; TensorBoard shows the new step 2 only
    tracker = Tracker.open(cfg, tmp_path, "t", CONFIG, resumed=True, registry=CollectorRegistry())
    tracker.log_train(2, {"loss": 0.0625})
    tracker.log_train(3, {"loss": 0.03125})
    tracker.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = read_tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 0.0625), (3, 0.03125)]
    assert [e.step for e in acc.Scalars("eval/strict")] == [0]  # the purged step-2 evaluation is gone


# ------------------------------------------------------------------------------------------- wandb
def read_wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header, then 32 KiB blocks of chunks,
    each a 7-byte header (crc32c, length, kind: 1 full, 2 first, 3 middle, 4 last) and its bytes;
    a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records: list) -> dict[int, dict]:
    """History rows by step: ``{step: {key: value}}``; keys come as ``key`` or as ``nested_key`` parts
    (``eval/grid``'s image fields as ``["eval/grid", "width"]``: gathered into a dict)."""
    by_step: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                if key.startswith("eval/grid/"):
                    row.setdefault("eval/grid", {})[key.removeprefix("eval/grid/")] = value
                else:
                    row[key] = value
            by_step.setdefault(row["_step"], {}).update(row)
    return by_step


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's settings, cache and data folders in the test's folder, offline, no console capture."""
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path / "run"


def test_wandb_offline_run_files_hold_name_config_tags_history_and_grid(wandb_home):
    run_dir = wandb_home
    grid_png(run_dir / "grids" / "step_000002.png")
    cfg = TrackingConfig(backends=["wandb"], project="diffrl-test", tags=["crd", "cpu"], wandb_mode="offline")
    tracker = Tracker.open(cfg, run_dir, "shapes-crd-2", CONFIG, resumed=False, registry=CollectorRegistry())
    assert tracker.errors == {} and len(tracker.backends) == 1
    log_a_run(tracker, run_dir / "grids" / "step_000002.png")
    assert tracker.errors == {}

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = read_wandb_records(folder / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.display_name == "shapes-crd-2" and run.project == "diffrl-test"
    assert list(run.tags) == ["crd", "cpu"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["learner"] == {"lr": 0.001, "crd": {"beta": 1.0}} and config["run"]["name"] == "t"
    by_step = history_rows(records)
    assert by_step[1]["train/loss"] == 0.5 and by_step[1]["train/reward_mean_by/shapes"] == 0.75
    assert "train/note" not in by_step[1] and "train/nan" not in by_step[1] and "train/flag" not in by_step[1]
    assert by_step[2]["train/loss"] == 0.375 and by_step[2]["eval/strict"] == 0.625
    assert by_step[0]["eval/fidelity"] == 0.9375 and "eval/inf" not in by_step[0]
    image = by_step[2]["eval/grid"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (20, 12)
    assert (folder / "files" / image["path"]).read_bytes() == (run_dir / "grids" / "step_000002.png").read_bytes()

    # --resume continues the same W&B run (its id is kept in the run folder)
    tracker = Tracker.open(cfg, run_dir, "shapes-crd-2", CONFIG, resumed=True, registry=CollectorRegistry())
    tracker.log_train(3, {"loss": 0.25})
    tracker.close()
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


# ------------------------------------------------------------------------------------------ mlflow
def test_mlflow_store_in_the_run_folder_holds_params_tags_metrics_and_grid_then_resume(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    grid = tmp_path / "grids" / "step_000002.png"
    grid_png(grid)
    cfg = TrackingConfig(backends=["mlflow"], project="diffrl-test", tags=["crd"])
    tracker = Tracker.open(cfg, tmp_path, "shapes-crd", CONFIG, resumed=False, registry=CollectorRegistry())
    log_a_run(tracker, grid)
    assert tracker.errors == {}

    run_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "shapes-crd" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "diffrl-test"
    assert run.data.params["learner.lr"] == "0.001" and run.data.params["learner.crd.beta"] == "1.0"
    assert json.loads(run.data.params["rewards"]) == [{"name": "shapes", "weight": 1.0}]
    assert run.data.tags["crd"] == ""
    history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
               for key in run.data.metrics}
    assert history["train/loss"] == [(1, 0.5), (2, 0.375)]
    assert history["train/reward_mean_by/shapes"] == [(1, 0.75), (2, 0.875)]
    assert history["eval/strict"] == [(0, 0.625), (2, 0.625)]
    assert not {"train/note", "train/nan", "train/flag", "eval/inf"} & set(history)
    (artifact,) = client.list_artifacts(run_id, "grids")
    assert artifact.path == "grids/step_000002.png"
    local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "download"))
    assert Path(local).read_bytes() == grid.read_bytes()
    assert str(tmp_path / "mlruns") in run.info.artifact_uri  # artifacts stay in the run folder

    # --resume: the same run, running again, its params kept even where the resumed config differs
    resumed = {**CONFIG, "run": {"name": "t", "max_steps": 5}}
    tracker = Tracker.open(cfg, tmp_path, "shapes-crd", resumed, resumed=True, registry=CollectorRegistry())
    assert client.get_run(run_id).info.status == "RUNNING"
    tracker.log_train(3, {"loss": 0.25})
    tracker.close()
    assert tracker.errors == {}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")][-1] == (3, 0.25)
    assert client.get_run(run_id).data.params["run.max_steps"] == "3"


# ------------------------------------------------------------------------------------------ faults
class Recording:
    name = "recording"

    def __init__(self):
        self.calls = []

    def log(self, step, values, grid=None):
        self.calls.append((step, values, grid))

    def close(self):
        self.calls.append("closed")


class Raising(Recording):
    name = "raising"

    def log(self, step, values, grid=None):
        raise OSError("disk full")

    def close(self):
        raise OSError("disk full")


def test_a_raising_backend_is_counted_and_warned_about_once_while_the_others_go_on(caplog, tmp_path):
    registry = CollectorRegistry()
    recording = Recording()
    tracker = Tracker([Raising(), recording], registry=registry)
    with caplog.at_level(logging.WARNING, logger="diffrl.tracking"):
        tracker.log_train(1, {"loss": 0.5})
        tracker.log_train(2, {"loss": 0.25})
        tracker.log_eval(2, {"strict": 0.5}, tmp_path / "missing.png")
        tracker.close()
    assert tracker.errors == {"raising": 4}
    assert registry.get_sample_value(TRACKING_ERRORS_TOTAL, {"backend": "raising"}) == 4
    warned = [r.getMessage() for r in caplog.records if "raising" in r.getMessage()]
    expected = (f"tracking: the raising tracker failed to log (OSError: disk full); the run goes on "
                f"(further errors are counted in {TRACKING_ERRORS_TOTAL})")
    assert warned == [expected]
    assert recording.calls == [(1, {"train/loss": 0.5}, None), (2, {"train/loss": 0.25}, None),
                               (2, {"eval/strict": 0.5}, None), "closed"]


def test_a_backend_that_cannot_open_is_counted_and_left_out(tmp_path):
    pytest.importorskip("mlflow")
    registry = CollectorRegistry()
    cfg = TrackingConfig(backends=["tensorboard", "mlflow"], mlflow_tracking_uri="nosuchscheme://nowhere")
    tracker = Tracker.open(cfg, tmp_path, "t", CONFIG, resumed=False, registry=registry)
    assert [b.name for b in tracker.backends] == ["tensorboard"] and tracker.errors == {"mlflow": 1}
    assert registry.get_sample_value(TRACKING_ERRORS_TOTAL, {"backend": "mlflow"}) == 1
    tracker.log_train(1, {"loss": 0.5})
    tracker.close()
    assert [e.value for e in read_tensorboard(tmp_path / "tensorboard").Scalars("train/loss")] == [0.5]


def test_none_opens_nothing(tmp_path):
    tracker = Tracker.open(TrackingConfig(backends=["none"]), tmp_path, "t", CONFIG, resumed=False)
    tracker.log_train(1, {"loss": 0.5})
    tracker.close()
    assert tracker.backends == [] and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, field, hint", [
    (["tracking.backends=[tensorboard,neptune]"], "tracking.backends", "names among"),
    (["tracking.backends=[none,wandb]"], "tracking.backends", "[none] alone"),
    (["tracking.backends=[wandb,wandb]"], "tracking.backends", "once"),
    (["tracking.wandb_mode=cloud"], "tracking.wandb_mode", "offline"),
    (["tracking.project=team/diffrl"], "tracking.project", "without '/'"),
])
def test_config_errors_name_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    assert err.value.field == field and hint in err.value.message, str(err.value)


def test_default_is_tensorboard():
    cfg = load_config(TrainConfig, REPO / "deploy/configs/shapes-cpu.yaml")
    assert cfg.tracking.backends == ["tensorboard"] and cfg.tracking.active == ["tensorboard"]
    check_backends(cfg.tracking)  # a main dependency: installed


def test_a_missing_package_fails_diffrl_train_at_startup_naming_the_extra(capsys, tmp_path, monkeypatch):
    from diffrl.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(ConfigError) as err:
        check_backends(TrackingConfig(backends=["tensorboard", "wandb"]))
    assert err.value.field == "tracking.backends" and "pip install 'diffrl[wandb]'" in err.value.message

    code = main(["train", str(REPO / "deploy/configs/shapes-cpu.yaml"), "tracking.backends=[wandb]",
                 f"run.output_dir={tmp_path / 'runs'}"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.startswith("diffrl: bad config: tracking.backends: the wandb tracker needs"), err_text
    assert "pip install 'diffrl[wandb]'" in err_text
    assert not (tmp_path / "runs").exists()  # refused before the run folder, Redis or Ray
