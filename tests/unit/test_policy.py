"""The SSRF guard refuses loopback, link-local and metadata addresses with a reason, and what Kubernetes accepts."""

from __future__ import annotations

import pytest

from beacon.policy import ProbePolicy, kubernetes_accepts


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
    ],
)
def test_default_policy_refuses_with_a_reason(address: str, reason: str) -> None:
    why = ProbePolicy().refusal(address)
    assert why is not None
    assert address in why
    assert reason in why
    assert "--allow-probe-cidr" in why  # tells the operator's admin how to allow it


@pytest.mark.parametrize("address", ["198.18.0.1", "10.0.0.7", "192.168.1.1", "2001:db8::1", "::ffff:198.18.0.1"])
def test_ordinary_addresses_are_allowed(address: str) -> None:
    assert ProbePolicy().refusal(address) is None


@pytest.mark.parametrize("name", ["payments.shop.svc.cluster.local", "localhost", "metadata.google.internal"])
def test_dns_names_pass_the_address_check_and_are_checked_after_resolution(name: str) -> None:
    assert ProbePolicy().refusal(name) is None


def test_allow_list_overrides_refused_ranges() -> None:
    policy = ProbePolicy.with_allowed(["127.0.0.0/8", "fe80::/64"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the mapped form is the same address
    assert policy.refusal("fe80::1") is None
    # only what was allowed: the rest of the defaults still apply
    assert policy.refusal("169.254.169.254") is not None
    assert policy.refusal("::1") is not None


def test_allow_list_accepts_host_bits_and_single_addresses() -> None:
    policy = ProbePolicy.with_allowed(["169.254.10.1/16", "fd00:ec2::254"])
    assert policy.refusal("169.254.200.3") is None
    assert policy.refusal("fd00:ec2::254") is None


def test_an_allowed_ipv4_range_does_not_allow_ipv6_addresses() -> None:
    policy = ProbePolicy.with_allowed(["0.0.0.0/0"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::1") is not None
    assert policy.refusal("fe80::1") is not None


@pytest.mark.parametrize(
    ("address", "accepted"),
    [
        ("198.18.0.1", True),
        ("10.1.2.3", True),
        ("2001:db8::1", True),
        ("payments.example.com", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("0.0.0.0", False),  # noqa: S104 - an address under test, not a bind
        ("::", False),
        ("224.0.0.1", False),  # link-local multicast
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:198.18.0.1", True),
    ],
)
def test_kubernetes_accepts(address: str, accepted: bool) -> None:
    assert kubernetes_accepts(address) is accepted
