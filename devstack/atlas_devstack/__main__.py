"""`python -m atlas_devstack up|down|logs [--follow]` (make dev-up / dev-down / dev / dev-logs)."""

from __future__ import annotations

import argparse
import sys

from .stack import DEFAULT_STATE_DIR, DevStack, StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atlas_devstack", description=__doc__)
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="default: .dev/ in the repo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start everything, apply the quickstart, write .dev/env")
    sub.add_parser("down", help="stop everything `up` started (idempotent)")
    logs = sub.add_parser("logs", help="print the logs")
    logs.add_argument("--follow", "-f", action="store_true")
    args = parser.parse_args(argv)

    stack = DevStack(args.state_dir)
    if args.command == "up":
        try:
            stack.up()
        except StackError as exc:
            print(f"dev-up failed: {exc}", file=sys.stderr)
            return 1
        print(stack.banner())
    elif args.command == "down":
        stack.down()
    else:
        stack.follow_logs(args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
