"""Runs the kopf operator with kubetune's handlers (`kubetune run`).

With `--leader-election NAMESPACE/NAME` several replicas may run: each waits for a
coordination.k8s.io Lease (the Kubernetes client's leader election, the same protocol as
client-go's), only the holder runs the handlers, and a holder that cannot renew its Lease exits
at once so that two never act together; its pod restarts as a standby. kopf's own peering does
not elect (replicas of equal priority all pause), hence the Lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import kopf

log = logging.getLogger("kubetune")

# A standby takes over at most LEASE_SECONDS + RETRY_SECONDS after the holder stopped renewing.
LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2


def run_operator(
    namespaces: list[str],
    all_namespaces: bool,
    log_level: str = "info",
    liveness_endpoint: str | None = None,
    metrics_port: int = 0,
    leader_election: str | None = None,
    kubeconfig: str | None = None,
) -> int:
    """Run kopf until it is stopped. `liveness_endpoint` (e.g. http://0.0.0.0:8080/healthz) is
    kopf's health endpoint, which the chart's liveness probe calls."""
    import kubetune.handlers  # noqa: F401  (registers the handlers)
    from kubetune import metrics
    from kubetune.handlers import children

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if log_level != "debug":
        # kopf's per-object lines ("Handler 'child_event' succeeded.", one per handler per
        # event) from WARNING up: at INFO they were a twentieth of the operator's CPU in a burst
        # of 1,000 jobs (formatting and writing 14 lines a job). Failures still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if metrics_port:
        metrics.serve(metrics_port)
    if leader_election:
        _wait_for_leadership(leader_election, liveness_endpoint, kubeconfig)
    children.set_scope(namespaces, clusterwide=all_namespaces)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness_endpoint,
        )
    )
    return 0


def _wait_for_leadership(where: str, liveness_endpoint: str | None, kubeconfig: str | None) -> None:
    """Block until this replica holds the Lease; keep renewing it in the background."""
    from kubernetes import config
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    namespace, _, name = where.partition("/")
    if not name:
        raise SystemExit("--leader-election takes NAMESPACE/NAME, e.g. kubetune-system/kubetune")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)
    identity = f"{socket.gethostname()}-{os.getpid()}"
    leading = threading.Event()

    def lost() -> None:
        log.error("lost the lease %s: stopping so that another replica can lead", where)
        logging.shutdown()
        os._exit(1)

    election = leaderelection.LeaderElection(
        electionconfig.Config(
            LeaseLock(name, namespace, identity),
            lease_duration=LEASE_SECONDS,
            renew_deadline=RENEW_DEADLINE_SECONDS,
            retry_period=RETRY_SECONDS,
            onstarted_leading=leading.set,
            onstopped_leading=lost,
        )
    )
    standby = _standby_health(liveness_endpoint)
    log.info("standing by for the lease %s as %s", where, identity)
    threading.Thread(target=election.run, name="leader-election", daemon=True).start()
    leading.wait()
    log.info("leading: holding the lease %s as %s", where, identity)
    if standby is not None:
        standby.shutdown()
        standby.server_close()


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"standby\n")

    def log_message(self, format: str, *args: Any) -> None:
        return


def _standby_health(endpoint: str | None) -> ThreadingHTTPServer | None:
    """A standby answers the liveness probe on kopf's port until kopf takes it over."""
    if not endpoint:
        return None
    url = urlparse(endpoint)
    server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":  # `python -m kubetune.operator_main`: how the local cluster runs it
    raise SystemExit(run_operator(namespaces=[], all_namespaces=True))
