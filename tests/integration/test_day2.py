"""Day 2 on the real control plane: the `kubectl beacon` plugin, endpoint drain end to end, and JSON logs.

Why it exists: the plugin is only as good as what it reads from the objects beacon publishes, and drain is only
done when clients see it: CoreDNS's answer, the registry, the EndpointSlice conditions a load balancer reads. So
every subcommand runs here as a user runs it (a subprocess with the cluster's kubeconfig, once through kubectl's
own plugin mechanism) against entries the session's operator really probes, and its output is asserted. Outputs
are printed (`pytest -s`): the README's "Day 2" section shows them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    Audit,
    OperatorProcess,
    SliceWatch,
    apply,
    config_entry,
    create_pods,
    eventually,
    get_json,
    http_service_entry,
)

pytestmark = [pytest.mark.integration, pytest.mark.netns]

VENV_BIN = Path(sys.executable).parent  # `make deps` puts the plugin's entry point here
PLUGIN = VENV_BIN / "kubectl-beacon"
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def beacon(cluster: DevCluster) -> Run:
    """Run `kubectl-beacon ARGS` as a user would: the cluster's (admin) kubeconfig in KUBECONFIG."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(PLUGIN), *args], env=env, capture_output=True, text=True, timeout=60, check=False)
        print(f"\n$ kubectl beacon {' '.join(args)}\n{proc.stdout}{proc.stderr}", end="")
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl beacon {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    return run


def entry(name: str, namespace: str, addresses: list[str], *, interval: int = 2, **check: Any) -> dict[str, Any]:
    body = http_service_entry(name, namespace, addresses, interval=interval, threshold=2)
    body["spec"]["endpoints"] = [{"address": a, "zone": f"zone-{i}"} for i, a in enumerate(addresses)]
    body["spec"]["healthCheck"].update(check)
    return body


def status(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = (get_json(cluster, "serviceentry", "-n", namespace, name) or {}).get("status") or {}
    return found


def ready_reason(cluster: DevCluster, namespace: str, name: str) -> str | None:
    ready = [c for c in status(cluster, namespace, name).get("conditions") or [] if c["type"] == "Ready"]
    return ready[0]["reason"] if ready else None


def slice_conditions(cluster: DevCluster, namespace: str, name: str) -> dict[str, dict[str, bool]]:
    data = get_json(cluster, "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={name}") or {}
    return {
        address: ep["conditions"]
        for item in data.get("items", [])
        for ep in item.get("endpoints") or []
        for address in ep["addresses"]
    }


def registry_healthy(cluster: DevCluster, namespace: str, name: str) -> set[str] | None:
    cm = get_json(cluster, "configmap", "-n", namespace, "beacon-registry")
    if cm is None:
        return None
    services = json.loads(cm["data"]["registry.json"])["services"]
    return {e["address"] for e in services[name]["endpoints"]} if name in services else None


def rows(output: str) -> dict[str, list[str]]:
    """A table's rows by their first column (the columns' values hold no blanks)."""
    return {line.split()[0]: line.split() for line in output.splitlines()[1:] if line.strip()}


READY = {"ready": True, "serving": True, "terminating": False}
DRAINED = {"ready": False, "serving": True, "terminating": True}


# ---------------------------------------------------------------------------------------------------- status
def test_status_shows_each_endpoint_with_the_probe_that_decided_it(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, beacon: Run
) -> None:
    good, bad = net.add_hosts(2)
    good.http(port=8080, path="/healthz")
    bad.http(port=8080, path="/healthz").set_status(503)
    apply(cluster, entry("payments", namespace, [good.address, bad.address]))

    def states() -> dict[str, str]:
        return {e["address"]: e["state"] for e in status(cluster, namespace, "payments").get("endpoints") or []}

    settled = {good.address: "Healthy", bad.address: "Unhealthy"}
    eventually(lambda: states() == settled, timeout=20, what="one endpoint healthy, the other unhealthy")

    table = beacon("status", "-n", namespace, "payments").stdout
    header, *_ = table.splitlines()
    assert header == f"{namespace}/payments   READY 1/2   Degraded: 1 of 2 endpoints are healthy"
    assert table.splitlines()[1].split() == [
        "ADDRESS", "ZONE", "STATE", "CHECK", "SINCE", "PROBE", "LATENCY", "CONSECUTIVE"
    ]  # fmt: skip
    by_address = rows("\n".join(table.splitlines()[1:]))
    healthy, unhealthy = by_address[good.address], by_address[bad.address]
    assert healthy[1:5] == ["zone-0", "Healthy", "passing", healthy[4]]
    assert healthy[5:7] == ["HTTP", "200"]
    assert healthy[7].endswith("ms")
    assert healthy[8] == "1"  # healthyThreshold 1: one pass made it healthy
    assert unhealthy[1:4] == ["zone-1", "Unhealthy", "critical"]
    assert unhealthy[5:7] == ["HTTP", "503"]
    assert unhealthy[-1] == "2"  # unhealthyThreshold 2: two failures in a row decided it

    as_json = json.loads(beacon("status", "-n", namespace, "payments", "-o", "json").stdout)
    (only,) = as_json
    assert (only["name"], only["ready"], only["reason"]) == ("payments", "1/2", "Degraded")
    endpoints = {e["address"]: e for e in only["endpoints"]}
    assert endpoints[good.address]["probe"] == "HTTP 200"
    assert endpoints[good.address]["latencyMs"] > 0
    assert endpoints[good.address]["conditions"] == READY
    assert endpoints[bad.address]["consecutive"] == 2
    assert endpoints[bad.address]["probe"].startswith("HTTP 503")

    # through kubectl itself: any kubectl-<name> on PATH is `kubectl <name>`
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    via_kubectl = subprocess.run(
        [cluster.kubectl_path, "beacon", "status", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert via_kubectl.stdout.splitlines()[0] == header
    missing = beacon("status", "-n", namespace, "nothing-here", check=False)
    assert missing.returncode == 1
    assert f"serviceentry {namespace}/nothing-here not found" in missing.stderr


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_prints_the_catalog_as_a_table_and_as_json(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, beacon: Run
) -> None:
    a, b, c = net.add_hosts(3)
    for host in (a, b, c):
        host.http(port=8080, path="/healthz")
    payments = entry("payments", namespace, [a.address, b.address])
    payments["metadata"]["labels"] = {"team": "pay"}
    apply(cluster, payments)
    apply(cluster, entry("ledger", namespace, [c.address]))
    eventually(lambda: registry_healthy(cluster, namespace, "payments") == {a.address, b.address}, timeout=20)
    eventually(lambda: registry_healthy(cluster, namespace, "ledger") == {c.address}, timeout=20)

    table = beacon("registry", "-n", namespace).stdout
    lines = table.splitlines()
    assert lines[0].startswith(f"registry {namespace}   revision ")
    assert lines[1].split() == ["SERVICE", "READY", "DNS", "PORTS", "HEALTHY", "ENDPOINTS", "TAGS"]
    by_service = rows("\n".join(lines[1:]))
    assert by_service["ledger"] == [
        "ledger",
        "1/1",
        f"ledger.{namespace}.svc",
        "http:8080/TCP",
        f"{c.address}@zone-0",
        "-",
    ]
    assert by_service["payments"] == [
        "payments",
        "2/2",
        f"payments.{namespace}.svc",
        "http:8080/TCP",
        f"{a.address}@zone-0,{b.address}@zone-1",
        "team=pay",
    ]
    document = json.loads(beacon("registry", "-n", namespace, "-o", "json").stdout)
    cm = get_json(cluster, "configmap", "-n", namespace, "beacon-registry")
    published = json.loads(cm["data"]["registry.json"])
    assert document["services"] == published["services"]
    assert (document["namespace"], document["revision"]) == (namespace, published["revision"])
    empty = beacon("registry", "-n", "default", check=False)
    assert empty.returncode == 1
    assert "no beacon registry in namespace default" in empty.stderr


# ---------------------------------------------------------------------------------------------------- config
def test_config_history_diff_and_rollback(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess, beacon: Run
) -> None:
    def revision() -> int | None:
        found = get_json(cluster, "configentry", "-n", namespace, "payments") or {}
        return (found.get("status") or {}).get("currentRevision")

    def config_map() -> dict[str, str]:
        return dict((get_json(cluster, "configmap", "-n", namespace, "payments") or {}).get("data") or {})

    versions = [
        {"db/pool/size": "10"},
        {"db/pool/size": "25", "upstream/ledger/url": "http://ledger:8080"},
        {"db/pool/size": "30", "upstream/ledger/url": "http://ledger:8080"},
    ]
    for number, data in enumerate(versions, start=1):
        apply(cluster, config_entry("payments", namespace, data))
        eventually(lambda number=number: revision() == number, timeout=20, what=f"revision {number}")

    history = beacon("config", "history", "-n", namespace, "payments").stdout.splitlines()
    assert history[0] == f"configentry {namespace}/payments   current revision 3   ConfigMap payments"
    assert history[1].split() == ["REVISION", "CURRENT", "HASH", "KEYS", "AGE", "NOTE"]
    listed = [line.split() for line in history[2:]]
    assert [(r[0], r[-1]) for r in listed] == [("1", "-"), ("2", "-"), ("3", "-")]
    assert listed[2][1] == "*"
    assert [r[-3] for r in listed] == ["1", "2", "2"]  # keys per revision

    assert beacon("config", "diff", "-n", namespace, "payments").stdout.splitlines() == [
        "--- revision 2",
        "+++ revision 3 (current)",
        "@@ -1,2 +1,2 @@",
        "-db/pool/size: 25",
        "+db/pool/size: 30",
        " upstream/ledger/url: http://ledger:8080",
    ]
    assert "-db/pool/size: 10" in beacon("config", "diff", "-n", namespace, "payments", "1").stdout

    refused = beacon("config", "rollback", "-n", namespace, "payments", "9", check=False)
    assert refused.returncode == 1
    assert "revision 9 is not in the history (kept revisions: 1, 2, 3)" in refused.stderr
    done = beacon("config", "rollback", "-n", namespace, "payments").stdout  # default: the one before the current
    assert "spec.rollbackTo=2" in done
    spec = (get_json(cluster, "configentry", "-n", namespace, "payments") or {})["spec"]
    assert spec["rollbackTo"] == 2
    eventually(lambda: revision() == 4, timeout=20, what="the rollback recorded as revision 4")
    assert config_map() == {"db.pool.size": "25", "upstream.ledger.url": "http://ledger:8080"}
    history = beacon("config", "history", "-n", namespace, "payments").stdout
    assert " ".join(rows(history)["2"]).endswith("pinned by spec.rollbackTo")
    assert rows(history)["4"][1] == "*"
    assert history.rstrip().endswith("rollback of 2")

    beacon("config", "rollback", "-n", namespace, "payments", "--clear")
    assert "rollbackTo" not in (get_json(cluster, "configentry", "-n", namespace, "payments") or {})["spec"]
    eventually(lambda: revision() == 5, timeout=20, what="back to spec.data as revision 5")
    assert config_map() == {"db.pool.size": "30", "upstream.ledger.url": "http://ledger:8080"}


# ---------------------------------------------------------------------------------------------------- drain
def test_a_drained_static_endpoint_leaves_dns_and_the_registry_and_comes_back_without_a_probe(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    resolve: Callable[[str], set[str]],
    beacon: Run,
) -> None:
    """Both servers stay healthy throughout. Probes come every 10 s (+-10%) and connection-loss hints are off, so
    the probe log shows exactly when the drained endpoint was probed: it still is, and its undrain is published
    right after a probe, seconds before the next one could come."""
    a, b = net.add_hosts(2)
    for host in (a, b):
        host.http(port=8080, path="/healthz")
    apply(cluster, entry("payments", namespace, [a.address, b.address], interval=10, connectionLossHints=False))
    fqdn = f"payments.{namespace}.svc.cluster.local"
    eventually(lambda: resolve(fqdn) == {a.address, b.address}, timeout=20, what="DNS answers both")

    with SliceWatch(cluster) as watch:
        drained_at = time.monotonic()
        out = beacon("drain", "-n", namespace, "payments", a.address, "--wait").stdout
        assert f"endpoint {a.address} of {namespace}/payments drained (annotation beacon.dev/drain on the entry)" in out
        assert f"published: {a.address} not ready, serving, terminating=True" in out
        assert slice_conditions(cluster, namespace, "payments") == {a.address: DRAINED, b.address: READY}
        eventually(lambda: resolve(fqdn) == {b.address}, timeout=10, what="DNS answers the other endpoint only")
        eventually(lambda: registry_healthy(cluster, namespace, "payments") == {b.address}, timeout=5)
        annotations = (get_json(cluster, "serviceentry", "-n", namespace, "payments") or {})["metadata"]["annotations"]
        assert annotations["beacon.dev/drain"] == a.address
        assert ready_reason(cluster, namespace, "payments") == "Draining"
        table = beacon("status", "-n", namespace, "payments").stdout
        assert table.splitlines()[0].endswith(f"Draining: 1 of 2 endpoints are healthy; draining: {a.address}")
        assert rows("\n".join(table.splitlines()[1:]))[a.address][2:4] == ["Draining", "passing"]

        # still probed while drained: wait for its next probe, then undrain at once
        probed = eventually(
            lambda: [t for t, address, _ in net.probe_log(since=drained_at) if address == a.address],
            timeout=15,
            what="a probe of the drained endpoint",
        )
        undrained_at = time.monotonic()
        beacon("undrain", "-n", namespace, "payments", a.address, "--wait")
        back = eventually(
            lambda: next((t for t, ready in watch.changes(namespace, a.address, since=undrained_at) if ready), None),
            timeout=10,
            what="the undrained endpoint published ready",
        )
    print(f"\n[day2] undrain -> ready in the slice watch: {back - undrained_at:.3f}s")
    assert back - probed[-1] < 8, "published ready long after the probe before the undrain"
    between = [t for t, address, _ in net.probe_log(since=undrained_at) if address == a.address and t <= back]
    assert between == [], "the undrain waited for a probe"
    assert slice_conditions(cluster, namespace, "payments") == {a.address: READY, b.address: READY}
    eventually(lambda: resolve(fqdn) == {a.address, b.address}, timeout=10, what="DNS answers both again")
    eventually(lambda: registry_healthy(cluster, namespace, "payments") == {a.address, b.address}, timeout=5)
    meta = (get_json(cluster, "serviceentry", "-n", namespace, "payments") or {})["metadata"]
    assert "beacon.dev/drain" not in (meta.get("annotations") or {})
    assert ready_reason(cluster, namespace, "payments") == "Healthy"


def test_a_drained_pod_endpoint_is_drained_by_its_pod_annotation(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, beacon: Run
) -> None:
    h1, h2 = net.add_hosts(2)
    for host in (h1, h2):
        host.http(port=8080, path="/healthz")
    eventually(lambda: get_json(cluster, "serviceaccount", "-n", namespace, "default"), timeout=30, what="default SA")
    create_pods(cluster, namespace, {"web-1": h1.address, "web-2": h2.address}, labels={"app": "web"})
    body = entry("web", namespace, [])
    del body["spec"]["endpoints"]
    body["spec"]["selector"] = {"matchLabels": {"app": "web"}}
    apply(cluster, body)
    eventually(lambda: slice_conditions(cluster, namespace, "web") == {h1.address: READY, h2.address: READY})

    out = beacon("drain", "-n", namespace, "web", h1.address, "--wait").stdout
    assert "(annotation beacon.dev/drain on pod web-1, for every entry that selects it)" in out
    pod = get_json(cluster, "pod", "-n", namespace, "web-1")
    assert pod["metadata"]["annotations"]["beacon.dev/drain"] == "true"
    assert slice_conditions(cluster, namespace, "web") == {h1.address: DRAINED, h2.address: READY}
    eventually(lambda: registry_healthy(cluster, namespace, "web") == {h2.address}, timeout=5)
    status_rows = rows("\n".join(beacon("status", "-n", namespace, "web").stdout.splitlines()[1:]))
    assert status_rows[h1.address][1:4] == ["-", "web-1", "Draining"]

    beacon("undrain", "-n", namespace, "web", h1.address, "--wait")
    assert "beacon.dev/drain" not in (
        get_json(cluster, "pod", "-n", namespace, "web-1")["metadata"].get("annotations") or {}
    )
    assert slice_conditions(cluster, namespace, "web") == {h1.address: READY, h2.address: READY}
    unknown = beacon("drain", "-n", namespace, "web", "198.18.255.254", check=False)
    assert unknown.returncode == 1
    assert "198.18.255.254 is neither a static endpoint" in unknown.stderr


def test_the_richer_status_and_a_drain_cost_no_write_in_steady_state_nor_after_a_restart(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    """The per-endpoint status (since, the deciding probe's detail and latency) changes only at a transition, so
    probes every 2 s, a drained endpoint among them, and a restart of the operator (its health seeded from the
    slices, its status items from what it published) write nothing at all."""
    hosts = net.add_hosts(3)
    for host in hosts:
        host.http(port=8080, path="/healthz")
    addresses = [h.address for h in hosts]
    body = entry("steady", namespace, addresses)
    body["metadata"]["annotations"] = {"beacon.dev/drain": addresses[0]}
    apply(cluster, body)
    want = {addresses[0]: DRAINED, addresses[1]: READY, addresses[2]: READY}
    eventually(lambda: slice_conditions(cluster, namespace, "steady") == want, timeout=20)
    eventually(lambda: registry_healthy(cluster, namespace, "steady") == set(addresses[1:]), timeout=10)
    time.sleep(1)  # the last coalesced writes
    published = status(cluster, namespace, "steady")
    start = time.time()
    time.sleep(6)  # three probes of each endpoint
    assert audit.writes(since=start, namespace=namespace) == [], "probes that decide nothing wrote something"
    restart = time.time()
    operator_running.restart()
    time.sleep(6)  # past the restarted operator's first probe of every endpoint
    writes = [(w["verb"], w["objectRef"]["resource"]) for w in audit.writes(since=restart, namespace=namespace)]
    assert writes == [], "a restart with unchanged health and drains writes nothing"
    assert status(cluster, namespace, "steady")["endpoints"] == published["endpoints"]
    assert slice_conditions(cluster, namespace, "steady") == want


# ---------------------------------------------------------------------------------------------------- JSON logs
def test_json_logs_are_one_object_per_line_with_the_entry_fields(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Path,
    tmp_path: Path,
    beacon: Run,
) -> None:
    """An operator of its own with `--log-format json -v` (the session's is stopped; the next test that needs it
    starts it again): every line it writes parses as JSON, and its transition, drain, write and error lines name
    their namespace, entry and endpoint."""
    beacon_operator.stop()
    op = OperatorProcess(
        cluster=cluster,
        kubeconfig=operator_kubeconfig,
        log_dir=tmp_path,
        extra_args=("--resync-seconds=0", "--log-format=json", "-v"),
    )
    op.start()
    try:
        stays, goes = net.add_hosts(2)
        stays.http(port=8080, path="/healthz")
        server = goes.http(port=8080, path="/healthz")
        apply(cluster, entry("payments", namespace, [stays.address, goes.address]))
        eventually(lambda: status(cluster, namespace, "payments").get("readySummary") == "2/2", timeout=20)
        server.stop()
        eventually(lambda: status(cluster, namespace, "payments").get("readySummary") == "1/2", timeout=20)
        beacon("drain", "-n", namespace, "payments", stays.address, "--wait")
        theirs = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "clash-ipv4-0", "namespace": namespace},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [stays.address]}],
        }
        apply(cluster, theirs)
        apply(cluster, entry("clash", namespace, [stays.address]))
        eventually(lambda: ready_reason(cluster, namespace, "clash") == "OutputConflict", timeout=20)
    finally:
        op.stop()
    lines = op.log_path.read_text().splitlines()
    assert len(lines) > 20
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number} of the operator's log is not JSON: {line!r}") from None
    assert all({"message", "severity", "timestamp", "logger"} <= set(p) for p in parsed)
    mine = [p for p in parsed if p.get("namespace") == namespace]

    def one(**wanted: Any) -> dict[str, Any]:
        found = [p for p in mine if all(p.get(k) == v for k, v in wanted.items())]
        assert found, f"no line with {wanted} among {[m.get('message') for m in mine]}"
        return found[0]

    down = one(event="transition", entry="payments", endpoint=goes.address, to="critical")
    assert down["severity"] == "info"
    assert down["logger"] == "beacon.discovery"
    assert f"endpoint {goes.address}: passing -> critical" in down["message"]
    first = one(event="transition", entry="payments", to="passing")
    assert set(first["endpoint"].split(",")) == {stays.address, goes.address}
    drained = one(event="drain", entry="payments", endpoint=stays.address)
    assert drained["draining"] is True
    wrote = one(event="write", entry="payments", endpoint=goes.address)
    assert "EndpointSlice payments-ipv4-0" in wrote["objects"]
    error = one(event="error", entry="clash", logger="beacon.discovery")
    assert error["severity"] == "error"
    assert "not managed by beacon" in error["message"]
    assert error["endpoint"] is None
    print(f"\n[day2] {len(parsed)} JSON lines; a transition line:\n{json.dumps(down)}")
