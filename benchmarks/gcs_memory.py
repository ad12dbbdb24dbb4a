"""GCS memory per actor call: start a local Ray, make N calls to one actor, and report how much the
gcs_server process grew, with Ray's default task-event limit or with a given one.

    .venv/bin/python benchmarks/gcs_memory.py --calls 20000                        # Ray's default (100,000 events)
    .venv/bin/python benchmarks/gcs_memory.py --calls 20000 --max-task-events 1000

Why: a diffrl run makes ~20,000 actor calls an hour, and the GCS keeps an event record of each task
up to its limit (docs/benchmarks.md, "Soak"; `ray.max_task_events`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import psutil
import ray
from soak import label  # the soak's process names: benchmarks/ is on sys.path when run as a script


def gcs_rss_mib() -> float:
    """RSS of the gcs_server this script's Ray started (another Ray on the machine is not ours)."""
    me = psutil.Process()
    for proc in me.children(recursive=True):
        if label(proc, me.pid) == "ray gcs_server":
            return proc.memory_info().rss / 2**20
    raise RuntimeError("no gcs_server process under this script")


@ray.remote
class Counter:
    def add(self, x: int) -> int:
        return x + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20_000, help="actor calls to make")
    ap.add_argument("--max-task-events", type=int, default=0,
                    help="task_events_max_num_task_in_gcs for this Ray (0 = Ray's default)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    system_config = {"task_events_max_num_task_in_gcs": args.max_task_events} if args.max_task_events else {}
    with tempfile.TemporaryDirectory(prefix="gcsmem-", dir="/tmp") as temp:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 _system_config=system_config)
        try:
            actor = Counter.remote()
            ray.get(actor.add.remote(0))
            time.sleep(2)  # let start-up settle before the first reading
            start, t0 = gcs_rss_mib(), time.perf_counter()
            for _ in range(args.calls // 100):
                ray.get([actor.add.remote(j) for j in range(100)])
            time.sleep(3)  # task events reach the GCS in batches
            end = gcs_rss_mib()
        finally:
            ray.shutdown()
    print(json.dumps({"calls": args.calls, "max_task_events": args.max_task_events or "ray default",
                      "gcs_rss_start_mib": round(start, 1), "gcs_rss_end_mib": round(end, 1),
                      "kib_per_call": round((end - start) * 1024 / max(args.calls, 1), 2),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
