"""`make deploy-down` leaves nothing behind: no pod, process, mount, network device or rule."""

from __future__ import annotations

import os
import subprocess

import pytest

from atlas_devstack.node_network import BRIDGE

from .conftest import Cluster


def test_deploy_down_leaves_no_process_mount_or_network_device(cluster: Cluster):
    if os.environ.get("ATLAS_DEPLOY_REUSE"):
        pytest.skip("ATLAS_DEPLOY_REUSE: the stack is kept")
    state = str(cluster.stack.dir)
    assert cluster.stack.leftovers(), "nothing running before down: the check below would prove nothing"
    cluster.stack.down()

    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    ours = [line for line in ps.splitlines() if state in line or "containerd-shim-runc-v2" in line and state in line]
    assert not ours, ours
    mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
    assert state not in mounts
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert BRIDGE not in links and "veth" not in links, links
    for table in ("filter", "nat", "mangle"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
        assert not [
            r
            for r in rules.splitlines()
            if r.startswith("-N ") and r.split()[1].startswith(("KUBE-", "CNI-", "ATLAS-"))
        ], rules
    assert subprocess.run(["ip", "route", "show", "10.0.0.0/24"], capture_output=True, text=True).stdout.strip() == ""
    assert not cluster.stack.leftovers()
