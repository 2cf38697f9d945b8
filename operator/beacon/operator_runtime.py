"""The running operator: settings from the command line, the engines' lifetimes, /metrics, and `kopf.operator`.

Why it exists: the handlers must stay thin, so something else builds the long-lived objects (API client, probe
checker with its connection pools, the prober task, the discovery engine, the metrics server), ties their
lifetimes to kopf's startup/cleanup, and runs kopf. It is also where the few operator-level settings live
(probe policy, concurrency, ports), so `python -m beacon operator --help` documents them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from beacon import metrics
from beacon.checks import Checker
from beacon.discovery import Discovery
from beacon.kube import Kube
from beacon.policy import ProbePolicy
from beacon.registry import LABEL_REGISTRY
from beacon.targets import ProbeResult, Target

log = logging.getLogger("beacon")


@dataclass
class Options:
    metrics_address: str = "0.0.0.0"  # noqa: S104 - metrics are meant to be scraped from other pods
    metrics_port: int = 9090
    liveness_port: int = 8081
    allow_probe_cidrs: tuple[str, ...] = ()
    probe_concurrency: int = 64
    namespaces: tuple[str, ...] = ()
    standalone: bool = True
    peering_name: str = "beacon"


@dataclass
class Runtime:
    options: Options
    _discovery: Discovery | None = None
    _checker: Checker | None = None
    _kube: Kube | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None

    @property
    def discovery(self) -> Discovery:
        if self._discovery is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self._discovery

    async def start(self) -> None:
        self._kube = Kube.from_environment()
        policy = ProbePolicy.with_allowed(self.options.allow_probe_cidrs)
        discovery_ref: list[Discovery] = []
        self._checker = Checker(
            policy=policy,
            leases=lambda ns, name: discovery_ref[0].lease_lookup(ns, name),
            connection_limit=self.options.probe_concurrency * 2,
        )
        await self._checker.__aenter__()
        checker = self._checker

        async def probe(target: Target) -> ProbeResult:
            return await checker.run(target)

        discovery = Discovery(kube=self._kube, probe=probe, concurrency=self.options.probe_concurrency)
        discovery_ref.append(discovery)
        self._discovery = discovery
        self._tasks.append(asyncio.create_task(discovery.prober.run(), name="beacon-prober"))
        self._tasks.append(asyncio.create_task(self._gauges(), name="beacon-gauges"))
        if self.options.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.options.metrics_port, addr=self.options.metrics_address, registry=metrics.REGISTRY
            )
        await self._resync_registries()
        log.info(
            "beacon started: metrics on :%s, liveness on :%s", self.options.metrics_port, self.options.liveness_port
        )

    async def _resync_registries(self) -> None:
        """Know every entry before writing registries; remove registries of namespaces that lost all entries
        while the operator was down."""
        assert self._kube is not None
        assert self._discovery is not None
        entries = await self._kube.request("GET", "/apis/beacon.dev/v1alpha1/serviceentries")
        self._discovery.expect(
            {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in (entries or {}).get("items", [])}
        )
        result = await self._kube.request(
            "GET", "/api/v1/configmaps", query=[("labelSelector", f"{LABEL_REGISTRY}=true")]
        )
        for ns in sorted({i["metadata"]["namespace"] for i in (result or {}).get("items", [])}):
            await self._discovery.registry_resync(ns)

    async def _gauges(self) -> None:
        while True:
            if self._discovery is not None:
                metrics.QUEUE_DEPTH.set(self._discovery.prober.queue_depth)
            await asyncio.sleep(1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._discovery is not None:
            await self._discovery.close()
        if self._checker is not None:
            await self._checker.__aexit__(None, None, None)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._kube is not None:
            self._kube.close()


def runtime_of(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


def run(options: Options, *, stop_flag: threading.Event | None = None) -> None:
    """Run the operator until SIGINT/SIGTERM (kopf handles both) or `stop_flag`."""
    import beacon.handlers  # noqa: F401 - registers the handlers with kopf's default registry

    memo = kopf.Memo()
    memo["runtime"] = Runtime(options=options)
    asyncio.run(
        kopf.operator(
            clusterwide=not options.namespaces,
            namespaces=list(options.namespaces),
            liveness_endpoint=f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None,
            standalone=options.standalone,
            # kopf makes peering mandatory whenever a peering name is given, so only name it when peering is on
            peering_name=None if options.standalone else options.peering_name,
            memo=memo,
            stop_flag=stop_flag,
        )
    )
