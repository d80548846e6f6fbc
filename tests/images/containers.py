"""Run an image the way the chart's pod spec runs it, with `docker run`.

The pod spec comes from `helm template` of the chart's default values, so a change to the chart's
security context, volumes, resources or env is what these tests run. Kubernetes fields map to
docker flags:

    runAsUser/runAsGroup (+ fsGroup)        --user UID:GID (--group-add FSGROUP)
    readOnlyRootFilesystem: true            --read-only
    capabilities.drop: [ALL]                --cap-drop ALL
    allowPrivilegeEscalation: false         --security-opt no-new-privileges
    seccompProfile RuntimeDefault           docker's default seccomp profile (always on)
    emptyDir volume (sizeLimit)             --tmpfs MOUNTPATH:size=...,mode=0777
    resources.limits.memory                 --memory
    env (value:)                            -e NAME=VALUE (tests override addresses and ports)

Networking differs on purpose: the containers share the host's network namespace (`--network
host`, the engine has no bridge) and listen on loopback ports the test picks.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from typing import Any

# The CLI matching the engine hack/docker.sh installs and starts: set by the docker_engine
# fixture once that engine answers (on a fresh machine Debian's CLI does not exist before).
DOCKER = ""
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    assert DOCKER, "the docker_engine fixture resolves the Docker CLI first"
    res = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}:\n{res.stderr}{res.stdout[-2000:]}")
    return res


def _docker_size(quantity: str) -> str:
    match = _QUANTITY.match(str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    number, unit = match.groups()
    return number + {"Ki": "k", "Mi": "m", "Gi": "g", None: "b"}[unit]


@dataclass
class PodSpec:
    """One container of a rendered Deployment, with its pod-level security context and volumes."""

    pod: dict[str, Any]
    container: dict[str, Any]

    @classmethod
    def of(cls, deployment: dict[str, Any], container_name: str) -> "PodSpec":
        pod = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == container_name]
        return cls(pod, container)

    @property
    def image(self) -> str:
        return self.container["image"]

    def env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}

    def docker_flags(self) -> list[str]:
        pod_sc = self.pod.get("securityContext", {})
        sc = {**pod_sc, **self.container.get("securityContext", {})}
        flags: list[str] = []
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        assert uid is not None, "the chart must name a numeric user"
        flags += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if pod_sc.get("fsGroup") is not None:
            flags += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        for cap in sc.get("capabilities", {}).get("drop", []):
            flags += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            flags += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        assert not sc.get("privileged"), "the chart never runs privileged containers"
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume, f"volume {mount['name']}: only emptyDir is mapped here"
            size = (volume["emptyDir"] or {}).get("sizeLimit")
            options = ["rw", "mode=0777"] + ([f"size={_docker_size(size)}"] if size else [])
            flags += ["--tmpfs", f"{mount['mountPath']}:{','.join(options)}"]
        memory = self.container.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            flags += ["--memory", _docker_size(memory)]
        return flags


@dataclass
class Container:
    """A detached container; `stop()` removes it (and is safe to call twice)."""

    image: str
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"atlas-test-{secrets.token_hex(4)}")
    started: bool = False

    @classmethod
    def as_chart_runs(cls, spec: PodSpec, env: dict[str, str], extra_flags: list[str] = ()) -> "Container":
        return cls(spec.image, [*spec.docker_flags(), *extra_flags], {**spec.env(), **env})

    def start(self) -> "Container":
        argv = ["run", "--detach", "--name", self.name, "--network", "host", *self.flags]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        docker(*argv, self.image, *self.args)
        self.started = True
        return self

    def inspect(self) -> dict[str, Any]:
        return json.loads(docker("inspect", "--format", "{{json .}}", self.name).stdout)

    def state(self) -> dict[str, Any]:
        return self.inspect()["State"]

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def logs(self) -> str:
        res = docker("logs", self.name, check=False)
        return res.stdout + res.stderr

    def stop(self) -> None:
        if self.started:
            docker("rm", "--force", self.name, check=False)
            self.started = False

    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
