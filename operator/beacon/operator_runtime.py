"""The running operator: settings from the command line, the engines' lifetimes, /metrics, and `kopf.operator`.

Why it exists: the handlers must stay thin, so something else builds the long-lived objects (API client, probe
checker with its connection pools, the prober task, the discovery engine, the metrics server), ties their
lifetimes to kopf's startup/cleanup, and runs kopf. It is also where the few operator-level settings live
(probe policy, concurrency, ports), so `python -m beacon operator --help` documents them all.

Connection-loss hints are wired here, as `forget` is: the checker sees a peer close an idle probe connection and
tells its `hint` sink, which is the prober's `hint(address, port)` (the prober then probes that endpoint's targets;
see prober.py). The hint policy (re-probe spacing, per-endpoint gap, global rate and burst) comes from the
--hint-* flags; --no-hints leaves the checker without a sink, so it watches and holds nothing. The
self-preservation policy (--self-preservation*) goes to discovery, whose `tick` the gauge loop calls every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from beacon import metrics
from beacon.checks import Checker
from beacon.configs import Configs, ReloadPolicy
from beacon.discovery import Discovery
from beacon.failsafe import SelfPreservationPolicy
from beacon.kube import Kube
from beacon.policy import ProbePolicy
from beacon.prober import HintPolicy
from beacon.registry import LABEL_REGISTRY
from beacon.retries import RETRIES
from beacon.sharding import owner
from beacon.shards import Member
from beacon.targets import ProbeResult, Target

log = logging.getLogger("beacon")

# kube-controller-manager's leader-election lease is 15 s; the same here bounds a takeover after a crash (a clean
# exit hands over at once). kopf renews every lifetime minus 5-10 s, i.e. every 5-10 s per replica.
PEERING_LIFETIME = 15


def start_priority(now: float | None = None) -> int:
    """A kopf peering priority that is higher the earlier the replica started (millisecond resolution, plus a
    random tie-breaker): the oldest live replica leads, a restarted or newly scheduled one never preempts a
    healthy leader, and two replicas never share a priority (kopf pauses every replica of an equal-priority
    pair)."""
    started_ms = int((time.time() if now is None else now) * 1000)
    return (10**13 - started_ms) * 100 + secrets.randbelow(100)


@dataclass(frozen=True)
class ShardOptions:
    """--shard: this replica is one of several active ones, each serving the namespaces rendezvous hashing gives
    it (beacon.shards), coordinated by one Lease per replica in `namespace`."""

    identity: str
    namespace: str
    group: str = "beacon"
    lease_seconds: float = 10.0
    renew_seconds: float = 2.0


@dataclass
class Options:
    metrics_address: str = "0.0.0.0"  # noqa: S104 - metrics are meant to be scraped from other pods
    metrics_port: int = 9090
    liveness_port: int = 8081
    allow_probe_cidrs: tuple[str, ...] = ()
    probe_concurrency: int = 64
    resync_seconds: float = 60.0  # periodic read-only comparison with the API (repairs gaps after 410 Gone)
    namespaces: tuple[str, ...] = ()
    standalone: bool = True
    peering_name: str = "beacon"
    # ConfigEntry reloads: --reload-debounce, --reload-max-delay, --reload-rate-limit
    reload_policy: ReloadPolicy = field(default_factory=ReloadPolicy)
    # seconds a replica's keep-alive stays valid: how long a standby waits after the leader stopped renewing it
    peering_lifetime: int = PEERING_LIFETIME
    peering_priority: int | None = None  # None: derived from the start time, so the oldest replica leads
    uvloop: bool = True  # run on uvloop (the probe path's event loop); --no-uvloop: asyncio's own loop
    shard: ShardOptions | None = None  # --shard: sharded, active-active (see ShardOptions)
    connection_loss_hints: bool = True  # --no-hints: False (no probe on a lost connection, anywhere)
    # --hint-reprobe-seconds, --hint-gap-seconds, --hint-rate, --hint-burst
    hint_policy: HintPolicy = field(default_factory=HintPolicy)
    # --self-preservation and its --self-preservation-* flags
    self_preservation: SelfPreservationPolicy = field(default_factory=SelfPreservationPolicy)


@dataclass
class Runtime:
    options: Options
    _discovery: Discovery | None = None
    _configs: Configs | None = None
    _checker: Checker | None = None
    _kube: Kube | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None
    _active: bool = False
    _activation: asyncio.Lock = field(default_factory=asyncio.Lock)
    _member: Member | None = None
    _adopting: asyncio.Task[None] | None = None
    _adopt_again: bool = False

    @property
    def discovery(self) -> Discovery:
        if self._discovery is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self._discovery

    @property
    def configs(self) -> Configs:
        if self._configs is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self._configs

    def failure(self) -> str | None:
        """Why the operator cannot do its job any more (a task that must run forever has ended), else None. The
        liveness endpoint fails with this, so Kubernetes restarts the pod instead of keeping a beacon that no
        longer probes anything."""
        for task in self._tasks:  # all of them run until stop(): the prober, the gauges, the resyncs
            if not task.done():
                continue
            if task.cancelled():
                why = "cancelled"
            else:
                exc = task.exception()
                why = f"{type(exc).__name__}: {exc}" if exc is not None else "returned"
            return f"task {task.get_name()} stopped ({why})"
        return None

    async def start(self) -> None:
        self._kube = Kube.from_environment()
        serves: Callable[[str], bool] | None = None
        shard = self.options.shard
        if shard is not None:
            self._member = Member(
                kube=self._kube,
                identity=shard.identity,
                namespace=shard.namespace,
                group=shard.group,
                duration=shard.lease_seconds,
                renew_every=shard.renew_seconds,
                on_release=self._release,
                on_acquire=self._acquired,
            )
            self._kube.fence = self._member.may_write  # every write checks this replica's Lease first
            serves = self._member.serves
        policy = ProbePolicy.with_allowed(self.options.allow_probe_cidrs)
        discovery_ref: list[Discovery] = []

        def hint(address: str, port: int) -> None:
            if discovery_ref:
                discovery_ref[0].prober.hint(address, port)

        self._checker = Checker(
            policy=policy,
            leases=lambda ns, name: discovery_ref[0].lease_lookup(ns, name),
            connection_limit=self.options.probe_concurrency * 2,
            hint=hint if self.options.connection_loss_hints else None,
        )
        await self._checker.__aenter__()
        checker = self._checker

        async def probe(target: Target) -> ProbeResult:
            return await checker.run(target)

        discovery = Discovery(
            kube=self._kube,
            probe=probe,
            concurrency=self.options.probe_concurrency,
            namespaces=self.options.namespaces,
            forget=checker.forget,
            serves=serves,
            served_by=shard.identity if shard is not None else None,
            hints=self.options.hint_policy,
            self_preservation=self.options.self_preservation,
        )
        discovery_ref.append(discovery)
        self._discovery = discovery
        self._tasks.append(asyncio.create_task(discovery.prober.run(), name="beacon-prober"))
        self._tasks.append(asyncio.create_task(self._gauges(), name="beacon-gauges"))
        if self.options.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.options.metrics_port, addr=self.options.metrics_address, registry=metrics.REGISTRY
            )
        self._configs = Configs(
            kube=self._kube,
            policy=self.options.reload_policy,
            serves=serves,
            served_by=shard.identity if shard is not None else None,
        )
        log.info(
            "beacon started: metrics on :%s, liveness on :%s, event loop %s",
            self.options.metrics_port,
            self.options.liveness_port,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if self._member is not None:
            await self._member.start()
            self._tasks.append(asyncio.create_task(self._member.run(), name="beacon-shard-member"))
            log.info(
                "shard %s: a member of group %r (Leases in %s); serving nothing until the group agrees",
                self._member.identity,
                self._member.group,
                self._member.namespace,
            )
        if self.options.standalone:
            await self.activate()
        else:
            log.info("peering %r: standing by until kopf makes this replica the active one", self.options.peering_name)

    async def activate(self) -> None:
        """Start the work that writes: the start-up listings (ConfigEntries, registries) and the periodic resync.

        Standalone, this runs at start-up. With --peering it must not: a standby replica would rewrite registries
        and materialise ConfigEntries alongside the active one. kopf has no "resumed" hook, but it delivers no
        watch event at all while a replica is paused, so the handlers call this before handling any event (and
        the peering object's own first event, see `beacon.handlers.watch_peering`, calls it even in a cluster
        with nothing else to watch). It runs once, retrying the listings until the API answers: the event that
        triggered it must not be dropped (kopf does not retry raw event handlers).
        """
        async with self._activation:
            if self._active:
                return
            assert self._configs is not None
            assert self._discovery is not None
            while True:
                try:
                    await self._configs.start(namespaces=self.options.namespaces)
                    await self._configs.list_workloads()
                    await self._resync_registries()
                    RETRIES.forget("start-up listings")
                    break
                except Exception as exc:  # the API is unreachable or not ready: nothing can proceed without it
                    wait = RETRIES.when("start-up listings")
                    log.warning("start-up listings failed, retrying in %.1fs: %s", wait, exc)
                    await asyncio.sleep(wait)
            if self.options.resync_seconds > 0:
                resync = self._configs.resync_forever(every=self.options.resync_seconds)
                self._tasks.append(asyncio.create_task(resync, name="beacon-configs-resync"))
                self._tasks.append(
                    asyncio.create_task(
                        self._discovery.resync_forever(every=self.options.resync_seconds), name="beacon-resync"
                    )
                )
            self._discovery.watch_outputs()
            self._configs.watch_outputs()
            self._active = True
            log.info("beacon is active")

    # ------------------------------------------------------------------ sharded mode
    async def _release(self, view: frozenset[str]) -> None:
        """Before this replica announces `view`: let go of the namespaces it gives to another member."""
        assert self._member is not None
        me = self._member.identity

        def keep(namespace: str) -> bool:
            return owner(namespace, view) == me

        released: set[str] = set()
        if self._discovery is not None:
            released |= await self._discovery.release(keep)
        if self._configs is not None:
            released |= await self._configs.release(keep)
        if released:
            metrics.SHARD_HANDOVERS.labels(direction="released").inc(len(released))
            log.info("shard %s: released %d namespaces: %s", me, len(released), ", ".join(sorted(released)))

    def _acquired(self) -> None:
        """The group agreed on a view: serve what it gives this replica (list and adopt what is new)."""
        if self._adopting is not None and not self._adopting.done():
            self._adopt_again = True
            return
        self._adopting = asyncio.ensure_future(self._adopt())

    async def _adopt(self) -> None:
        assert self._member is not None
        while True:
            self._adopt_again = False
            try:
                await self._adopt_once()
                RETRIES.forget("shard adoption")
            except Exception as exc:  # the API unreachable: try again (the namespaces are served meanwhile)
                wait = RETRIES.when("shard adoption")
                log.warning("shard %s: adopting failed, retrying in %.1fs: %s", self._member.identity, wait, exc)
                await asyncio.sleep(wait)
                self._adopt_again = True
            if not self._adopt_again:
                return

    async def _adopt_once(self) -> None:
        """List every entry and workload and take those of the namespaces served now (the held ones are known
        already and cost a comparison). A new entry seeds its health from the published EndpointSlices, as after
        a restart: a handover never turns a healthy endpoint not-ready."""
        assert self._kube is not None
        assert self._discovery is not None
        assert self._configs is not None
        assert self._member is not None
        await self.activate()  # once: after it, the listings below find what this replica serves
        before = self._discovery.held_namespaces()
        await self._configs.start(namespaces=self.options.namespaces)
        entries = await self._resync_registries()
        for body in entries:
            await self._discovery.entry_changed(body)
        await self._configs.list_workloads()
        gained = self._discovery.held_namespaces() - before
        if gained:
            metrics.SHARD_HANDOVERS.labels(direction="acquired").inc(len(gained))
            log.info(
                "shard %s: serving %d more namespaces: %s",
                self._member.identity,
                len(gained),
                ", ".join(sorted(gained)),
            )

    def _serves(self, namespace: str) -> bool:
        """Whether this replica serves `namespace`: among the watched ones and, sharded, given to it."""
        wanted = self.options.namespaces
        if wanted and namespace not in wanted:
            return False
        return self._member is None or self._member.serves(namespace)

    async def _resync_registries(self) -> list[dict[str, Any]]:
        """Know every entry before writing registries; remove registries of namespaces that lost all entries
        while the operator was down. Returns the ServiceEntries of the namespaces served."""
        assert self._kube is not None
        assert self._discovery is not None
        listed = await self._kube.request("GET", "/apis/beacon.dev/v1alpha1/serviceentries")
        entries = [i for i in (listed or {}).get("items", []) if self._serves(i["metadata"]["namespace"])]
        self._discovery.expect({(i["metadata"]["namespace"], i["metadata"]["name"]) for i in entries})
        result = await self._kube.request(
            "GET", "/api/v1/configmaps", query=[("labelSelector", f"{LABEL_REGISTRY}=true")]
        )
        for ns in sorted({i["metadata"]["namespace"] for i in (result or {}).get("items", [])}):
            if self._serves(ns):
                await self._discovery.registry_resync(ns)
        return entries

    async def _gauges(self) -> None:
        while True:
            if self._discovery is not None:
                metrics.QUEUE_DEPTH.set(self._discovery.prober.queue_depth)
                self._discovery.tick()
            if self._member is not None and self._discovery is not None:
                metrics.SHARD_MEMBERS.set(len(self._member.view))
                metrics.SHARD_NAMESPACES.set(len(self._discovery.held_namespaces()))
            await asyncio.sleep(1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._discovery is not None:
            await self._discovery.close()
        if self._configs is not None:
            await self._configs.close()
        if self._checker is not None:
            await self._checker.__aexit__(None, None, None)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._kube is not None:
            await self._kube.aclose()


class HandlerSuccessAtDebug(logging.Filter):
    """kopf logs "Handler '...' succeeded." at INFO after every handler call, i.e. once per watch event (10,779
    lines in 4 minutes at 10,000 endpoints), drowning the lines that matter. This filter, on kopf's object
    logger, turns those lines into DEBUG records: shown with `-v` (kopf's verbose mode logs DEBUG), dropped
    otherwise. Everything else (failures, retries, beacon's own transition lines) keeps its level."""

    _SUCCEEDED = re.compile(r"Handler .+ succeeded\.")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._SUCCEEDED.fullmatch(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


KOPF_OBJECT_LOGGER = "kopf.objects"


def quiet_handler_logs() -> None:
    """Install HandlerSuccessAtDebug on kopf's object logger (once)."""
    logger = logging.getLogger(KOPF_OBJECT_LOGGER)
    if not any(isinstance(f, HandlerSuccessAtDebug) for f in logger.filters):
        logger.addFilter(HandlerSuccessAtDebug())


def runtime_of(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


def loop_factory(*, uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when asked for and installed (it cuts the event loop's share of each probe, see
    bench/bench_probe.py), else asyncio's default."""
    if uvloop:
        try:
            import uvloop as uv
        except ImportError:  # pragma: no cover - a dependency; a stripped install still runs
            log.warning("uvloop is not installed: running on asyncio's own event loop")
            return None
        return uv.new_event_loop
    return None


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one: the prober keeps one idle connection per endpoint."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
