"""One log file per process under RUN/logs (diffrl/run_logs.py), mirrored to object storage, and
``diffrl status`` pointing at them when something is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from diffrl.run_logs import LogMirror, process_log_path
from diffrl.status import NOT_RUNNING, collect_status, format_status
from diffrl.storage import RunStorage
from diffrl.utils import free_port


def test_process_output_goes_to_its_file_and_a_restart_appends(tmp_path):
    """print, logging, a raw write to fd 2 and a dying process's traceback all land in the file."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        from diffrl.run_logs import redirect_process_output
        redirect_process_output({str(tmp_path)!r}, "sampler-3")
        print("hello from print", flush=True)
        logging.getLogger("diffrl.actors.sampler").warning("a diffrl warning")
        os.write(2, b"raw bytes on fd 2\\n")
        raise RuntimeError("the actor died: " + sys.argv[1])
    """)
    for attempt in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", script, attempt], capture_output=True, text=True, check=False)
        assert proc.returncode == 1
        assert proc.stdout == "" and proc.stderr == ""  # nothing left on the original streams
    text = process_log_path(tmp_path, "sampler-3").read_text()
    assert text.count("hello from print") == 2 and text.count("raw bytes on fd 2") == 2
    assert "WARNING diffrl.actors.sampler: a diffrl warning" in text
    assert "RuntimeError: the actor died: first" in text and "RuntimeError: the actor died: second" in text
    assert text.index("died: first") < text.index("died: second")  # appended, not overwritten


def test_log_mirror_uploads_while_it_grows_and_at_close(tmp_path):
    store = RunStorage(f"memory://diffrl-test/logs-{time.monotonic_ns()}")
    path = tmp_path / "logs" / "learner-0.log"
    path.parent.mkdir()
    path.write_text("line 1\n")
    mirror = LogMirror(store, path, interval_s=0.1)
    deadline = time.monotonic() + 5
    while store.read_text("logs/learner-0.log") != "line 1\n":
        assert time.monotonic() < deadline, "the log was not uploaded"
        time.sleep(0.05)
    with open(path, "a") as f:
        f.write("line 2\n")
    mirror.close()
    assert store.read_text("logs/learner-0.log") == "line 1\nline 2\n"


def test_status_points_at_the_logs_when_the_learner_is_gone(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    dead = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens: the learner is gone
    (run / "endpoints.json").write_text(json.dumps({"learner_metrics": dead, "sampler_metrics": [], "rewards": {}}))
    (run / "logs" / "learner-0.log").write_text("step 3\nTraceback (most recent call last):\n"
                                                "  File x\nRuntimeError: CUDA out of memory\n")
    (run / "logs" / "sampler-0.log").write_text("all fine\n")
    st = collect_status(run, timeout_s=1.0)
    assert st["state"] == NOT_RUNNING
    out = format_status(st)
    assert str(run / "logs" / "learner-0.log") in out and str(run / "logs" / "sampler-0.log") in out
    assert "last error: RuntimeError: CUDA out of memory" in out
    assert out.count("last error") == 1  # the sampler's log has none
