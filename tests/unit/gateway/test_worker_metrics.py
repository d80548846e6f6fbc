"""worker_metrics.py: snapshots of several workers summed; gauges of a gone worker left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from atlas_gateway import worker_metrics


def gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write(directory, pid: int, requests: float, inflight: float) -> None:
    families = [
        ["atlas_gateway_requests", "counter", "Requests", [["atlas_gateway_requests_total", {"key": "a/b"}, requests]]],
        ["atlas_gateway_inflight_requests", "gauge", "In flight", [["atlas_gateway_inflight_requests", {}, inflight]]],
    ]
    (directory / f"{pid}.json").write_text(json.dumps(families))


def value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_counters_add_up_over_every_snapshot_and_gauges_over_live_workers(tmp_path):
    write(tmp_path, os.getppid(), 5, 2)  # a live process
    write(tmp_path, gone_pid(), 7, 3)  # a worker that has exited: its counts stay, its gauge goes
    (tmp_path / "junk.json").write_text("{")  # not a snapshot: ignored
    (tmp_path / "12345.json.tmp").write_text("{")  # a snapshot being written: ignored
    text = worker_metrics.render(str(tmp_path)).decode()
    own = worker_metrics.snapshot()  # this process's live values are in the sum too
    assert value(text, 'atlas_gateway_requests_total{key="a/b"}') == 12
    assert value(text, "atlas_gateway_inflight_requests ") == 2 + sum(
        v for name, _, _, samples in own if name == "atlas_gateway_inflight_requests" for _, _, v in samples
    )
    assert "process_" not in text and "python_" not in text  # per-process families stay out


def test_a_snapshot_is_replaced_whole(tmp_path):
    worker_metrics.write_snapshot(str(tmp_path), pid=4242)
    assert json.loads((tmp_path / "4242.json").read_text()) == json.loads(json.dumps(worker_metrics.snapshot()))
    assert not list(tmp_path.glob("*.tmp"))


def test_the_shed_view_gauges_report_their_largest_value_not_their_sum(tmp_path):
    """Each worker's view of the other gateway processes already counts its sibling workers."""
    for pid, others in ((os.getppid(), 3), (1, 5)):  # two live processes
        (tmp_path / f"{pid}.json").write_text(
            json.dumps(
                [
                    [
                        "atlas_gateway_shed_view_other_inflight_requests",
                        "gauge",
                        "Others",
                        [["atlas_gateway_shed_view_other_inflight_requests", {}, others]],
                    ]
                ]
            )
        )
    text = worker_metrics.render(str(tmp_path)).decode()
    own = [
        v
        for name, _, _, samples in worker_metrics.snapshot()
        if name == "atlas_gateway_shed_view_other_inflight_requests"
        for _, _, v in samples
    ]
    assert value(text, "atlas_gateway_shed_view_other_inflight_requests ") == max([5, *own])
