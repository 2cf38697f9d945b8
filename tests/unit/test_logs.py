"""Quiet logs: kopf's per-event "Handler ... succeeded." line is DEBUG (shown with -v), the rest keeps its level."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import kopf
import pytest
from kopf._core.actions import execution
from kopf._core.actions.loggers import ObjectLogger
from kopf._core.intents.handlers import WatchingHandler

from beacon.operator_runtime import KOPF_OBJECT_LOGGER, HandlerSuccessAtDebug, quiet_handler_logs

BODY = kopf.Body({"apiVersion": "beacon.dev/v1alpha1", "kind": "ServiceEntry", "metadata": {"name": "a", "uid": "u"}})


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    objects = logging.getLogger(KOPF_OBJECT_LOGGER)
    level, handlers, filters = root.level, list(root.handlers), list(objects.filters)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    objects.filters[:] = filters


def log_as_kopf_does(*, verbose: bool, capsys: pytest.CaptureFixture[str]) -> str:
    """Configure logging as `python -m beacon operator [-v]` does, then log what kopf logs around a handler."""
    kopf.configure(verbose=verbose, log_prefix=False)
    quiet_handler_logs()
    quiet_handler_logs()  # idempotent
    logger = ObjectLogger(body=BODY, settings=kopf.OperatorSettings())
    handler = execution.Handler.__str__(SimpleNamespace(id="serviceentry_event"))  # type: ignore[arg-type]
    logger.info(f"{handler} succeeded.")
    logger.info("Handler-ish line that is not kopf's success line")
    logger.exception(f"{handler} failed with an exception and will try again in 10 seconds: boom")
    logging.getLogger("beacon.discovery").info("ns/a: endpoint 198.18.0.10: passing -> critical (refused)")
    logging.getLogger("beacon.workqueue").warning("ServiceEntry ('ns', 'a') failed, retrying in 1s: 500")
    return capsys.readouterr().err


def test_handler_success_lines_are_debug_by_default(logging_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = log_as_kopf_does(verbose=False, capsys=capsys)
    assert "succeeded" not in out
    assert "[INFO    ] Handler-ish line that is not kopf's success line" in out
    assert "[ERROR   ] Handler 'serviceentry_event' failed with an exception" in out
    assert "[INFO    ] ns/a: endpoint 198.18.0.10: passing -> critical" in out
    assert "[WARNING ] ServiceEntry ('ns', 'a') failed, retrying" in out
    assert len(logging.getLogger(KOPF_OBJECT_LOGGER).filters) == 1


def test_verbose_brings_the_success_lines_back(logging_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = log_as_kopf_does(verbose=True, capsys=capsys)
    assert "[DEBUG   ] Handler 'serviceentry_event' succeeded." in out
    assert "[INFO    ] ns/a: endpoint 198.18.0.10: passing -> critical" in out


def test_the_filter_matches_the_line_kopf_really_logs() -> None:
    """A kopf upgrade that rewords the line would silently bring the noise back: pin the wording."""
    assert 'logger.info(f"{handler} succeeded.")' in inspect.getsource(execution)
    assert WatchingHandler.__str__ is execution.Handler.__str__  # what @kopf.on.event registers
    assert execution.Handler.__str__(SimpleNamespace(id="x/y")) == "Handler 'x/y'"  # type: ignore[arg-type]
    record = logging.LogRecord(KOPF_OBJECT_LOGGER, logging.INFO, __file__, 1, "Handler 'x/y' succeeded.", None, None)
    HandlerSuccessAtDebug().filter(record)
    assert record.levelno == logging.DEBUG
