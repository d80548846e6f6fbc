"""LiteLLM's proxy as the peer: same upstream (the static nginx), same load, same run.

``litellm --config`` with one worker, no database, no limits, a master key (it refuses to start
without one; with no database that key is the only one and checking it is a string compare):
the cheapest setup it has, forwarding both bench models to the upstream as OpenAI-compatible models. It is
installed in its own virtualenv in the tools cache (hack/tools/bench-tools.sh), never in
Atlas's, and told to use its bundled model-cost map instead of fetching one.
"""

from __future__ import annotations

import json
import os

from . import bodies
from .procs import Proc

MASTER_KEY = "sk-litellm-bench-0000000000000000000000"  # the bearer the bench sends to LiteLLM


def config(json_base: str, sse_base: str) -> str:
    """The proxy config (YAML; JSON is valid YAML)."""

    def model(name: str, base: str) -> dict:
        return {
            "model_name": name,
            "litellm_params": {"model": f"openai/{name}", "api_base": base + "/v1", "api_key": "none"},
        }

    return json.dumps(
        {
            "model_list": [model(bodies.MODEL, json_base), model(bodies.STREAM_MODEL, sse_base)],
            "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
            "general_settings": {"master_key": MASTER_KEY, "disable_spend_logs": True, "disable_error_logs": True},
        },
        indent=2,
    )


def peer(binary: str, json_base: str, sse_base: str, workdir: str) -> Proc:
    home = os.path.join(workdir, "litellm")
    os.makedirs(home, exist_ok=True)
    path = os.path.join(home, "config.yaml")
    with open(path, "w") as fh:
        fh.write(config(json_base, sse_base))
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch of the cost map at start-up
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "HOME": home,  # whatever it caches goes to the temporary directory
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return Proc(
        "litellm",
        [binary, "--config", path, "--host", "127.0.0.1", "--port", "{port}", "--num_workers", "1"],
        env=env,
        health="/health/liveliness",
        log=os.path.join(home, "litellm.log"),
        cwd=home,
        start_timeout=120.0,
        unset=("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_URL", "REDIS_HOST"),
    )
