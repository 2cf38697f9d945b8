"""Real-pod race, kubelet vs beacon (hack/kind-e2e.sh, scenario "race").

The same pods back a ServiceEntry (beacon probes them itself) and an ordinary Service (kubelet's readinessProbe,
configured like beacon's check, sets the pod's Ready condition; kube-controller-manager's EndpointSlice controller
publishes it). One pod's health endpoint is broken, and for each side we record when its EndpointSlice shows that
pod's address not ready; then health is restored and we record when both show it ready again. Repeated --runs
times; per-run figures, medians and the ratio beacon/kcm are printed.

Clock and moments:
- One clock, time.monotonic(), in this process.
- t0 is taken right AFTER `kubectl exec <pod> -- rm /srv/healthz` returns: the file is gone by then, so no side
  can legitimately see the failure before t0. The exec itself takes a few hundred ms (printed as `exec`); the
  break happened somewhere inside that window, so both latencies may be over-counted by at most that much, equally.
- Arrival times come from a single watch on the namespace's EndpointSlices (both services): the moment each
  event's line arrives on the socket, before decoding. lastTransitionTime and other server timestamps are never
  used. The watch starts (list + watch from its resourceVersion) before the first run, so no event is missed.
- Before each break the helper waits a random 0..interval seconds, so the break falls at a uniformly random phase
  of both probe schedules (kubelet's and beacon's are independent of the test's clock).

It is a measurement, not an assertion: the exit status is 1 only if a side never shows the change within --timeout.
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from kubeapi import Kube

LABEL_SERVICE = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
BEACON_MANAGED_BY = "operator.beacon.dev"  # beacon.reconcile.MANAGED_BY
KCM_MANAGED_BY = "endpointslice-controller.k8s.io"


def log(msg: str) -> None:
    print(f"[race] {msg}", flush=True)


class SliceWatcher(threading.Thread):
    """List + watch EndpointSlices of the given services; every (arrival, type, object) goes onto `events`."""

    def __init__(self, kube: Kube, namespace: str, services: list[str]) -> None:
        super().__init__(daemon=True)
        self.kube = kube
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.selector = f"{LABEL_SERVICE} in ({','.join(services)})"
        self.events: queue.Queue[tuple[float, str, Any]] = queue.Queue()
        self.listed = threading.Event()

    def run(self) -> None:
        for arrival, kind, obj in self.kube.follow(self.path, log=log, labelSelector=self.selector):
            if kind == "LISTED":
                self.events.put((arrival, "RESET", obj))
                self.listed.set()
            else:
                self.events.put((arrival, kind, obj))


class Side:
    def __init__(self, label: str, service: str, managed_by: str) -> None:
        self.label, self.service, self.managed_by = label, service, managed_by


class View:
    """The EndpointSlices as the watch has delivered them so far."""

    def __init__(self) -> None:
        self.slices: dict[str, dict[str, Any]] = {}

    def apply(self, kind: str, obj: Any) -> None:
        if kind == "RESET":
            self.slices = {item["metadata"]["name"]: item for item in obj}
        elif kind == "DELETED":
            self.slices.pop(obj["metadata"]["name"], None)
        else:
            self.slices[obj["metadata"]["name"]] = obj

    def state(self, side: Side, ip: str) -> str:
        """ready, not-ready or absent: the address as the side's slices publish it."""
        found = "absent"
        for item in self.slices.values():
            labels = item["metadata"].get("labels") or {}
            if labels.get(LABEL_SERVICE) != side.service or labels.get(LABEL_MANAGED_BY) != side.managed_by:
                continue
            for endpoint in item.get("endpoints") or []:
                if ip in endpoint.get("addresses", []):
                    if (endpoint.get("conditions") or {}).get("ready") is not False:
                        return "ready"
                    found = "not-ready"
        return found


class Race:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kube = Kube(args.kubeconfig, args.context)
        self.sides = [
            Side("beacon", args.beacon_service, BEACON_MANAGED_BY),
            Side("kcm", args.kcm_service, KCM_MANAGED_BY),
        ]
        self.view = View()
        self.watcher = SliceWatcher(self.kube, args.namespace, [s.service for s in self.sides])
        pod = self.kube.get(f"/api/v1/namespaces/{args.namespace}/pods/{args.pod}")
        self.ip: str = pod["status"]["podIP"]

    def drain(self) -> None:
        while True:
            try:
                _, kind, obj = self.watcher.events.get_nowait()
            except queue.Empty:
                return
            self.view.apply(kind, obj)

    def observe(self, want_ready: bool, timeout: float) -> dict[str, float]:
        """Arrival time of the first event after which each side shows the address ready (or not)."""
        got: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.sides):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                arrival, kind, obj = self.watcher.events.get(timeout=remaining)
            except queue.Empty:
                break
            self.view.apply(kind, obj)
            for side in self.sides:
                if side.label not in got and (self.view.state(side, self.ip) == "ready") == want_ready:
                    got[side.label] = arrival
        return got

    def wait_all_ready(self, what: str) -> None:
        self.drain()
        pending = [s for s in self.sides if self.view.state(s, self.ip) != "ready"]
        if not pending:
            return
        got = self.observe(True, self.args.timeout)
        missing = [s.label for s in pending if s.label not in got]
        if missing:
            self.fail(f"{what}: {', '.join(missing)} never showed {self.ip} ready within {self.args.timeout:.0f}s")

    def exec(self, *command: str) -> tuple[float, float]:
        """Run a command in the pod; (monotonic before, monotonic after it returned)."""
        argv = [self.args.kubectl, "--kubeconfig", self.args.kubeconfig]
        if self.args.context:
            argv += ["--context", self.args.context]
        argv += ["-n", self.args.namespace, "exec", self.args.pod, "--", *command]
        before = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return before, time.monotonic()

    def fail(self, msg: str) -> None:
        log(f"FAILED: {msg}")
        for side in self.sides:
            log(f"  {side.label}: {self.ip} is {self.view.state(side, self.ip)}")
        sys.exit(1)

    def run(self) -> None:
        a = self.args
        self.watcher.start()
        if not self.watcher.listed.wait(a.timeout):
            self.fail("could not list the EndpointSlices")
        log(
            f"pod {a.pod} ({self.ip}); beacon: EndpointSlices of Service {a.beacon_service} "
            f"({LABEL_MANAGED_BY}={BEACON_MANAGED_BY}); kcm: Service {a.kcm_service} ({KCM_MANAGED_BY})"
        )
        self.wait_all_ready("before the first run")
        rows: list[dict[str, float]] = []
        for run in range(1, a.runs + 1):
            time.sleep(random.uniform(0, a.interval))  # noqa: S311 - a random phase, not a secret
            self.wait_all_ready(f"run {run}: before the break")
            before, t0 = self.exec("rm", "-f", a.path)
            down = self.observe(False, a.timeout)
            missing = [s.label for s in self.sides if s.label not in down]
            if missing:
                self.fail(f"run {run}: {', '.join(missing)} never showed {self.ip} not ready within {a.timeout:.0f}s")
            _, t1 = self.exec("touch", a.path)
            up = self.observe(True, a.timeout)
            missing = [s.label for s in self.sides if s.label not in up]
            if missing:
                self.fail(f"run {run}: {', '.join(missing)} never showed {self.ip} ready again within {a.timeout:.0f}s")
            row = {
                "beacon": down["beacon"] - t0,
                "kcm": down["kcm"] - t0,
                "exec": t0 - before,
                "beacon_up": up["beacon"] - t1,
                "kcm_up": up["kcm"] - t1,
            }
            rows.append(row)
            log(
                f"run {run}: not ready after beacon {row['beacon']:6.2f}s  kcm {row['kcm']:6.2f}s"
                f"  (exec {row['exec']:.2f}s)   ready again after beacon {row['beacon_up']:5.2f}s"
                f"  kcm {row['kcm_up']:5.2f}s"
            )
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        ratio = med["beacon"] / med["kcm"] if med["kcm"] > 0 else float("nan")
        log(f"{'':8}{'beacon':>10}{'kcm':>10}")
        for r_i, r in enumerate(rows, 1):
            log(f"run {r_i:<4}{r['beacon']:9.2f}s{r['kcm']:9.2f}s")
        log(f"{'median':8}{med['beacon']:9.2f}s{med['kcm']:9.2f}s   ratio beacon/kcm {ratio:.2f}")
        log(f"{'recovery':8}{med['beacon_up']:9.2f}s{med['kcm_up']:9.2f}s   (median, after the health file is back)")
        if a.summary_file:
            with open(a.summary_file, "w", encoding="utf-8") as f:
                f.write(
                    f"median not ready after beacon {med['beacon']:.2f}s, kcm {med['kcm']:.2f}s"
                    f" (ratio beacon/kcm {ratio:.2f}); runs beacon "
                    + " ".join(f"{r['beacon']:.2f}" for r in rows)
                    + ", kcm "
                    + " ".join(f"{r['kcm']:.2f}" for r in rows)
                    + "\n"
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--context")
    p.add_argument("--kubectl", default="kubectl")
    p.add_argument("--namespace", required=True)
    p.add_argument("--pod", required=True, help="the pod whose health endpoint is broken")
    p.add_argument("--path", default="/srv/healthz", help="the file in the pod that the health endpoint serves")
    p.add_argument("--beacon-service", required=True, help="the ServiceEntry's name (= its Service's)")
    p.add_argument("--kcm-service", required=True, help="the ordinary Service with a selector")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--interval", type=float, default=2.0, help="probe interval: the random phase before a break")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--summary-file")
    Race(p.parse_args()).run()


if __name__ == "__main__":
    main()
