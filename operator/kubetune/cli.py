"""The `kubetune` command: run the operator, manage the local cluster, print the CRDs.

kubetune run [--namespace NS ...]        run the operator against the current kubeconfig
kubetune dev cluster up|down|status|kubeconfig [--name NAME] [--real-node]
kubetune crds [--out DIR]                the CRDs generated from the typed API
kubetune version
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kubetune import __version__


def _cluster_cmd(args: argparse.Namespace) -> int:
    from kubetune.devcluster.cluster import ClusterError, LocalCluster

    cluster = LocalCluster(args.name, real_node=args.real_node)
    if args.action == "up":
        started = time.monotonic()
        try:
            created = cluster.up()
        except ClusterError as err:
            print(f"kubetune: the local cluster failed to start:\n{err}", file=sys.stderr)
            return 1
        verb = "started" if created else "already running"
        print(
            f"cluster {args.name!r} {verb} in {time.monotonic() - started:.1f}s at {cluster.server}"
        )
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        return 0
    if args.action == "down":
        cluster.down()
        print(f"cluster {args.name!r} stopped")
        return 0
    if args.action == "kubeconfig":
        if not cluster.kubeconfig.exists():
            print(
                f"kubetune: no cluster {args.name!r}; run `kubetune dev cluster up`",
                file=sys.stderr,
            )
            return 1
        print(cluster.kubeconfig)
        return 0
    status = cluster.status()
    print(json.dumps(status, indent=2))
    alive = all(c["alive"] for c in status["components"].values())
    return 0 if status["ready"] and alive else 1


def _crds_cmd(args: argparse.Namespace) -> int:
    from kubetune.crdgen import write_crds

    for path in write_crds(Path(args.out)):
        print(path)
    return 0


def _run_cmd(args: argparse.Namespace) -> int:
    from kubetune.operator_main import run_operator

    return run_operator(
        namespaces=args.namespace,
        all_namespaces=not args.namespace,
        log_level=args.log_level,
        liveness_endpoint=args.liveness,
        metrics_port=args.metrics_port,
        leader_election=args.leader_election,
        kubeconfig=os.environ.get("KUBECONFIG"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable)",
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log level (default: info; kopf's per-handler success lines only at debug)",
    )
    run.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's health endpoint at URL, e.g. http://0.0.0.0:8080/healthz",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve the operator's Prometheus metrics on this port (default: off)",
    )
    run.add_argument(
        "--leader-election",
        metavar="NAMESPACE/NAME",
        help="run as one of several replicas: only the holder of this Lease acts",
    )
    run.set_defaults(func=_run_cmd)

    dev = sub.add_parser("dev", help="local development tools")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    cluster = dev_sub.add_parser(
        "cluster", help="the local control plane (real binaries, kwok nodes)"
    )
    cluster.add_argument("action", choices=["up", "down", "status", "kubeconfig"])
    cluster.add_argument("--name", default="kubetune", help="cluster name (default: kubetune)")
    cluster.add_argument(
        "--real-node",
        action="store_true",
        help="up: add a real node (kubelet, containerd, runc, CNI, CoreDNS; needs root)",
    )
    cluster.set_defaults(func=_cluster_cmd)

    crds = sub.add_parser("crds", help="write the CRDs generated from the typed API")
    crds.add_argument("--out", default="crds", help="output folder (default: crds)")
    crds.set_defaults(func=_crds_cmd)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(__version__) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
