"""Typed models of a ServiceEntry (pydantic v2), and how its endpoints become probe targets. Pure.

Why it exists: the CRD schema and CEL rules reject bad input at the API server; these models turn the accepted
dict into typed values once, at the edge, so the reconcile core and the prober never poke at raw dicts. Anything
the schema could not express (a port name that an endpoint override changes, for instance) is resolved here.

Connection-loss hints (prober.py) are on unless `healthCheck.connectionLossHints: false`; a target carries that
switch and its `unhealthyThreshold` (where a hint's fast re-probes stop). `healthCheck.tcp.holdConnection: true`
makes a TCP check keep its connection open, so that a backend's exit can be seen on it (only with hints on: a held
connection nobody listens to would be a file descriptor for nothing). Lease checks connect nowhere and UDP checks
have no connection to lose: no hints for either.

Drain (Consul's maintenance mode) is operational state, not desired configuration, so it lives in annotations, the
same way for both kinds of endpoint: the ServiceEntry's `beacon.dev/drain` lists the static endpoints to drain
(comma-separated addresses), and a Pod annotated `beacon.dev/drain: "true"` is drained in every entry that selects
it. Neither changes the spec or its generation, so GitOps tools that own the spec do not revert a drain. What a
drained endpoint publishes is decided in `beacon.reconcile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from beacon.health import Thresholds
from beacon.targets import Check, DnsQuery, GrpcCheck, HttpCheck, LeaseCheck, Target, TcpCheck, Tls, UdpCheck

# ConfigMap name -> its data (None: it does not exist), in the entry's namespace: where CA bundles are read from
CaBundles = Mapping[str, Mapping[str, str] | None]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


class PortOverride(_Model):
    name: str
    port: int


class StaticEndpoint(_Model):
    address: str
    ports: tuple[PortOverride, ...] = ()
    zone: str | None = None
    hostname: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class Selector(_Model):
    match_labels: dict[str, str] = Field(alias="matchLabels")


class Header(_Model):
    name: str
    value: str


class StatusRange(_Model):
    min: int
    max: int | None = None


class CaBundleRef(_Model):
    config_map_name: str = Field(alias="configMapName")
    key: str


class TlsSpec(_Model):
    """`healthCheck.http.tls` / `healthCheck.grpc.tls`."""

    insecure_skip_verify: bool | None = Field(default=None, alias="insecureSkipVerify")
    server_name: str | None = Field(default=None, alias="serverName")
    ca_bundle: CaBundleRef | None = Field(default=None, alias="caBundle")

    @property
    def verify(self) -> bool:
        """Whether the certificate is verified: as set, else when a CA bundle or a server name is given."""
        if self.insecure_skip_verify is not None:
            return not self.insecure_skip_verify
        return self.ca_bundle is not None or self.server_name is not None

    def tls(self, ca_bundles: CaBundles, *, verify: bool | None = None) -> Tls:
        """The check's TLS parameters, with the CA bundle's text looked up in `ca_bundles`."""
        ref = self.ca_bundle
        ca = problem = None
        source = ""
        if ref is not None:
            name, key = ref.config_map_name, ref.key
            source = f"ConfigMap {name} key {key}"
            data = ca_bundles.get(name)
            if data is None:
                problem = f"TLS: CA ConfigMap {name} not found"
            elif key not in data:
                problem = f"TLS: CA ConfigMap {name} has no key {key}"
            else:
                ca = data[key]
        return Tls(
            verify=self.verify if verify is None else verify,
            server_name=self.server_name,
            ca=ca,
            source=source,
            problem=problem,
        )


class HttpSpec(_Model):
    path: str = "/"
    port: int | str | None = None
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"
    headers: tuple[Header, ...] = ()
    expected_statuses: tuple[StatusRange, ...] = Field(default=(), alias="expectedStatuses")
    tls: TlsSpec | None = None


class PortSpec(_Model):
    port: int | str | None = None


class TcpSpec(PortSpec):
    hold_connection: bool = Field(default=False, alias="holdConnection")


class GrpcSpec(_Model):
    port: int | str | None = None
    service: str = ""
    tls: TlsSpec | None = None


class UdpExpect(_Model):
    """What a UDP reply must look like (the CRD allows at most one): it starts with `prefix` (text, sent as UTF-8) or
    `prefixHex` (bytes), or RE2 `regex` finds a match in it. None set: any reply passes."""

    prefix: str | None = None
    prefix_hex: str | None = Field(default=None, alias="prefixHex")
    regex: str | None = None


class DnsSpec(_Model):
    name: str
    type: str = "A"
    rcode: str = "NOERROR"


class UdpSpec(_Model):
    """One datagram out, one expected back: `send` (text) or `sendHex`, with an optional `expect`; or `dns`, a real
    query whose answer must carry the wanted rcode. The CRD requires exactly one of send, sendHex and dns, and
    checks the hex."""

    port: int | str | None = None
    send: str | None = None
    send_hex: str | None = Field(default=None, alias="sendHex")
    expect: UdpExpect | None = None
    dns: DnsSpec | None = None

    def check(self, port: int) -> UdpCheck:
        if self.dns is not None:
            query = DnsQuery(name=self.dns.name, rdtype=self.dns.type.upper(), rcode=self.dns.rcode.upper())
            return UdpCheck(port=port, dns=query)
        payload = bytes.fromhex(self.send_hex) if self.send_hex is not None else (self.send or "").encode()
        expect = self.expect or UdpExpect()
        prefix: bytes | None = None
        if expect.prefix_hex is not None:
            prefix = bytes.fromhex(expect.prefix_hex)
        elif expect.prefix is not None:
            prefix = expect.prefix.encode()
        return UdpCheck(port=port, payload=payload, prefix=prefix, regex=expect.regex)


class LeaseSpec(_Model):
    name_prefix: str | None = Field(default=None, alias="namePrefix")


class PortCheck(_Model):
    """A port's own check (`spec.ports[].healthCheck`): exactly one kind, which probes that port and gates only
    that port. No `port` field (it is the port it sits on) and no Lease (a Lease is not about a port); timing and
    thresholds are the entry's `healthCheck`'s, or the defaults."""

    http: HttpSpec | None = None
    tcp: TcpSpec | None = None
    grpc: GrpcSpec | None = None
    udp: UdpSpec | None = None

    @cached_property
    def kind(self) -> str | None:
        """The check's kind ("http", "tcp", "grpc" or "udp")."""
        return next((kind for kind in ("http", "tcp", "grpc", "udp") if getattr(self, kind) is not None), None)


class Port(_Model):
    name: str
    port: int
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = Field(default=None, alias="appProtocol")
    health_check: PortCheck | None = Field(default=None, alias="healthCheck")


class FlapDampingSpec(_Model):
    """Route-flap damping of the entry's endpoints (`beacon.failsafe.FlapDamper`); the penalties are BGP's."""

    enabled: bool = True
    half_life_seconds: int = Field(default=60, alias="halfLifeSeconds")
    max_suppress_seconds: int = Field(default=240, alias="maxSuppressSeconds")


# on a ServiceEntry: the static endpoints to drain, comma-separated addresses; on a Pod: "true" drains it
ANNOTATION_DRAIN = "beacon.dev/drain"


def drained_addresses(annotations: Mapping[str, str] | None) -> frozenset[str]:
    """The addresses a ServiceEntry's drain annotation lists (commas and blanks separate them)."""
    value = (annotations or {}).get(ANNOTATION_DRAIN) or ""
    return frozenset(part for part in value.replace(",", " ").split() if part)


def pod_drained(annotations: Mapping[str, str] | None) -> bool:
    """Whether a Pod's drain annotation asks for it to be drained ("true", any case)."""
    return str((annotations or {}).get(ANNOTATION_DRAIN, "")).strip().lower() == "true"


DEFAULT_INTERVAL_SECONDS = 10
DEFAULT_TIMEOUT_SECONDS = 2


class HealthCheck(_Model):
    http: HttpSpec | None = None
    tcp: TcpSpec | None = None
    grpc: GrpcSpec | None = None
    udp: UdpSpec | None = None
    lease: LeaseSpec | None = None
    interval_seconds: int | None = Field(default=None, alias="intervalSeconds")
    timeout_seconds: int | None = Field(default=None, alias="timeoutSeconds")
    healthy_threshold: int = Field(default=1, alias="healthyThreshold")
    unhealthy_threshold: int = Field(default=3, alias="unhealthyThreshold")
    deregister_after_seconds: int | None = Field(default=None, alias="deregisterAfterSeconds")
    connection_loss_hints: bool = Field(default=True, alias="connectionLossHints")
    min_healthy_percent: int | None = Field(default=None, alias="minHealthyPercent")
    flap_damping: FlapDampingSpec | None = Field(default=None, alias="flapDamping")

    @cached_property
    def kind(self) -> str | None:
        """The check's kind ("http", "tcp", "grpc", "udp", "lease"); None when only timing is set (for the ports'
        own)."""
        kinds = ("http", "tcp", "grpc", "udp", "lease")
        return next((kind for kind in kinds if getattr(self, kind) is not None), None)

    @property
    def interval(self) -> int:
        """Seconds between probes: as set, else 10, raised past a longer timeout set on its own (CRD: timeout <
        interval whenever both are set, so either field alone is always valid)."""
        if self.interval_seconds is not None:
            return self.interval_seconds
        if self.timeout_seconds is not None:
            return max(DEFAULT_INTERVAL_SECONDS, self.timeout_seconds + 1)
        return DEFAULT_INTERVAL_SECONDS

    @property
    def timeout(self) -> int:
        """Seconds before a probe fails: as set, else 2, and always below the interval (1 at a 2 s interval)."""
        if self.timeout_seconds is not None:
            return self.timeout_seconds
        return min(DEFAULT_TIMEOUT_SECONDS, self.interval - 1)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            healthy=self.healthy_threshold,
            unhealthy=self.unhealthy_threshold,
            deregister_after=float(self.deregister_after_seconds) if self.deregister_after_seconds else None,
        )


_NO_CHECK = HealthCheck()


class ServiceEntrySpec(_Model):
    ports: tuple[Port, ...]
    endpoints: tuple[StaticEndpoint, ...] = ()
    selector: Selector | None = None
    health_check: HealthCheck | None = Field(default=None, alias="healthCheck")
    headless: bool = True


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint as beacon publishes it: a static one, or a pod matched by the selector. Built by beacon (never
    parsed from input), 10,000 of them at scale: a slotted dataclass, not a validating model."""

    address: str
    ports: dict[str, int]  # port name -> number, overrides applied
    zone: str | None = None
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    pod: str | None = None  # pod name for selector endpoints
    node: str | None = None
    terminating: bool = False
    draining: bool = False  # drained by annotation: published not ready (terminating), still probed

    @property
    def lease_key(self) -> str:
        return self.hostname or self.pod or self.address.replace(":", "-")


class ServiceEntry(_Model):
    """A ServiceEntry as read from the API: identity plus parsed spec."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: ServiceEntrySpec
    drained: frozenset[str] = frozenset()  # static endpoints drained by the beacon.dev/drain annotation

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ServiceEntry:
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=int(meta.get("generation", 1)),
            spec=ServiceEntrySpec.model_validate(body.get("spec") or {}),
            drained=drained_addresses(meta.get("annotations")),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def ca_bundles(self) -> frozenset[str]:
        """The names of the ConfigMaps (in the entry's namespace) whose CA bundles its checks trust: the
        entry-level check's and the ports' own."""
        names = set()
        checks = [self.spec.health_check, *(p.health_check for p in self.spec.ports)]
        for check in checks:
            if check is None:
                continue
            tls = check.http.tls if check.http is not None and check.http.scheme == "HTTPS" else None
            if check.grpc is not None:
                tls = check.grpc.tls
            ref = tls.ca_bundle if tls is not None else None
            if ref is not None:
                names.add(ref.config_map_name)
        return frozenset(names)

    def static_endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                address=e.address,
                ports={**{p.name: p.port for p in self.spec.ports}, **{o.name: o.port for o in e.ports}},
                zone=e.zone,
                hostname=e.hostname,
                labels=dict(e.labels),
                draining=e.address in self.drained,
            )
            for e in self.spec.endpoints
        ]

    @cached_property
    def health_check(self) -> HealthCheck:
        """The entry's healthCheck, or the defaults (its timing and thresholds also rule the ports' own checks)."""
        return self.spec.health_check or _NO_CHECK

    @cached_property
    def own_checks(self) -> tuple[str, ...]:
        """Names of the ports with their own check, in spec order."""
        return tuple(p.name for p in self.spec.ports if p.health_check is not None)

    @cached_property  # read for every probe result: computed once per parsed entry (the models are frozen)
    def probed(self) -> bool:
        """Whether anything of the entry is probed (an entry-level check, or a port's own)."""
        hc = self.spec.health_check
        return (hc is not None and hc.kind is not None) or bool(self.own_checks)

    def targets(self, endpoint: Endpoint, *, ca_bundles: CaBundles | None = None) -> dict[str, Target]:
        """How to probe `endpoint`, by slot: "" for the entry-level check (which gates the ports without their
        own), a port's name for that port's own check. Empty when nothing is probed (every port counts healthy).
        `ca_bundles`: the ConfigMaps of the entry's namespace that a `tls.caBundle` may name (see the module)."""
        out: dict[str, Target] = {}
        bundles = ca_bundles or {}
        entry_level = self.target(endpoint, ca_bundles=ca_bundles)
        if entry_level is not None:
            out[""] = entry_level
        hc = self.health_check
        for port in self.spec.ports:
            own = port.health_check
            if own is None:
                continue
            number = endpoint.ports[port.name]
            check: Check
            if own.http is not None:
                check = _http_check(own.http, number, bundles)
            elif own.tcp is not None:
                check = TcpCheck(port=number, hold=hc.connection_loss_hints and own.tcp.hold_connection)
            elif own.grpc is not None:
                check = _grpc_check(own.grpc, number, bundles)
            elif own.udp is not None:
                check = own.udp.check(number)
            else:  # the CRD's CEL rule requires exactly one kind
                continue
            out[port.name] = Target(
                address=endpoint.address,
                check=check,
                interval=float(hc.interval),
                timeout=float(hc.timeout),
                hints=hc.connection_loss_hints and own.udp is None,  # UDP has no connection to lose
                unhealthy_threshold=hc.unhealthy_threshold,
            )
        return out

    def target(self, endpoint: Endpoint, *, ca_bundles: CaBundles | None = None) -> Target | None:
        """The entry-level check of `endpoint`; None when the entry has none (the ports it would gate count
        healthy). `ca_bundles`: as for `targets`."""
        hc = self.spec.health_check
        if hc is None:
            return None
        check: Check
        hints = hc.connection_loss_hints and hc.lease is None and hc.udp is None
        if hc.http is not None:
            check = _http_check(hc.http, self._port(hc.http.port, endpoint), ca_bundles or {})
        elif hc.tcp is not None:
            check = TcpCheck(port=self._port(hc.tcp.port, endpoint), hold=hints and hc.tcp.hold_connection)
        elif hc.grpc is not None:
            check = _grpc_check(hc.grpc, self._port(hc.grpc.port, endpoint), ca_bundles or {})
        elif hc.udp is not None:
            check = hc.udp.check(self._port(hc.udp.port, endpoint))
        elif hc.lease is not None:
            prefix = hc.lease.name_prefix or f"{self.name}-"
            check = LeaseCheck(namespace=self.namespace, name=f"{prefix}{endpoint.lease_key}")
        else:  # no kind: only timing for the ports' own checks (the CRD's CEL rule allows that alone)
            return None
        return Target(
            address=endpoint.address,
            check=check,
            interval=float(hc.interval),
            timeout=float(hc.timeout),
            hints=hints,
            unhealthy_threshold=hc.unhealthy_threshold,
        )

    def _port(self, ref: int | str | None, endpoint: Endpoint) -> int:
        if isinstance(ref, int):
            return ref
        if ref is None:
            return endpoint.ports[self.spec.ports[0].name]
        if ref.isdigit():
            return int(ref)
        return endpoint.ports[ref]


def _http_check(spec: HttpSpec, port: int, ca_bundles: CaBundles) -> HttpCheck:
    tls = spec.tls if spec.scheme == "HTTPS" else None
    return HttpCheck(
        port=port,
        path=spec.path,
        scheme=spec.scheme,
        headers=tuple((h.name, h.value) for h in spec.headers),
        expected=tuple((r.min, r.max if r.max is not None else r.min) for r in spec.expected_statuses) or ((200, 399),),
        tls=tls.tls(ca_bundles) if tls is not None else None,
    )


def _grpc_check(spec: GrpcSpec, port: int, ca_bundles: CaBundles) -> GrpcCheck:
    # always verified: grpc cannot skip verification (the CRD rejects insecureSkipVerify: true)
    tls = spec.tls.tls(ca_bundles, verify=True) if spec.tls is not None else None
    return GrpcCheck(port=port, service=spec.service, tls=tls)
