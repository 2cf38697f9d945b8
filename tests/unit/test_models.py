"""ServiceEntry bodies become typed models once, and each endpoint becomes the probe target the spec describes."""

from __future__ import annotations

from typing import Any

import pytest

from beacon.models import Endpoint, ServiceEntry
from beacon.targets import DnsQuery, GrpcCheck, HttpCheck, LeaseCheck, TcpCheck, UdpCheck


def make_entry(spec: dict[str, Any], *, name: str = "payments", namespace: str = "shop") -> ServiceEntry:
    return ServiceEntry.from_body(
        {"metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3}, "spec": spec}
    )


PORTS = [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090, "appProtocol": "grpc"}]


def test_from_body_applies_defaults() -> None:
    entry = ServiceEntry.from_body(
        {"metadata": {"name": "payments", "namespace": "shop", "uid": "u"}, "spec": {"ports": PORTS}}
    )
    assert entry.key == ("shop", "payments")
    assert entry.generation == 1
    assert entry.spec.headless is True
    assert entry.spec.endpoints == ()
    assert entry.spec.selector is None
    assert entry.spec.health_check is None
    assert entry.spec.ports[0].protocol == "TCP"
    assert entry.spec.ports[1].app_protocol == "grpc"


@pytest.mark.parametrize(
    ("given", "effective"),
    [
        ({}, (10, 2)),
        ({"intervalSeconds": 2}, (2, 1)),
        ({"intervalSeconds": 3}, (3, 2)),
        ({"intervalSeconds": 3600}, (3600, 2)),
        ({"timeoutSeconds": 1}, (10, 1)),
        ({"timeoutSeconds": 9}, (10, 9)),
        ({"timeoutSeconds": 10}, (11, 10)),
        ({"timeoutSeconds": 3599}, (3600, 3599)),
        ({"intervalSeconds": 5, "timeoutSeconds": 4}, (5, 4)),
    ],
)
def test_effective_interval_and_timeout(given: dict[str, int], effective: tuple[int, int]) -> None:
    """Either field alone is valid (the CRD checks timeout < interval only when both are set): the other one is
    derived so that the timeout stays below the interval."""
    entry = make_entry({"ports": PORTS, "endpoints": [{"address": "198.18.0.10"}], "healthCheck": {"tcp": {}, **given}})
    hc = entry.spec.health_check
    assert hc is not None
    assert (hc.interval, hc.timeout) == effective
    assert hc.timeout < hc.interval
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert (target.interval, target.timeout) == (float(effective[0]), float(effective[1]))


def test_health_check_defaults_and_thresholds() -> None:
    entry = make_entry({"ports": PORTS, "healthCheck": {"tcp": {}}})
    hc = entry.spec.health_check
    assert hc is not None
    assert (hc.interval, hc.timeout) == (10, 2)
    assert (hc.thresholds.healthy, hc.thresholds.unhealthy, hc.thresholds.deregister_after) == (1, 3, None)
    entry = make_entry(
        {
            "ports": PORTS,
            "healthCheck": {"tcp": {}, "healthyThreshold": 2, "unhealthyThreshold": 4, "deregisterAfterSeconds": 60},
        }
    )
    assert entry.spec.health_check is not None
    thresholds = entry.spec.health_check.thresholds
    assert (thresholds.healthy, thresholds.unhealthy, thresholds.deregister_after) == (2, 4, 60.0)


def test_unknown_fields_are_ignored() -> None:
    entry = make_entry({"ports": PORTS, "futureField": {"x": 1}})
    assert entry.spec.ports[0].name == "http"


def test_static_endpoints_apply_per_endpoint_port_overrides() -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [
                {"address": "198.18.0.10", "zone": "a", "labels": {"tier": "1"}},
                {"address": "198.18.0.11", "ports": [{"name": "http", "port": 18080}], "hostname": "b"},
            ],
        }
    )
    first, second = entry.static_endpoints()
    assert first.ports == {"http": 8080, "grpc": 9090}
    assert (first.zone, first.labels) == ("a", {"tier": "1"})
    assert second.ports == {"http": 18080, "grpc": 9090}
    assert second.hostname == "b"


def test_no_health_check_means_no_target() -> None:
    entry = make_entry({"ports": PORTS, "endpoints": [{"address": "198.18.0.10"}]})
    assert entry.target(entry.static_endpoints()[0]) is None


def test_http_target_resolves_port_by_name_and_defaults() -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "198.18.0.10"}],
            "healthCheck": {"http": {"path": "/healthz", "port": "grpc"}, "intervalSeconds": 5, "timeoutSeconds": 1},
        }
    )
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert target.address == "198.18.0.10"
    assert (target.interval, target.timeout) == (5.0, 1.0)
    assert target.check == HttpCheck(port=9090, path="/healthz", scheme="HTTP", headers=(), expected=((200, 399),))


def test_http_target_headers_and_expected_statuses() -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "198.18.0.10"}],
            "healthCheck": {
                "http": {
                    "scheme": "HTTPS",
                    "headers": [{"name": "Host", "value": "payments"}],
                    "expectedStatuses": [{"min": 204}, {"min": 300, "max": 302}],
                }
            },
        }
    )
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert isinstance(target.check, HttpCheck)
    assert target.check.port == 8080  # no port: the entry's first port
    assert target.check.scheme == "HTTPS"
    assert target.check.headers == (("Host", "payments"),)
    assert target.check.expected == ((204, 204), (300, 302))


@pytest.mark.parametrize(("ref", "expected"), [(7000, 7000), ("7001", 7001), ("http", 18080), (None, 18080)])
def test_port_reference_forms_and_per_endpoint_override(ref: int | str | None, expected: int) -> None:
    tcp: dict[str, Any] = {} if ref is None else {"port": ref}
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "198.18.0.11", "ports": [{"name": "http", "port": 18080}]}],
            "healthCheck": {"tcp": tcp},
        }
    )
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert target.check == TcpCheck(port=expected)


def test_grpc_target_carries_service_name() -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "2001:db8::1"}],
            "healthCheck": {"grpc": {"port": "grpc", "service": "payments.v1.Payments"}},
        }
    )
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert target.check == GrpcCheck(port=9090, service="payments.v1.Payments")


@pytest.mark.parametrize(
    ("udp", "check"),
    [
        ({"send": "ping"}, UdpCheck(port=8080, payload=b"ping")),
        ({"send": ""}, UdpCheck(port=8080, payload=b"")),  # an empty datagram is a payload too
        ({"port": "grpc", "sendHex": "00FF0d0a"}, UdpCheck(port=9090, payload=b"\x00\xff\r\n")),
        (
            {"port": 53, "send": "h\u00e9", "expect": {"prefix": "ok"}},
            UdpCheck(port=53, payload=b"h\xc3\xa9", prefix=b"ok"),
        ),
        ({"send": "x", "expect": {"prefixHex": "cafe"}}, UdpCheck(port=8080, payload=b"x", prefix=b"\xca\xfe")),
        ({"send": "x", "expect": {"regex": "^PONG [0-9]+$"}}, UdpCheck(port=8080, payload=b"x", regex="^PONG [0-9]+$")),
        ({"dns": {"name": "db.shop.example"}}, UdpCheck(port=8080, dns=DnsQuery(name="db.shop.example"))),
        (
            {"port": 5353, "dns": {"name": "x.example.", "type": "SRV", "rcode": "NXDOMAIN"}},
            UdpCheck(port=5353, dns=DnsQuery(name="x.example.", rdtype="SRV", rcode="NXDOMAIN")),
        ),
    ],
)
def test_udp_target_payload_expectation_and_dns_query(udp: dict[str, Any], check: UdpCheck) -> None:
    entry = make_entry({"ports": PORTS, "endpoints": [{"address": "198.18.0.10"}], "healthCheck": {"udp": udp}})
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert target.check == check
    assert not target.hints


def test_a_udp_port_with_its_own_udp_check() -> None:
    entry = make_entry(
        {
            "ports": [
                *PORTS,
                {"name": "dns", "port": 53, "protocol": "UDP", "healthCheck": {"udp": {"dns": {"name": "x"}}}},
            ],
            "endpoints": [{"address": "198.18.0.10", "ports": [{"name": "dns", "port": 5353}]}],
            "healthCheck": {"tcp": {"port": "http"}},
        }
    )
    targets = entry.targets(entry.static_endpoints()[0])
    assert targets["dns"].check == UdpCheck(port=5353, dns=DnsQuery(name="x"))  # the endpoint's override applies
    assert not targets["dns"].hints
    assert targets[""].hints


def test_lease_name_defaults_to_entry_prefix_and_endpoint_key() -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "198.18.0.10", "hostname": "node-a"}, {"address": "2001:db8::7"}],
            "healthCheck": {"lease": {}},
        }
    )
    with_hostname, ipv6 = (entry.target(ep) for ep in entry.static_endpoints())
    assert with_hostname is not None
    assert ipv6 is not None
    assert with_hostname.check == LeaseCheck(namespace="shop", name="payments-node-a")
    assert ipv6.check == LeaseCheck(namespace="shop", name="payments-2001-db8--7")  # ":" is not valid in names


def test_lease_name_prefix_and_pod_key() -> None:
    entry = make_entry({"ports": PORTS, "healthCheck": {"lease": {"namePrefix": "hb-"}}})
    pod_endpoint = Endpoint(address="10.0.0.5", ports={"http": 8080}, pod="web-0")
    target = entry.target(pod_endpoint)
    assert target is not None
    assert target.check == LeaseCheck(namespace="shop", name="hb-web-0")


def test_equal_specs_give_equal_targets() -> None:
    spec = {"ports": PORTS, "endpoints": [{"address": "198.18.0.10"}], "healthCheck": {"http": {"path": "/h"}}}
    a, b = make_entry(spec), make_entry(spec)
    assert a.target(a.static_endpoints()[0]) == b.target(b.static_endpoints()[0])


@pytest.mark.parametrize(
    ("health_check", "hints", "hold"),
    [
        ({"tcp": {}}, True, False),  # hints on by default; a TCP connection is held only when asked
        ({"tcp": {"holdConnection": True}}, True, True),
        ({"tcp": {"holdConnection": True}, "connectionLossHints": False}, False, False),  # nobody would listen
        ({"http": {}, "connectionLossHints": False}, False, None),
        ({"grpc": {}}, True, None),
        ({"lease": {}}, False, None),  # a Lease check connects nowhere
        ({"udp": {"send": "ping"}}, False, None),  # UDP has no connection to lose
    ],
)
def test_targets_carry_the_connection_loss_hint_switch_and_the_unhealthy_threshold(
    health_check: dict[str, Any], hints: bool, hold: bool | None
) -> None:
    entry = make_entry(
        {
            "ports": PORTS,
            "endpoints": [{"address": "198.18.0.10"}],
            "healthCheck": {**health_check, "unhealthyThreshold": 4},
        }
    )
    target = entry.target(entry.static_endpoints()[0])
    assert target is not None
    assert (target.hints, target.unhealthy_threshold) == (hints, 4)
    if hold is not None:
        assert isinstance(target.check, TcpCheck)
        assert target.check.hold is hold
