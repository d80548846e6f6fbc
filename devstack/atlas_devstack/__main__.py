"""`python -m atlas_devstack up|down|logs [--follow]` (make dev-up / dev-down / dev / dev-logs).

`up` starts the stack in the background and returns once the demo key works (exit 0). A
failure, or SIGTERM/SIGINT/SIGHUP while it starts, stops what it had started (exit 1, or
128+N for signal N). `down` stops everything and replaces .dev/env by a file that, sourced,
says the stack is down and returns 1; a signal does not cut it short.
"""

from __future__ import annotations

import argparse
import sys

from . import processes
from .controlplane import ControlPlaneError, KubectlError
from .stack import DEFAULT_STATE_DIR, DevStack, StackError
from .tools import ToolNotFound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atlas_devstack", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="default: .dev/ in the repo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start everything, apply the quickstart, write .dev/env")
    sub.add_parser("down", help="stop everything `up` started (idempotent)")
    logs = sub.add_parser("logs", help="print the logs")
    logs.add_argument("--follow", "-f", action="store_true")
    args = parser.parse_args(argv)

    stack = DevStack(args.state_dir)
    if args.command == "up":

        def up(on_exit: processes.OnExit) -> int:
            stack.up()  # stops what it started on any failure or signal, then re-raises
            print(stack.banner())
            return 0

        return processes.run("dev-up", up, errors=(StackError, ControlPlaneError, KubectlError, ToolNotFound))
    if args.command == "down":

        def down(on_exit: processes.OnExit) -> int:
            stack.down()
            return 0

        return processes.run("dev-down", down)
    stack.follow_logs(args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
