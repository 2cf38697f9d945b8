"""The pure core of discovery: a ServiceEntry, its endpoints and their health in; the desired Service,
EndpointSlices, Endpoints, status and registry record out. No I/O, no clock (time is an argument).

Why it exists: everything beacon publishes is a function of (spec, endpoints, health). Computing it in one pure
place (crate-operator's `get_*` builders) makes every output unit-testable without a cluster and lets the writer
compare desired against actual and write only on change.

Drain is decided here too: a drained endpoint (`Endpoint.draining`, from the annotations read in `beacon.models`)
is published not ready, so it leaves DNS and the registry at once, with `terminating: true` and `serving` from its
health, so load balancers that honour `serving` let in-flight work finish. It stays probed, so undraining a healthy
endpoint publishes it ready at once, without waiting for a probe. Its status state is `Draining`.

The fail-safe policies (`beacon.failsafe`: self-preservation, flap damping, the panic floor) are applied here too,
by `visible` when the caller passes a `Guard`: a View then carries the policy's verdict (Held, Flapping, Panic)
where it overrides health, and every output follows it. A Flapping endpoint's status item leaves out its check and
probe, which change at every flap, so a suppressed endpoint costs no status write per flap.

The status shows, per endpoint (all of them up to 16; above that the first 16 that are not Healthy), its state,
since when, and the probe that decided its health (detail, latency, consecutive count). All of these change only
at a transition or a drain, so status is still written only when what it shows changes, never per probe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from beacon import packing
from beacon.failsafe import DampingPolicy, EndpointInput, FlapDamper, Reason, SelfPreservation, decide
from beacon.health import EndpointHealth, Status, Thresholds
from beacon.models import Endpoint, ServiceEntry
from beacon.policy import kubernetes_accepts

GROUP = "beacon.dev"
# A label value may not contain "/", so the managed-by value follows Kubernetes' own
# "endpointslice-controller.k8s.io" pattern rather than "beacon.dev/operator".
MANAGED_BY = "operator.beacon.dev"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"
LABEL_ENTRY = "beacon.dev/service-entry"
MAX_PER_SLICE = 100
MAX_ENDPOINTS_ADDRESSES = 1000  # the Endpoints API's own cap; above it Kubernetes marks the object truncated
STATUS_ENDPOINTS_MAX = 16
STATUS_PROBE_MAX = 64  # characters of a probe's detail kept in an endpoint's status

Obj = dict[str, Any]


def owner_reference(entry: ServiceEntry) -> Obj:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "ServiceEntry",
        "name": entry.name,
        "uid": entry.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(entry: ServiceEntry, name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {
        "name": name,
        "namespace": entry.namespace,
        "labels": {LABEL_ENTRY: entry.name, **(labels or {})},
        "ownerReferences": [owner_reference(entry)],
    }


def address_type(address: str) -> str:
    try:
        return "IPv6" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else "IPv4"
    except ValueError:
        return "FQDN"


def _service_ports(entry: ServiceEntry) -> list[Obj]:
    ports = []
    for p in entry.spec.ports:
        port: Obj = {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.port}
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        ports.append(port)
    return ports


def desired_service(entry: ServiceEntry) -> Obj:
    """A selector-less Service: Kubernetes leaves its endpoints to us. Headless by default, for DNS answers."""
    spec: Obj = {"type": "ClusterIP", "ports": _service_ports(entry)}
    if entry.spec.headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(entry, entry.name), "spec": spec}


ProbeKey = tuple[str, str, str]  # namespace, entry, address: an endpoint's key in the prober and the policies
# the fail-safe verdicts that override an endpoint's health (the others only restate it)
OVERRIDES = frozenset({Reason.HELD, Reason.FLAPPING, Reason.PANIC})
# an endpoint's state in status for each override (the status field is short: "Held", not the condition reason)
OVERRIDE_STATES = {Reason.HELD: "Held", Reason.FLAPPING: "Flapping", Reason.PANIC: "Panic"}


def probe_key(entry: ServiceEntry, address: str) -> ProbeKey:
    return (entry.namespace, entry.name, address)


# A port's own check is probed and tracked apart from the entry-level check of the same endpoint: its slot key is
# "<address>#<port name>" ("#" appears in no address or DNS name), the entry-level check's is the address itself.
SLOT_SEPARATOR = "#"


def slot_key(address: str, port: str = "") -> str:
    """The key of an endpoint's check slot: `port` "" for the entry-level check, a port name for that port's own."""
    return f"{address}{SLOT_SEPARATOR}{port}" if port else address


def slot_address(key: str) -> str:
    """The endpoint address of a slot key."""
    return key.partition(SLOT_SEPARATOR)[0]


def slot_label(key: str) -> str:
    """A slot key as people read it: "198.18.0.5" or "198.18.0.5 port metrics"."""
    address, _, port = key.partition(SLOT_SEPARATOR)
    return f"{address} port {port}" if port else address


def damping_policy(entry: ServiceEntry) -> DampingPolicy | None:
    """The entry's flap damping, None when off (unset, or enabled: false)."""
    hc = entry.spec.health_check
    spec = hc.flap_damping if hc is not None else None
    if spec is None or not spec.enabled:
        return None
    return DampingPolicy(half_life=float(spec.half_life_seconds), max_suppress=float(spec.max_suppress_seconds))


@dataclass(frozen=True)
class Guard:
    """What the fail-safe policies (`beacon.failsafe`) need beside the entry: `published`, each endpoint's ready
    flag as last published (address -> ready; absent: never published); the operator's self-preservation and
    the entry's flap damper (None: off); `check`, the entry's check kind (`failsafe.check_kind`)."""

    published: Mapping[str, bool]
    check: str | None = None
    self_preservation: SelfPreservation[ProbeKey] | None = None
    damper: FlapDamper[ProbeKey] | None = None


_NO_PORTS: Mapping[str, EndpointHealth] = MappingProxyType({})


@dataclass(frozen=True)
class View:
    """One endpoint with its health as it will be published. `verdict`: a fail-safe policy's override of its
    health (Held, Flapping or Panic; None when health decides).

    Per-port checks: `port_names` are the entry's ports in spec order; `port_health` the health of each port that
    has its own check (empty when none has: then `health`, the entry-level check's, gates every port). A port
    without its own check follows `health`. The endpoint is serving when at least one port is healthy, and is
    published on its healthy ports only (`published_ports`)."""

    endpoint: Endpoint
    health: EndpointHealth
    refused: str | None = None
    verdict: Reason | None = None
    port_names: tuple[str, ...] = ()
    port_health: Mapping[str, EndpointHealth] = field(default_factory=lambda: _NO_PORTS)

    @property
    def healthy_ports(self) -> tuple[str, ...]:
        """The ports this endpoint is healthy on (or held, or in panic), in spec order."""
        if not self.port_health:
            return self.port_names if self.serving else ()
        if self.refused is not None or self.verdict is Reason.FLAPPING:
            return ()
        if self.verdict is not None:
            return self.port_names
        entry_ready = self.health.ready
        own = self.port_health
        return tuple(p for p in self.port_names if (own[p].ready if p in own else entry_ready))

    @property
    def published_ports(self) -> tuple[str, ...]:
        """The ports it is published under: its healthy ones, or all of them while it is not serving on any (as
        a not-ready endpoint)."""
        return self.healthy_ports or self.port_names

    @property
    def unhealthy_ports(self) -> tuple[str, ...]:
        """Ports with a failing check of an endpoint serving on others (empty without per-port checks)."""
        if not self.port_health:
            return ()
        healthy = self.healthy_ports
        return tuple(p for p in self.port_names if p not in healthy) if healthy else ()

    def port_status(self, port: str) -> Status:
        """The check verdict that gates `port`: its own check's, else the entry-level one's."""
        own = self.port_health.get(port)
        return (own if own is not None else self.health).status

    @property
    def ready(self) -> bool:
        """Published for new traffic: healthy (or held, or in panic) and neither terminating nor drained, and not
        damped."""
        return self.serving and not self.terminating

    @property
    def serving(self) -> bool:
        """Healthy, whatever else: a terminating or drained endpoint still finishes what it has."""
        if self.refused is not None:
            return False
        if self.verdict is None:
            return bool(self.healthy_ports) if self.port_health else self.health.ready
        return self.verdict is not Reason.FLAPPING

    @property
    def terminating(self) -> bool:
        """On its way out: a pod being deleted, or a drained endpoint (Kubernetes' terminating endpoints)."""
        return self.endpoint.terminating or self.endpoint.draining

    @property
    def publishable(self) -> bool:
        """Whether Kubernetes accepts the address in Endpoints/EndpointSlices (it rejects loopback and
        link-local); others still count in status, where they show why they are not published."""
        return kubernetes_accepts(self.endpoint.address)


def visible(
    entry: ServiceEntry,
    endpoints: Sequence[Endpoint],
    health: Mapping[str, EndpointHealth],
    refused: Mapping[str, str],
    *,
    now: float,
    guard: Guard | None = None,
) -> list[View]:
    """Endpoints to publish, sorted by address, minus those deregistered after being critical too long.

    With a `guard`, the fail-safe policies have their word (`failsafe.decide`: facts, then self-preservation,
    then damping, then the panic floor): an endpoint held ready by self-preservation is not deregistered either,
    or a long outage of the operator's own path would deregister the fleet."""
    hc = entry.spec.health_check
    thresholds = hc.thresholds if hc else Thresholds()
    unchecked = hc is None or hc.kind is None  # the ports without their own check count healthy
    port_names = tuple(p.name for p in entry.spec.ports)
    own = entry.own_checks
    gated = len(own) < len(port_names)  # some port follows the entry-level check
    candidates: list[tuple[View, bool]] = []
    for ep in sorted(endpoints, key=lambda e: e.address):
        h = health.get(ep.address)
        if unchecked:
            h = _UNCHECKED
        elif h is None:
            h = EndpointHealth()
        port_health = _NO_PORTS
        if own:
            port_health = {p: health.get(slot_key(ep.address, p)) or EndpointHealth() for p in own}
            gates = [*port_health.values(), h] if gated else list(port_health.values())
            gone = all(g.deregistered(now=now, thresholds=thresholds) for g in gates)
        else:
            gone = h.deregistered(now=now, thresholds=thresholds)
        if gone and (guard is None or not guard.published.get(ep.address)):
            continue
        refusal = refused.get(ep.address)
        if refusal is None and own:
            refusal = next((why for p in own if (why := refused.get(slot_key(ep.address, p)))), None)
        view = View(endpoint=ep, health=h, refused=refusal, port_names=port_names, port_health=port_health)
        candidates.append((view, gone))
    if guard is None:
        return [view for view, _ in candidates]
    decision = decide(
        (
            EndpointInput(
                key=probe_key(entry, view.endpoint.address),
                health=_overall(view, gated=gated),
                published_ready=guard.published.get(view.endpoint.address),
                terminating=view.endpoint.terminating,
                draining=view.endpoint.draining,
                refused=view.refused is not None,
            )
            for view, _ in candidates
        ),
        now=now,
        check=guard.check,
        unhealthy_threshold=thresholds.unhealthy,
        self_preservation=guard.self_preservation,
        damper=guard.damper,
        min_healthy_percent=hc.min_healthy_percent if hc else None,
    )
    views = []
    for view, gone in candidates:
        publish = decision.endpoints[probe_key(entry, view.endpoint.address)]
        if gone and not publish.ready:
            continue
        views.append(replace(view, verdict=publish.reason) if publish.reason in OVERRIDES else view)
    return views


_UNCHECKED = EndpointHealth(status=Status.PASSING, detail="no health check")


def _overall(view: View, *, gated: bool) -> Status:
    """One status for the endpoint as a whole, for the fail-safe policies: passing when any of its checks passes
    (it is published on some port), else critical when any fails, else unknown."""
    if not view.port_health:
        return view.health.status
    statuses = {h.status for h in view.port_health.values()}
    if gated:
        statuses.add(view.health.status)
    if Status.PASSING in statuses:
        return Status.PASSING
    return Status.CRITICAL if Status.CRITICAL in statuses else Status.UNKNOWN


def _published_port_map(view: View) -> dict[str, int]:
    ports = view.endpoint.ports
    return {name: ports[name] for name in view.published_ports}


def _slice_ports(entry: ServiceEntry, ports: Mapping[str, int]) -> list[Obj]:
    """The ports of a slice (or an Endpoints subset): the entry's ports that are in `ports`, in spec order, with
    the numbers of `ports` (endpoint overrides applied)."""
    out = []
    for p in entry.spec.ports:
        if p.name not in ports:
            continue
        port: Obj = {"name": p.name, "port": ports[p.name], "protocol": p.protocol}
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        out.append(port)
    return out


def _slice_endpoint(view: View, *, namespace: str) -> Obj:
    ep = view.endpoint
    out: Obj = {
        "addresses": [ep.address],
        "conditions": {"ready": view.ready, "serving": view.serving, "terminating": view.terminating},
    }
    if ep.hostname:
        out["hostname"] = ep.hostname
    if ep.zone:
        out["zone"] = ep.zone
    if ep.node:
        out["nodeName"] = ep.node
    if ep.pod:
        out["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": ep.pod}
    return out


def _ports_signature(ports: Mapping[str, int]) -> str:
    return hashlib.sha256(repr(sorted(ports.items())).encode()).hexdigest()[:6]


def desired_slices(
    entry: ServiceEntry, views: Sequence[View], observed: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Obj]:
    """EndpointSlices of at most 100 endpoints, one group per address type and port set, named `<stem>-<n>`.
    An endpoint's port set is the ports it is published under (`View.published_ports`): with per-port checks, the
    ones it is healthy on, so DNS SRV records and load balancers see it only on those (Kubernetes' per-port
    readiness: a slice per set of ports).

    `observed` is the entry's slices as they are now (by name). Membership is stable (`beacon.packing`): an
    endpoint stays in the slice it is in, so adding, removing or flipping one endpoint changes one slice; the
    other slices come out exactly as observed and the writer skips them.
    """
    default_ports = {p.name: p.port for p in entry.spec.ports}
    groups: dict[tuple[str, str], list[View]] = defaultdict(list)
    ports_of: dict[tuple[str, str], Mapping[str, int]] = {}
    for view in views:
        if not view.publishable:
            continue
        ports = _published_port_map(view) if view.port_health else view.endpoint.ports
        sig = "" if dict(ports) == default_ports else _ports_signature(ports)
        key = (address_type(view.endpoint.address), sig)
        groups[key].append(view)
        ports_of[key] = ports
    observed = observed or {}
    slices = []
    for (family, sig), members in sorted(groups.items()):
        stem = f"{entry.name}-{family.lower()}" + (f"-{sig}" if sig else "")
        slice_ports = _slice_ports(entry, ports_of[(family, sig)])
        wanted = {v.endpoint.address: _slice_endpoint(v, namespace=entry.namespace) for v in members}
        membership: dict[str, list[str]] = {}
        changed: set[str] = set()
        for name, item in observed.items():
            if packing.slice_index(stem, name) is None:
                continue
            held = {ep["addresses"][0]: ep for ep in item.get("endpoints") or [] if ep.get("addresses")}
            membership[name] = list(held)
            same_shape = item.get("addressType") == family and item.get("ports") == slice_ports
            changed.update(a for a, ep in held.items() if a in wanted and (not same_shape or ep != wanted[a]))
        placed = packing.plan(
            stem=stem, desired=list(wanted), observed=membership, changed=changed, capacity=MAX_PER_SLICE
        )
        for name, addresses in placed.slices.items():
            slices.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": _meta(entry, name, {LABEL_SERVICE_NAME: entry.name, LABEL_MANAGED_BY: MANAGED_BY}),
                    "addressType": family,
                    "ports": slice_ports,
                    "endpoints": [wanted[a] for a in addresses],
                }
            )
    return slices


def desired_endpoints(entry: ServiceEntry, views: Sequence[View]) -> Obj:
    """The legacy Endpoints object: IP endpoints only, unhealthy ones in notReadyAddresses, never mirrored. An
    address is listed in the subset of the ports it is published under (`View.published_ports`)."""
    subsets: dict[tuple[tuple[str, int], ...], Obj] = {}
    ip_views = [v for v in views if address_type(v.endpoint.address) != "FQDN" and v.publishable]
    truncated = len(ip_views) > MAX_ENDPOINTS_ADDRESSES
    if truncated:  # like Kubernetes' endpoints controller: keep ready addresses over not-ready ones
        ip_views.sort(key=lambda v: not v.ready)  # stable: address order holds within each group
    for view in ip_views[:MAX_ENDPOINTS_ADDRESSES]:
        ep = view.endpoint
        ports = _published_port_map(view) if view.port_health else ep.ports
        key = tuple(sorted(ports.items()))
        subset = subsets.setdefault(
            key, {"addresses": [], "notReadyAddresses": [], "ports": _slice_ports(entry, ports)}
        )
        address: Obj = {"ip": ep.address}
        if ep.hostname:
            address["hostname"] = ep.hostname
        if ep.node:
            address["nodeName"] = ep.node
        if ep.pod:
            address["targetRef"] = {"kind": "Pod", "namespace": entry.namespace, "name": ep.pod}
        subset["addresses" if view.ready else "notReadyAddresses"].append(address)
    out_subsets = []
    for key in sorted(subsets):
        subset = {k: v for k, v in subsets[key].items() if v}
        if "addresses" in subset or "notReadyAddresses" in subset:
            out_subsets.append(subset)
    meta = _meta(entry, entry.name, {LABEL_SKIP_MIRROR: "true"})
    if truncated:
        meta["annotations"] = {"endpoints.kubernetes.io/over-capacity": "truncated"}
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta, "subsets": out_subsets}


# ---------------------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


def _iso(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], new: Sequence[Condition], *, generation: int, now: float
) -> list[Obj]:
    """Conditions keyed by type; lastTransitionTime moves only when a condition's status changes."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in new:
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        out.append(
            {
                "type": cond.type,
                "status": cond.status,
                "reason": cond.reason,
                "message": cond.message[:1024],
                "observedGeneration": generation,
                "lastTransitionTime": since or _iso(now),
            }
        )
    return out


def _state(view: View) -> str:
    if view.endpoint.draining:
        return "Draining"
    if view.verdict is not None:
        return OVERRIDE_STATES[view.verdict]
    if view.ready:
        return "Degraded" if view.unhealthy_ports else "Healthy"
    if view.port_health:
        statuses = {view.port_status(p) for p in view.port_names}
        return "Unknown" if view.refused is None and Status.CRITICAL not in statuses else "Unhealthy"
    if view.health.status is Status.UNKNOWN and view.refused is None:
        return "Unknown"
    return "Unhealthy"


def _deciding(view: View) -> tuple[str, EndpointHealth]:
    """The check whose probe the status shows, and its port ("" for the entry-level check): without per-port
    checks the entry-level one; with them the first failing port's, else the entry-level check if it gates a
    port and probes, else the first port's own."""
    if not view.port_health:
        return "", view.health
    for port in view.port_names:
        if view.port_status(port) is not Status.PASSING:
            own = view.port_health.get(port)
            return (port, own) if own is not None else ("", view.health)
    if len(view.port_health) < len(view.port_names) and view.health is not _UNCHECKED:
        return "", view.health
    port = next(iter(view.port_health))
    return port, view.port_health[port]


def _names(views: Sequence[View], limit: int = 5) -> str:
    names = ", ".join(v.endpoint.address for v in views[:limit])
    return names + (f" and {len(views) - limit} more" if len(views) > limit else "")


def endpoint_status(view: View, previous: Mapping[str, Any] | None, *, now: float) -> Obj:
    """One endpoint's status item: state (Healthy, Unhealthy, Unknown, Draining), `check` (the health check's
    own verdict, also while draining), `since` (when it entered that state), and the probe that decided its health
    (`probe` detail, `latencyMs`, `consecutive`). `previous` is the item as last published: a health restored after
    a restart has no decision of its own, and keeps what was published, so a restart writes nothing."""
    state = _state(view)
    port, health = _deciding(view)
    item: Obj = {"address": view.endpoint.address, "state": state}
    if view.verdict is Reason.FLAPPING:  # its check and probe change at every flap: shown, they would cost a write each
        if previous is not None and previous.get("state") == state and previous.get("since"):
            item["since"] = previous["since"]
        else:
            item["since"] = _iso(now)
        return item
    gated = len(view.port_health) < len(view.port_names)
    item["check"] = _overall(view, gated=gated).value if view.port_health else health.status.value
    if view.port_health:
        item["ports"] = {p: view.port_status(p).value for p in view.port_names}
    decision = health.decision
    if decision is not None:
        item["probe"] = (f"{port}: {decision.detail}" if port else decision.detail)[:STATUS_PROBE_MAX]
        if decision.latency is not None:
            item["latencyMs"] = round(decision.latency * 1000, 2)
        item["consecutive"] = decision.consecutive
    elif previous is not None and previous.get("check") == item["check"] and previous.get("ports") == item.get("ports"):
        item |= {k: previous[k] for k in ("probe", "latencyMs", "consecutive") if k in previous}
    if previous is not None and previous.get("state") == state and previous.get("since"):
        item["since"] = previous["since"]
    elif state == "Draining" or (previous is not None and previous.get("state") == "Draining") or not health.since:
        item["since"] = _iso(now)  # a drain or an undrain happens now; its health may be older
    else:
        item["since"] = _iso(health.since)
    return item


def desired_status(
    entry: ServiceEntry,
    views: Sequence[View],
    *,
    previous_conditions: Sequence[Mapping[str, Any]] = (),
    previous_endpoints: Sequence[Mapping[str, Any]] = (),
    now: float,
    served_by: str | None = None,
) -> Obj:
    """The entry's status. `previous_endpoints`: the per-endpoint items as last published (see
    `endpoint_status`). `served_by`: the replica that serves it (sharded mode), else omitted."""
    total = len(views)
    ready = sum(1 for v in views if v.ready)
    unknown = sum(1 for v in views if _state(v) == "Unknown")
    refused = [v for v in views if v.refused]
    unhealthy = [v for v in views if _state(v) == "Unhealthy" and not v.refused]
    partial = [v for v in views if v.ready and v.unhealthy_ports]
    draining = [v for v in views if v.endpoint.draining]
    held = [v for v in views if v.verdict is Reason.HELD]
    flapping = [v for v in views if v.verdict is Reason.FLAPPING]
    panicking = [v for v in views if v.verdict is Reason.PANIC]
    healthy = ready - len(panicking)  # READY shows the real health, also in panic
    hc = entry.spec.health_check
    floor = hc.min_healthy_percent if hc is not None else None
    extra: list[Condition] = []
    if floor:
        eligible = total - len(refused) - sum(1 for v in views if v.terminating)
        if panicking:
            extra.append(
                Condition(
                    "Panic",
                    "True",
                    "BelowFloor",
                    f"{healthy} of {eligible} endpoints are healthy, below the floor of {floor}%: publishing all of "
                    "them as ready",
                )
            )
        else:
            extra.append(Condition("Panic", "False", "AboveFloor", f"at or above the floor of {floor}% healthy"))
    if held:
        extra.append(
            Condition(
                "SelfPreservation",
                "True",
                "HeldBySelfPreservation",
                f"{len(held)} failing endpoints held ready, because most of the operator's probes fail at once (more "
                f"likely its own network than the backends): {_names(held)}",
            )
        )

    if total == 0:
        ready_c = Condition("Ready", "False", "NoEndpoints", "the entry has no endpoints to publish")
    elif panicking:
        ready_c = Condition(
            "Ready", "True", "Panic", f"{healthy} of {total} endpoints are healthy; all of them published (panic floor)"
        )
    elif held:
        ready_c = Condition(
            "Ready",
            "True",
            "HeldBySelfPreservation",
            f"{ready} of {total} endpoints published ready; {len(held)} of them failing, held by self-preservation",
        )
    elif flapping:
        ready_c = Condition(
            "Ready",
            "True" if ready else "False",
            "Flapping",
            f"{ready} of {total} endpoints are healthy; flapping, held not ready: {_names(flapping)}",
        )
    elif ready == total and partial:
        ready_c = Condition(
            "Ready", "True", "Degraded", f"all {total} endpoints are ready, {len(partial)} of them not on every port"
        )
    elif ready == total:
        ready_c = Condition("Ready", "True", "Healthy", f"all {total} endpoints are healthy")
    elif ready > 0 and ready + len(draining) == total:
        ready_c = Condition(
            "Ready", "True", "Draining", f"{ready} of {total} endpoints are healthy; draining: {_names(draining)}"
        )
    elif ready > 0:
        also = f"; draining: {_names(draining)}" if draining else ""
        ready_c = Condition("Ready", "True", "Degraded", f"{ready} of {total} endpoints are healthy{also}")
    elif len(draining) == total:
        ready_c = Condition("Ready", "False", "Draining", f"every endpoint is draining: {_names(draining)}")
    elif refused and len(refused) == total:
        ready_c = Condition("Ready", "False", "ProbeRefused", refused[0].refused or "")
    elif unknown and not unhealthy and not refused:
        ready_c = Condition("Ready", "Unknown", "Pending", f"{unknown} endpoints not probed yet")
    else:
        ready_c = Condition("Ready", "False", "Unhealthy", f"none of {total} endpoints is healthy")

    if refused:
        first = refused[0].refused or ""
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        degraded = Condition("Degraded", "True", "ProbeRefused", first + more)
    elif held:
        degraded = Condition("Degraded", "True", "HeldBySelfPreservation", f"held ready: {_names(held)}")
    elif flapping:
        degraded = Condition("Degraded", "True", "Flapping", f"flapping: {_names(flapping)}")
    elif unhealthy:
        # no probe detail here: it changes without a transition, and status is written only on transitions
        # (Events carry the detail of each transition)
        degraded = Condition("Degraded", "True", "EndpointsUnhealthy", f"unhealthy: {_names(unhealthy)}")
    elif partial:
        named = ", ".join(f"{v.endpoint.address} ({', '.join(v.unhealthy_ports)})" for v in partial[:5])
        more = f" and {len(partial) - 5} more" if len(partial) > 5 else ""
        degraded = Condition("Degraded", "True", "PortsUnhealthy", f"failing on some ports: {named}{more}")
    elif draining:  # taken out on purpose: not a degradation worth an alert
        degraded = Condition("Degraded", "False", "Draining", f"no endpoint is unhealthy; draining: {_names(draining)}")
    else:
        degraded = Condition("Degraded", "False", "AsExpected", "no endpoint is unhealthy")

    status: Obj = {
        "observedGeneration": entry.generation,
        "conditions": merge_conditions(
            previous_conditions, [ready_c, degraded, *extra], generation=entry.generation, now=now
        ),
        "readyEndpoints": ready,
        "healthyEndpoints": healthy,
        "totalEndpoints": total,
        "readySummary": f"{healthy}/{total}",
    }
    # every endpoint while few; above that the ones worth a look (not Healthy), so a drained or failing endpoint of
    # a big entry still shows; the EndpointSlices list the rest
    listed = views if total <= STATUS_ENDPOINTS_MAX else [v for v in views if _state(v) != "Healthy"]
    if total <= STATUS_ENDPOINTS_MAX or listed:
        before = {str(p.get("address")): p for p in previous_endpoints}
        status["endpoints"] = [
            endpoint_status(v, before.get(v.endpoint.address), now=now) for v in listed[:STATUS_ENDPOINTS_MAX]
        ]
    if served_by:
        status["servedBy"] = served_by
    return status


def status_changed(actual: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Compare two statuses ignoring the conditions' lastTransitionTime and the endpoints' `since` (which
    merge_conditions and endpoint_status preserve while nothing else of theirs changes)."""
    if not actual:
        return True

    def strip(status: Mapping[str, Any]) -> Obj:
        out = dict(status)
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
        ]
        if "endpoints" in status:
            out["endpoints"] = [{k: v for k, v in e.items() if k != "since"} for e in status["endpoints"] or []]
        return out

    return strip(actual) != strip(desired)


# ---------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class RegistryRecord:
    """One service in the namespace's registry: what a client needs to connect to its healthy endpoints."""

    name: str
    body: Obj = field(hash=False)


def registry_record(entry: ServiceEntry, views: Sequence[View], *, tags: Mapping[str, str]) -> RegistryRecord:
    healthy = []
    for v in views:
        if not v.ready:
            continue
        ep = v.endpoint
        ports = _published_port_map(v) if v.port_health else ep.ports
        item: Obj = {"address": ep.address, "ports": dict(sorted(ports.items()))}
        if v.port_health:  # every port's check verdict, the failing ones included
            item["portHealth"] = {p: v.port_status(p).value for p in v.port_names}
        if ep.zone:
            item["zone"] = ep.zone
        if ep.hostname:
            item["hostname"] = ep.hostname
        if ep.labels:
            item["labels"] = dict(sorted(ep.labels.items()))
        if ep.pod:
            item["pod"] = ep.pod
        healthy.append(item)
    body: Obj = {
        "ports": [
            {"name": p.name, "port": p.port, "protocol": p.protocol}
            | ({"appProtocol": p.app_protocol} if p.app_protocol else {})
            for p in entry.spec.ports
        ],
        "tags": dict(sorted(tags.items())),
        "headless": entry.spec.headless,
        "dns": f"{entry.name}.{entry.namespace}.svc",
        "endpoints": healthy,
        "readyEndpoints": len(healthy),
        "totalEndpoints": len(views),
    }
    if any(v.verdict is Reason.PANIC for v in views):  # every endpoint is listed, healthy or not
        body["panic"] = True
    flapping = [v.endpoint.address for v in views if v.verdict is Reason.FLAPPING]
    if flapping:
        body["flapping"] = flapping
    return RegistryRecord(name=entry.name, body=body)
