"""Verified TLS probes: real handshakes on the loopback interface (HTTPS through aiohttp, gRPC over TLS) with
certificates made by beacon_dev's PKI, each certificate failure mapped to its own detail; one SSLContext per CA
bundle, connections reused; the tls block's model and targets (a rotated CA is a changed target); and discovery
watching the CA bundle's ConfigMap (field-selected, one watch per ConfigMap) and re-targeting on a change."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import _async as health_aio  # public as grpc_health.v1.health.aio (absent from the stubs)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from beacon.checks import Checker, grpc_tls_detail
from beacon.discovery import Discovery
from beacon.models import ServiceEntry
from beacon.policy import ProbePolicy
from beacon.targets import GrpcCheck, HttpCheck, ProbeResult, Target, Tls
from beacon_dev.devcluster.pki import KeyPair, Pki

LOOPBACK_ALLOWED = ProbePolicy.with_allowed(["127.0.0.0/8"])
NAME = "payments.example"


class Certs:
    """A test CA and the certificates the tests serve: good (for 127.0.0.1 and NAME), expired, for another name,
    and one signed by another CA."""

    def __init__(self, directory: Path) -> None:
        self.ca = Pki(directory=directory / "ca", name="beacon-test-ca")
        self.other_ca = Pki(directory=directory / "other", name="beacon-other-ca")
        self.good = self.ca.issue(name="good", common_name=NAME, server_hosts=("127.0.0.1", NAME))
        self.expired = self.ca.issue(name="expired", common_name=NAME, server_hosts=("127.0.0.1", NAME), expired=True)
        self.elsewhere = self.ca.issue(name="elsewhere", common_name="x", server_hosts=("elsewhere.example",))
        self.foreign = self.other_ca.issue(name="foreign", common_name=NAME, server_hosts=("127.0.0.1", NAME))
        self.ca_pem = self.ca.ca.cert.read_text()
        self.other_ca_pem = self.other_ca.ca.cert.read_text()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


def _server_context(pair: KeyPair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return context


@contextlib.asynccontextmanager
async def https_server(pair: KeyPair) -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTPS server on 127.0.0.1 serving `pair`; yields its port and the SNI names clients sent."""
    names: list[str] = []
    context = _server_context(pair)

    def sni(_socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(name or "")

    context.sni_callback = sni

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(runner.addresses[0][1]), names
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def grpc_tls_server(pair: KeyPair) -> AsyncIterator[int]:
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def checker() -> AsyncIterator[Checker]:
    async with Checker(policy=LOOPBACK_ALLOWED, leases=lambda _ns, _name: None) as c:
        yield c


def https(port: int, tls: Tls) -> Target:
    return Target(
        address="127.0.0.1",
        check=HttpCheck(port=port, path="/healthz", scheme="HTTPS", tls=tls),
        interval=10,
        timeout=5,
    )


def grpcs(port: int, tls: Tls | None) -> Target:
    return Target(address="127.0.0.1", check=GrpcCheck(port=port, tls=tls), interval=10, timeout=5)


# ------------------------------------------------------------------------------------------------ HTTPS
@pytest.mark.parametrize(
    ("served", "server_name", "ok", "detail"),
    [
        ("good", None, True, "HTTP 200"),
        ("good", NAME, True, "HTTP 200"),
        ("expired", None, False, "TLS: certificate expired"),
        ("foreign", None, False, "TLS: unknown certificate authority"),
        ("elsewhere", None, False, "TLS: certificate name mismatch (wanted 127.0.0.1)"),
        ("elsewhere", NAME, False, f"TLS: certificate name mismatch (wanted {NAME})"),
    ],
)
async def test_https_verified_against_a_ca_bundle_and_each_failure_has_its_detail(
    certs: Certs, served: str, server_name: str | None, ok: bool, detail: str
) -> None:
    tls = Tls(verify=True, ca=certs.ca_pem, server_name=server_name, source="ConfigMap ca key ca.crt")
    async with https_server(getattr(certs, served)) as (port, _), checker() as c:
        result = await c.run(https(port, tls))
    assert (result.ok, result.detail) == (ok, detail)


async def test_https_server_name_is_sent_as_sni_to_an_ip_endpoint(certs: Certs) -> None:
    async with https_server(certs.good) as (port, names), checker() as c:
        verified = await c.run(https(port, Tls(verify=True, ca=certs.ca_pem, server_name=NAME)))
        by_address = await c.run(https(port, Tls(verify=True, ca=certs.ca_pem)))
    assert verified.ok
    assert by_address.ok
    assert names == [NAME, ""]  # an IP address is never sent as SNI


async def test_without_verification_any_certificate_passes(certs: Certs) -> None:
    async with checker() as c:
        for pair in (certs.expired, certs.foreign, certs.elsewhere):
            async with https_server(pair) as (port, _):
                assert (await c.run(https(port, Tls(verify=False)))).ok
                unverified = Target(
                    address="127.0.0.1",
                    check=HttpCheck(port=port, path="/healthz", scheme="HTTPS"),
                    interval=10,
                    timeout=5,
                )
                assert (await c.run(unverified)).ok  # no tls block: as before verified TLS existed


async def test_the_system_trust_store_does_not_know_a_private_ca(certs: Certs) -> None:
    async with https_server(certs.good) as (port, _), checker() as c:
        result = await c.run(https(port, Tls(verify=True)))
    assert (result.ok, result.detail) == (False, "TLS: unknown certificate authority")


@pytest.mark.parametrize(
    ("tls", "detail"),
    [
        (Tls(verify=True, problem="TLS: CA ConfigMap ca not found"), "TLS: CA ConfigMap ca not found"),
        (
            Tls(verify=True, ca="not a certificate", source="ConfigMap ca key ca.crt"),
            "TLS: no CA certificate in ConfigMap ca key ca.crt",
        ),
    ],
)
async def test_a_missing_or_invalid_bundle_fails_without_connecting(certs: Certs, tls: Tls, detail: str) -> None:
    connections = 0

    async def count(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, checker() as c:
        http_result = await c.run(https(port, tls))
        grpc_result = await c.run(grpcs(port, tls))
    assert (http_result.ok, http_result.detail) == (False, detail)
    assert (grpc_result.ok, grpc_result.detail) == (False, detail)
    assert connections == 0


async def test_one_context_per_bundle_and_connections_are_reused(certs: Certs) -> None:
    async with https_server(certs.good) as (port, _), checker() as c:
        first = Tls(verify=True, ca=certs.ca_pem)
        same = Tls(verify=True, ca="".join(certs.ca_pem), server_name=NAME)  # an equal bundle, another target
        assert c.ssl_context(first) is c.ssl_context(same)
        rotated = Tls(verify=True, ca=certs.ca_pem + certs.other_ca_pem)
        assert c.ssl_context(rotated) is not c.ssl_context(first)
        assert c.ssl_context(Tls(verify=False)) is c.ssl_context(Tls(verify=False, server_name=NAME))
        results = [await c.run(https(port, first)) for _ in range(5)]
        assert all(r.ok for r in results)
        session = c._session
        assert session is not None
        assert session.connector is not None
        # five probes of one target over one keep-alive connection (aiohttp pools per context and server name)
        assert len(session.connector._conns) == 1
        assert sum(len(conns) for conns in session.connector._conns.values()) == 1


async def test_a_rotated_bundle_takes_effect_on_the_next_probe(certs: Certs) -> None:
    async with https_server(certs.foreign) as (port, _), checker() as c:
        before = await c.run(https(port, Tls(verify=True, ca=certs.ca_pem)))
        after = await c.run(https(port, Tls(verify=True, ca=certs.ca_pem + certs.other_ca_pem)))
    assert (before.ok, before.detail) == (False, "TLS: unknown certificate authority")
    assert after.ok


# ------------------------------------------------------------------------------------------------ gRPC
@pytest.mark.parametrize(
    ("served", "server_name", "ok", "detail"),
    [
        ("good", None, True, "gRPC SERVING"),
        ("good", NAME, True, "gRPC SERVING"),
        ("expired", None, False, "TLS: certificate expired"),
        ("foreign", None, False, "TLS: unknown certificate authority"),
        ("elsewhere", None, False, "TLS: certificate name mismatch (wanted 127.0.0.1)"),
        ("elsewhere", NAME, False, f"TLS: certificate name mismatch (wanted {NAME})"),
    ],
)
async def test_grpc_over_tls_and_each_failure_has_its_detail(
    certs: Certs, served: str, server_name: str | None, ok: bool, detail: str
) -> None:
    async with grpc_tls_server(getattr(certs, served)) as port, checker() as c:
        result = await c.run(grpcs(port, Tls(verify=True, ca=certs.ca_pem, server_name=server_name)))
    assert (result.ok, result.detail) == (ok, detail)


async def test_grpc_channel_is_rebuilt_when_the_bundle_rotates(certs: Certs) -> None:
    async with grpc_tls_server(certs.foreign) as port, checker() as c:
        before = await c.run(grpcs(port, Tls(verify=True, ca=certs.ca_pem)))
        after = await c.run(grpcs(port, Tls(verify=True, ca=certs.other_ca_pem)))
    assert (before.ok, before.detail) == (False, "TLS: unknown certificate authority")
    assert after.ok


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:198.18.0.2:50051: Tls handshake failed "
            "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
            "CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
            "TLS: certificate expired",
        ),
        ("... CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate", "TLS: unknown certificate authority"),
        ("... CERTIFICATE_VERIFY_FAILED: self signed certificate", "TLS: unknown certificate authority"),
        (
            "Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.",
            "TLS: certificate name mismatch (wanted a.example)",
        ),
        ("... CERTIFICATE_VERIFY_FAILED: something new", "TLS: certificate refused"),
        ("... Tls handshake failed (TSI_PROTOCOL_FAILURE): WRONG_VERSION_NUMBER", "TLS: handshake failed"),
        ("failed to connect to all addresses; last error: UNAVAILABLE: Connection refused", None),
    ],
)
def test_grpc_tls_messages_map_to_details(message: str, detail: str | None) -> None:
    assert grpc_tls_detail(message, wanted="a.example") == detail


# ------------------------------------------------------------------------------------------------ models
def _entry(check: dict[str, Any]) -> ServiceEntry:
    return ServiceEntry.from_body(
        {
            "metadata": {"name": "payments", "namespace": "shop", "uid": "u1"},
            "spec": {
                "ports": [{"name": "https", "port": 8443}],
                "endpoints": [{"address": "198.18.0.10"}],
                "healthCheck": check,
            },
        }
    )


def _tls_of(entry: ServiceEntry, bundles: dict[str, dict[str, str] | None] | None = None) -> Tls | None:
    target = entry.target(entry.static_endpoints()[0], ca_bundles=bundles)
    assert target is not None
    assert isinstance(target.check, HttpCheck | GrpcCheck)
    return target.check.tls


CA_REF = {"configMapName": "ca", "key": "ca.crt"}


@pytest.mark.parametrize(
    ("http", "verify"),
    [
        ({"scheme": "HTTPS", "tls": {}}, False),
        ({"scheme": "HTTPS", "tls": {"insecureSkipVerify": False}}, True),
        ({"scheme": "HTTPS", "tls": {"caBundle": CA_REF}}, True),
        ({"scheme": "HTTPS", "tls": {"serverName": NAME}}, True),
        ({"scheme": "HTTPS", "tls": {"serverName": NAME, "insecureSkipVerify": True}}, False),
    ],
)
def test_insecure_skip_verify_unset_verifies_only_when_something_asks_for_it(
    http: dict[str, Any], verify: bool
) -> None:
    tls = _tls_of(_entry({"http": http}), {"ca": {"ca.crt": "PEM"}})
    assert tls is not None
    assert tls.verify is verify


def test_no_tls_block_keeps_the_checks_as_they_were() -> None:
    assert _tls_of(_entry({"http": {"scheme": "HTTPS"}})) is None
    assert _tls_of(_entry({"http": {"scheme": "HTTP", "tls": {"caBundle": CA_REF}}})) is None  # the CRD rejects it
    assert _tls_of(_entry({"grpc": {}})) is None  # plaintext gRPC
    assert _entry({"http": {"scheme": "HTTPS"}}).ca_bundles == frozenset()


def test_the_bundle_text_is_in_the_target_so_a_rotation_changes_it() -> None:
    entry = _entry({"http": {"scheme": "HTTPS", "tls": {"caBundle": CA_REF, "serverName": NAME}}})
    assert entry.ca_bundles == {"ca"}
    endpoint = entry.static_endpoints()[0]
    old = entry.target(endpoint, ca_bundles={"ca": {"ca.crt": "OLD"}})
    same = entry.target(endpoint, ca_bundles={"ca": {"ca.crt": "OLD", "other": "x"}})
    new = entry.target(endpoint, ca_bundles={"ca": {"ca.crt": "NEW"}})
    assert old == same
    assert hash(old) == hash(same)
    assert old != new
    assert old is not None
    assert old.check.tls == Tls(  # type: ignore[union-attr]
        verify=True, server_name=NAME, ca="OLD", source="ConfigMap ca key ca.crt"
    )


@pytest.mark.parametrize(
    ("bundles", "problem"),
    [
        ({}, "TLS: CA ConfigMap ca not found"),
        ({"ca": None}, "TLS: CA ConfigMap ca not found"),
        ({"ca": {"tls.crt": "PEM"}}, "TLS: CA ConfigMap ca has no key ca.crt"),
    ],
)
def test_a_missing_configmap_or_key_is_the_probe_detail(bundles: dict[str, Any], problem: str) -> None:
    tls = _tls_of(_entry({"grpc": {"tls": {"caBundle": CA_REF}}}), bundles)
    assert tls is not None
    assert (tls.problem, tls.ca, tls.verify) == (problem, None, True)


# ------------------------------------------------------------------------------------------------ discovery
class CaKube:
    """Just enough of beacon.kube.Kube for a CA bundle's ConfigMap: GET, and the watches that run."""

    def __init__(self) -> None:
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.watching: list[tuple[str, str, str | None]] = []  # (kind, namespace, field selector)
        self.gets = 0

    async def watch(
        self, kind: str, namespace: str, *, field_selector: str | None = None, **_: Any
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watching.append((kind, namespace, field_selector))
        try:
            await asyncio.Event().wait()  # the tests deliver events by calling the engine
            yield "ADDED", {}
        finally:
            self.watching.remove((kind, namespace, field_selector))

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets += 1
        return self.configmaps.get((namespace, name)) if kind == "ConfigMap" else None

    async def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return []

    async def ensure(self, *_: Any, **__: Any) -> bool:
        return True

    async def patch_status(self, *_: Any) -> None:
        pass

    async def event(self, **_: Any) -> None:
        pass

    def forget(self, *_: Any) -> None:
        pass

    def forget_namespace_entry(self, *_: Any) -> None:
        pass


def _configmap(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop"}, "data": data}


def _body(name: str, uid: str, ca: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
        "spec": {
            "ports": [{"name": "https", "port": 8443}],
            "endpoints": [{"address": "198.18.0.10"}],
            "healthCheck": {
                "http": {"scheme": "HTTPS", "tls": {"caBundle": {"configMapName": ca, "key": "ca.crt"}}},
                "intervalSeconds": 2,
                "timeoutSeconds": 1,
            },
        },
    }


async def _ok(_: Target) -> ProbeResult:
    return ProbeResult(ok=True, detail="ok", seconds=0.0)


def _tls(d: Discovery, name: str) -> Tls:
    target = d.prober._targets[("shop", name, "198.18.0.10")][0]
    assert isinstance(target.check, HttpCheck)
    assert target.check.tls is not None
    return target.check.tls


async def test_discovery_watches_the_named_configmap_and_retargets_on_a_change() -> None:
    kube = CaKube()
    kube.configmaps[("shop", "ca")] = _configmap("ca", {"ca.crt": "OLD"})
    d = Discovery(kube=kube, probe=_ok, registry_interval_seconds=0.01)  # type: ignore[arg-type]
    await d.entry_changed(_body("a", "uid-a", "ca"))
    await d.entry_changed(_body("b", "uid-b", "ca"))
    await d.reconcile(("shop", "a"))
    await d.reconcile(("shop", "b"))
    # one watch for the one ConfigMap both name, field-selected: no other ConfigMap of the namespace is sent
    assert kube.watching == [("ConfigMap", "shop", "metadata.name=ca")]
    assert kube.gets == 1
    assert _tls(d, "a") == _tls(d, "b") == Tls(verify=True, ca="OLD", source="ConfigMap ca key ca.crt")

    d.ca_changed("shop", _configmap("ca", {"ca.crt": "NEW"}))  # the watch's event
    await d.reconcile(("shop", "a"))
    await d.reconcile(("shop", "b"))
    assert _tls(d, "a").ca == "NEW"
    assert _tls(d, "b").ca == "NEW"

    d.ca_changed("shop", _configmap("ca", {}), deleted=True)
    await d.reconcile(("shop", "a"))
    assert _tls(d, "a").problem == "TLS: CA ConfigMap ca not found"

    await d.entry_deleted("shop", "a")
    await asyncio.sleep(0)
    assert kube.watching  # b still names it
    await d.entry_deleted("shop", "b")
    await asyncio.sleep(0)
    assert kube.watching == []
    assert d._ca_maps == {}
    assert d._ca_entries == {}
    await d.close()


async def test_an_entry_is_not_published_before_its_bundle_was_read() -> None:
    kube = CaKube()
    kube.configmaps[("shop", "ca")] = _configmap("ca", {"ca.crt": "PEM"})
    d = Discovery(kube=kube, probe=_ok, registry_interval_seconds=0.01)  # type: ignore[arg-type]
    await d.entry_changed(_body("a", "uid-a", "ca"))
    assert len(d.prober) == 0  # no target yet: it would read "not found" until the GET is in
    await d.reconcile(("shop", "a"))
    assert _tls(d, "a").ca == "PEM"
    # an unrelated ConfigMap event (none is sent by the field-selected watch, but if one came) changes nothing
    d.ca_changed("shop", _configmap("other", {"ca.crt": "X"}))
    assert "other" not in d._ca_maps["shop"]
    await d.close()
