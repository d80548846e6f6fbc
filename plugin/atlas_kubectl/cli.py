"""`kubectl atlas`: Atlas's keys and budgets from the command line.

    kubectl atlas usage [-A] [--sort-by percent]   keys and quotas: used / limit / % / forecast
    kubectl atlas top [-A]                         burn rate now, busiest first
    kubectl atlas key reveal NAME                  print the key (for scripts: KEY=$(...))
    kubectl atlas key rotate NAME                  a fresh key, honouring rotationGracePeriod

kubectl runs any `kubectl-atlas` on PATH for `kubectl atlas ...`; the flags come after the
subcommand's name (kubectl passes everything after `atlas` to the plugin): `--kubeconfig`,
`--context`, `-n/--namespace`, `-A/--all-namespaces`, `-l/--selector`, as kubectl reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from atlas_core.resources import KEYS, QUOTAS

from . import budgets, keys
from .kube import Cluster, PluginError, connect
from .table import render

# --sort-by: column -> (key, descending). Missing values sort last either way.
USAGE_SORTS: dict[str, tuple[Callable[[budgets.Row], Any], bool]] = {
    "name": (lambda r: (r.namespace, r.kind, r.name), False),  # budgets of one object in BUDGETS order
    "percent": (lambda r: r.percent, True),
    "used": (lambda r: r.used, True),
    "limit": (lambda r: r.limit, True),
    "rate": (lambda r: r.tokens_per_hour, True),
    "exhausts": (lambda r: r.exhausts_at, False),
}
TOP_SORTS: dict[str, tuple[Callable[[budgets.Burn], Any], bool]] = {
    "rate": (lambda b: b.tokens_per_hour, True),
    "tokens": (lambda b: b.tokens_today, True),
    "requests": (lambda b: b.requests_today, True),
    "name": (lambda b: (b.namespace, b.kind, b.name), False),
}


def sort(items: list, sorts: dict, by: str) -> list:
    """Ordered by ``by``; ties, and rows without that value (last), by namespace, kind, name."""
    items = sorted(items, key=lambda i: (i.namespace, i.kind, i.name))
    key, descending = sorts[by]
    present = [i for i in items if key(i) is not None]
    return sorted(present, key=key, reverse=descending) + [i for i in items if key(i) is None]


# --------------------------------------------------------------------------- commands


def cmd_usage(args: argparse.Namespace, cluster: Cluster) -> str:
    objects = _atlas_objects(cluster, args.selector)
    rows = sort(budgets.usage_rows(objects, _now()), USAGE_SORTS, args.sort_by)
    if args.output == "json":
        return json.dumps([r.as_dict() for r in rows], indent=2)
    headers = ["KIND", "NAME", "BUDGET", "USED", "LIMIT", "USED%", "TOKENS/HOUR", "EXHAUSTS"]
    lines = [
        [
            r.kind,
            r.name,
            r.budget,
            _number(r.used),
            _number(r.limit),
            _percent(r.percent),
            r.tokens_per_hour,
            _exhausts(r),
        ]
        for r in rows
    ]
    return _table(args, cluster, headers, [r.namespace for r in rows], lines, "no AtlasKeys or AtlasQuotas found")


def cmd_top(args: argparse.Namespace, cluster: Cluster) -> str:
    objects = _atlas_objects(cluster, args.selector)
    rows = sort(budgets.burn_rows(objects, _now()), TOP_SORTS, args.sort_by)
    if args.output == "json":
        return json.dumps([b.as_dict() for b in rows], indent=2)
    headers = ["KIND", "NAME", "TOKENS/HOUR", "BASIS", "TOKENS TODAY", "REQUESTS TODAY", "LAST REQUEST"]
    lines = [
        [b.kind, b.name, b.tokens_per_hour, b.basis, b.tokens_today, b.requests_today, b.last_request] for b in rows
    ]
    return _table(args, cluster, headers, [b.namespace for b in rows], lines, "no AtlasKeys or AtlasQuotas found")


def cmd_key_reveal(args: argparse.Namespace, cluster: Cluster) -> str:
    return keys.reveal(cluster, args.name)


def cmd_key_rotate(args: argparse.Namespace, cluster: Cluster) -> str:
    return keys.rotate(cluster, args.name, force=args.force, wait=args.wait, timeout=args.timeout).report()


# --------------------------------------------------------------------------- output


def _atlas_objects(cluster: Cluster, selector: str | None) -> list[dict[str, Any]]:
    return cluster.list(QUOTAS, selector) + cluster.list(KEYS, selector)


def _table(
    args: argparse.Namespace,
    cluster: Cluster,
    headers: list[str],
    namespaces: list[str],
    lines: list[list[Any]],
    empty: str,
) -> str:
    if not lines:
        scope = "any namespace" if cluster.all_namespaces else f'namespace "{cluster.namespace}"'
        print(f"{empty} in {scope}", file=sys.stderr)  # as kubectl: the "nothing" notice on stderr
        return ""
    if cluster.all_namespaces:
        headers = ["NAMESPACE", *headers]
        lines = [[ns, *line] for ns, line in zip(namespaces, lines)]
    return render(headers, lines, args.no_headers)


def _number(value: Any) -> str | None:
    if value is None:
        return None
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}%"


def _exhausts(row: budgets.Row) -> str | None:
    if row.limit is not None and row.used >= row.limit:
        return "spent"
    return budgets.rfc3339(row.exhausts_at)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- arguments


def duration(text: str) -> float:
    """`30s`, `2m`, `1h` or plain seconds (what kubectl's --timeout takes)."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 2m)") from None


def _connection_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """kubectl's flags, accepted before and after the subcommand (SUPPRESS keeps a subcommand's
    parser from overwriting a value given before it)."""
    parser.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file")
    parser.add_argument("--context", default=default, help="the kubeconfig context to use")
    parser.add_argument("-n", "--namespace", default=default, help="the namespace (default: the context's)")


def _list_flags(parser: argparse.ArgumentParser, sorts: dict, default_sort: str) -> None:
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    parser.add_argument("-l", "--selector", help="label selector, as kubectl's -l")
    parser.add_argument(
        "--sort-by", choices=sorted(sorts), default=default_sort, help=f"order of the rows (default {default_sort})"
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--no-headers", action="store_true", help="omit the header line")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kubectl atlas",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    _connection_flags(top, None)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, helptext: str, into: Any = sub) -> argparse.ArgumentParser:
        p = into.add_parser(name, help=helptext, description=helptext)
        _connection_flags(p, argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    usage = command("usage", cmd_usage, "keys and quotas: each budget's used / limit / %% and when it runs out")
    _list_flags(usage, USAGE_SORTS, "name")
    top_cmd = command("top", cmd_top, "burn rate now (the operator's measured tokens per hour), busiest first")
    _list_flags(top_cmd, TOP_SORTS, "rate")

    key = sub.add_parser("key", help="an AtlasKey's key: reveal or rotate")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="COMMAND")
    reveal = command("reveal", cmd_key_reveal, "print the AtlasKey's key (from its Secret)", key_sub)
    reveal.add_argument("name", metavar="NAME")
    rotate = command(
        "rotate",
        cmd_key_rotate,
        "put a fresh key in the AtlasKey's Secret; the old one keeps working for its rotationGracePeriod",
        key_sub,
    )
    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument(
        "--force",
        action="store_true",
        help="rotate even while the previous key is still in its grace period (it is refused at once)",
    )
    rotate.add_argument(
        "--wait",
        default=True,
        type=_boolean,
        nargs="?",
        const=True,
        help="wait until the operator serves the new key (default true; --wait=false to not)",
    )
    rotate.add_argument("--timeout", type=duration, default=30.0, help="how long --wait waits (default 30s)")
    return top


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cluster = connect(args.kubeconfig, args.context, args.namespace, getattr(args, "all_namespaces", False))
        out = args.handler(args, cluster)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if out:
        print(out)
    return 0
