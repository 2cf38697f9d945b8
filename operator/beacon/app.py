"""The operator assembled: beacon's handlers registered with kopf, the runtime in kopf's memo, kopf's loop running.

Why it exists: it is the one place that knows both the handlers and the runtime they call. The handlers import
the runtime (to reach the engines kept in the memo); the runtime knows nothing of the handlers. Registering the
handlers is a side effect of importing `beacon.handlers`, which happens here, at the top of the layers.
"""

from __future__ import annotations

import asyncio
import threading

import kopf

from beacon import handlers
from beacon.operator_runtime import (
    Options,
    Runtime,
    log,
    loop_factory,
    quiet_handler_logs,
    raise_open_files_limit,
    start_priority,
)


def run(options: Options, *, stop_flag: threading.Event | None = None) -> None:
    """Run the operator until SIGINT/SIGTERM (kopf handles both) or `stop_flag`."""
    quiet_handler_logs()

    if not options.standalone:
        handlers.watch_peering(name=options.peering_name, clusterwide=not options.namespaces)

    memo = kopf.Memo()
    memo["runtime"] = Runtime(options=options)
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = options.peering_lifetime
    priority = options.peering_priority if options.peering_priority is not None else start_priority()
    if not options.standalone:
        log.info("peering %r: priority %d, lifetime %ds", options.peering_name, priority, options.peering_lifetime)
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=loop_factory(uvloop=options.uvloop)) as runner:
        runner.run(
            kopf.operator(
                settings=settings,
                priority=priority,
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
