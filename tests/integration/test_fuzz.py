"""Hypothesis-generated ServiceEntry and ConfigEntry bodies against the real apiserver and the running operator.

Each body is either rejected by the apiserver with a clear message (schema or CEL), or accepted and then handled
by the operator: its status reaches the body's generation. The operator never crashes, and once every entry is
deleted no reconcile is left retrying. `BEACON_FUZZ_EXAMPLES` sets the number of bodies per kind (default 600,
so CI sends at least 1,200).

Endpoint addresses are drawn only from this test's own test hosts, from ranges the probe policy refuses without
sending anything (loopback, link-local), or from strings the schema rejects: the fuzzer never makes the operator
send traffic anywhere but this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import OperatorProcess, eventually, stop_probing

pytestmark = [pytest.mark.integration, pytest.mark.netns, pytest.mark.faults]

EXAMPLES = int(os.environ.get("BEACON_FUZZ_EXAMPLES", "600"))
GROUP, VERSION = "beacon.dev", "v1alpha1"


@pytest.fixture(scope="module")
def api(cluster: DevCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(cluster.kubeconfig)))


@pytest.fixture(scope="module")
def fuzz_net(cluster: DevCluster, beacon_operator: OperatorProcess) -> Iterator[TestNetwork]:
    with TestNetwork() as network:
        hosts = network.add_hosts(24)
        for host in hosts[:12]:
            host.http(port=8080, path="/healthz")
            host.tcp(port=9000)
            host.grpc(port=50051)
        yield network
        stop_probing(cluster, beacon_operator)


Doc = dict[str, Any]


@st.composite
def service_entry(draw: st.DrawFn, hosts: list[str]) -> Doc:
    """A valid ServiceEntry, then none, one or two mutations that may break it."""
    name = draw(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z"))
    spec: Doc = {"ports": [{"name": "http", "port": draw(st.sampled_from([8080, 9000, 50051]))}]}
    chosen = draw(st.lists(st.sampled_from(hosts), min_size=1, max_size=4, unique=True))
    spec["endpoints"] = [{"address": a} for a in chosen]
    if draw(st.booleans()):
        spec["endpoints"][0]["zone"] = draw(st.sampled_from(["a", "b"]))
    if draw(st.booleans()):
        spec["selector"] = {"matchLabels": {"app": draw(st.sampled_from(["web", "db"]))}}
    if draw(st.integers(0, 4)):
        interval = draw(st.integers(2, 30))
        kind = draw(st.sampled_from(["http", "tcp", "grpc", "lease"]))
        check: Doc = {
            "http": {"path": "/healthz", "port": "http"},
            "tcp": {"port": 9000},
            "grpc": {"port": 50051, "service": draw(st.sampled_from(["", "svc"]))},
            "lease": {},
        }[kind]
        spec["healthCheck"] = {
            kind: check,
            "intervalSeconds": interval,
            "timeoutSeconds": draw(st.integers(1, interval - 1)),
            "healthyThreshold": draw(st.integers(1, 5)),
            "unhealthyThreshold": draw(st.integers(1, 5)),
        }
    if draw(st.booleans()):
        spec["headless"] = draw(st.booleans())
    for mutate in draw(st.lists(st.sampled_from(SE_MUTATIONS), max_size=2)):
        _apply(mutate, spec, draw)
    return {"name": draw(st.sampled_from([name, name, name, "Bad_Name", "x" * 70])), "spec": spec}


def _apply(mutate: Any, spec: Doc, draw: st.DrawFn) -> None:
    """Apply a mutation; one that no longer fits (an earlier one removed what it changes) is skipped."""
    with contextlib.suppress(KeyError, IndexError):
        mutate(spec, draw)


def _hc(spec: Doc) -> Doc:
    hc: Doc = spec.setdefault("healthCheck", {"tcp": {"port": 9000}, "intervalSeconds": 5, "timeoutSeconds": 1})
    return hc


SE_MUTATIONS: list[Any] = [
    lambda s, d: s.pop("ports"),
    lambda s, d: s["ports"].append({"name": "http", "port": 1}),
    lambda s, d: s["ports"].__setitem__(0, {"name": "http", "port": d(st.sampled_from([0, -1, 65536]))}),
    lambda s, d: s["ports"].__setitem__(0, {"name": "Bad Name", "port": 80}),
    lambda s, d: s["ports"][0].__setitem__("protocol", "ICMP"),
    lambda s, d: s["endpoints"][0].__setitem__(
        "address", d(st.sampled_from(["127.0.0.1", "169.254.169.254", "::1", "fe80::1"]))
    ),
    lambda s, d: s["endpoints"][0].__setitem__(
        "address", d(st.sampled_from(["198.018.0.1", "999.1.1.1", "Not_A_Name", "2001:DB8::1", "", "a b"]))
    ),
    lambda s, d: s["endpoints"].append(dict(s["endpoints"][0])),
    lambda s, d: s["endpoints"][0].__setitem__("zone", "bad zone"),
    lambda s, d: s["endpoints"][0].__setitem__("labels", {"bad key!": "v"}),
    lambda s, d: s["endpoints"][0].__setitem__("ports", [{"name": "nope", "port": 1}]),
    lambda s, d: (s.pop("endpoints"), s.pop("selector", None)),
    lambda s, d: s.__setitem__("selector", {"matchLabels": {}}),
    lambda s, d: _hc(s).update({"http": {"path": "/"}, "tcp": {"port": 1}}),
    lambda s, d: _hc(s).__setitem__("healthyThreshold", d(st.integers(-1, 0))),
    lambda s, d: _hc(s).__setitem__("unhealthyThreshold", d(st.sampled_from([0, 101]))),
    lambda s, d: _hc(s).update({"intervalSeconds": 5, "timeoutSeconds": d(st.integers(5, 10))}),
    lambda s, d: _hc(s).__setitem__("intervalSeconds", d(st.sampled_from([0, 1, 3601]))),
    lambda s, d: _hc(s).update({"http": {"path": d(st.sampled_from(["healthz", "/a b"]))}}),
    lambda s, d: _hc(s).update({"http": {"path": "/", "scheme": "FTP"}}),
    lambda s, d: _hc(s).update({"http": {"port": "nosuchport"}}),
    lambda s, d: _hc(s).update({"lease": {"namePrefix": "Bad_"}}),
    lambda s, d: _hc(s).__setitem__("deregisterAfterSeconds", d(st.integers(-1, 30))),
    lambda s, d: s.__setitem__("unknownField", "surprise"),
    lambda s, d: s.__setitem__("headless", "yes"),
]


@st.composite
def config_entry(draw: st.DrawFn) -> Doc:
    """A valid ConfigEntry, then none, one or two mutations that may break it."""
    key = st.from_regex(r"\A[a-z][a-z0-9_-]{0,8}(/[a-z][a-z0-9_-]{0,8}){0,3}\Z")
    value = st.text(alphabet=string.printable, max_size=40)
    spec: Doc = {"data": draw(st.dictionaries(key, value, min_size=1, max_size=6))}
    if draw(st.booleans()):
        spec["service"] = draw(st.sampled_from(["payments", "cart"]))
    if draw(st.booleans()):
        spec["priority"] = draw(st.integers(-100, 100))
    if draw(st.booleans()):
        spec["target"] = draw(st.from_regex(r"\Acfg-[a-z]{1,6}\Z"))
    if draw(st.booleans()):
        spec["revisionHistoryLimit"] = draw(st.integers(1, 20))
    for mutate in draw(st.lists(st.sampled_from(CE_MUTATIONS), max_size=2)):
        _apply(mutate, spec, draw)
    name = draw(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z"))
    return {"name": draw(st.sampled_from([name, name, name, "Bad_Name"])), "spec": spec}


CE_MUTATIONS: list[Any] = [
    lambda s, d: s["data"].__setitem__(d(st.sampled_from(["a.b", "/lead", "trail/", "sp ace", "x//y", ""])), "v"),
    lambda s, d: s["data"].__setitem__("big", "v" * d(st.sampled_from([65_537, 70_000]))),
    lambda s, d: s.__setitem__("data", {}),
    lambda s, d: s.pop("data"),
    lambda s, d: s.__setitem__("priority", d(st.sampled_from([-1_000_001, 1_000_001]))),
    lambda s, d: s.__setitem__("service", "Bad_Service"),
    lambda s, d: s.__setitem__("target", "Bad_Target"),
    lambda s, d: s.__setitem__("revisionHistoryLimit", d(st.sampled_from([0, 101]))),
    lambda s, d: s.__setitem__("rollbackTo", d(st.integers(-1, 0))),
    lambda s, d: s.__setitem__("rollbackTo", d(st.integers(1, 9))),  # valid syntax; may name no revision
    lambda s, d: s["data"].__setitem__("n", 5),
    lambda s, d: s.__setitem__("unknownField", True),
]


def _submit(api: client.CustomObjectsApi, namespace: str, plural: str, kind: str, doc: dict[str, Any]) -> str | None:
    """Create the object; return its name if accepted. A rejection must carry a clear message."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": doc["name"] or "x"},
        "spec": doc["spec"],
    }
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    except ApiException as exc:
        rejected = exc
    else:
        name: str = created["metadata"]["name"]
        return name
    if rejected.status == 409:  # the same generated name twice: not a finding
        return None
    assert rejected.status in (400, 422), f"unexpected status {rejected.status}: {rejected.body}"
    message = json.loads(rejected.body).get("message", "")
    assert len(message) > 10, f"rejection without a clear message: {rejected.body}"
    return None


def _handled(api: client.CustomObjectsApi, namespace: str, plural: str, names_: list[str]) -> list[str]:
    """Entries whose status does not yet reflect their current generation."""
    items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
    return [
        i["metadata"]["name"]
        for i in items
        if i["metadata"]["name"] in names_
        and (i.get("status") or {}).get("observedGeneration") != i["metadata"]["generation"]
    ]


@pytest.mark.parametrize("kind", ["ServiceEntry", "ConfigEntry"])
def test_generated_bodies_are_rejected_clearly_or_handled(
    kind: str,
    cluster: DevCluster,
    namespace: str,
    api: client.CustomObjectsApi,
    fuzz_net: TestNetwork,
    operator_running: OperatorProcess,
) -> None:
    plural = "serviceentries" if kind == "ServiceEntry" else "configentries"
    hosts = [h.address for h in fuzz_net.hosts]
    strategy = service_entry(hosts) if kind == "ServiceEntry" else config_entry()
    accepted: list[str] = []
    tried = 0
    log_start = len(operator_running.logs())

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(doc=strategy)
    def submit(doc: dict[str, Any]) -> None:
        nonlocal tried
        tried += 1
        name = _submit(api, namespace, plural, kind, doc)
        if name is not None:
            accepted.append(name)

    submit()
    assert tried >= EXAMPLES * 0.9
    print(f"\n[fuzz] {kind}: {tried} bodies, {len(accepted)} accepted, {tried - len(accepted)} rejected")
    assert accepted, "the generator should produce some valid bodies"
    eventually(
        lambda: not _handled(api, namespace, plural, accepted),
        timeout=180,
        interval=1,
        what=f"every accepted {kind} handled (status.observedGeneration == generation)",
    )
    assert operator_running.proc is not None
    assert operator_running.proc.poll() is None, "the operator crashed"

    cluster.kubectl("delete", plural, "--all", "-n", namespace, "--wait=true", "--timeout=120s")
    # nothing retries forever: once the deletions settle, a window longer than the maximum retry backoff (10 s)
    # passes with no retry for this namespace (every retry of a key logs "<kind> <key> failed, retrying"). The
    # operator's cluster-wide counters would also count other tests' namespaces, so the log is what is checked.
    time.sleep(5)
    mark = len(operator_running.logs())
    time.sleep(12)
    retries = [line for line in operator_running.logs()[mark:].splitlines() if "retrying" in line and namespace in line]
    assert retries == [], f"still retrying after every entry was deleted: {retries[:3]}"
    assert operator_running.proc.poll() is None
    assert "Traceback" not in operator_running.logs()[log_start:], "the operator logged a traceback"
