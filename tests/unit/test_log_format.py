"""`--log-format json|plain`: JSON gives one object per line with the fields event, namespace, entry and endpoint on
transition, drain, write and error lines; plain keeps the human lines exactly as they were."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

import beacon.__main__ as cli
import beacon.app as app
from beacon.logfields import fields, key_fields
from beacon.operator_runtime import Options
from beacon.workqueue import WorkQueue


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    filters = [list(h.filters) for h in handlers]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    for handler, kept in zip(handlers, filters, strict=True):
        handler.filters[:] = kept
    logging.captureWarnings(False)


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> Options:
    seen: list[Options] = []
    monkeypatch.setattr(app, "run", seen.append)
    assert cli.main(["operator", "--metrics-port", "0", *argv]) == 0
    return seen[0]


def transition_line() -> None:
    logging.getLogger("beacon.discovery").info(
        "%s/%s: %s",
        "shop",
        "payments",
        "endpoint 198.18.0.10: passing -> critical (connection refused)",
        extra=fields("transition", namespace="shop", entry="payments", endpoint=["198.18.0.10"], to="critical"),
    )


def test_json_lines_are_objects_with_the_entry_fields(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(monkeypatch, "--log-format", "json")
    transition_line()
    logging.getLogger("beacon").info("beacon is active")
    lines = capsys.readouterr().err.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is JSON
    first = parsed[0]
    assert first["message"] == "shop/payments: endpoint 198.18.0.10: passing -> critical (connection refused)"
    assert (first["event"], first["namespace"], first["entry"], first["endpoint"]) == (
        "transition",
        "shop",
        "payments",
        "198.18.0.10",
    )
    assert (first["severity"], first["logger"], first["to"]) == ("info", "beacon.discovery", "critical")
    assert "timestamp" in first
    assert parsed[1]["message"] == "beacon is active"


def test_plain_lines_look_as_they_always_did(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(monkeypatch)  # plain is the default
    transition_line()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("[")
    message = "shop/payments: endpoint 198.18.0.10: passing -> critical (connection refused)"
    assert line.endswith(f"] beacon.discovery     [INFO    ] {message}")
    assert "{" not in line, "no extras in the plain format"


def test_the_format_comes_from_the_environment_too_and_bad_values_are_refused(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEACON_LOG_FORMAT", "json")
    run_cli(monkeypatch)
    transition_line()
    assert json.loads(capsys.readouterr().err.splitlines()[0])["entry"] == "payments"
    with pytest.raises(SystemExit):
        cli.main(["operator", "--log-format", "yaml"])
    assert "invalid choice: 'yaml'" in capsys.readouterr().err


def test_python_warnings_are_json_lines_too(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    run_cli(monkeypatch, "--log-format=json")
    warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
    (line,) = capsys.readouterr().err.splitlines()
    assert "something deprecated" in json.loads(line)["message"]


def test_fields_join_several_endpoints_and_name_work_queue_keys() -> None:
    assert fields("transition", namespace="ns", entry="a", endpoint=["198.18.0.1", "198.18.0.2"]) == {
        "event": "transition",
        "namespace": "ns",
        "entry": "a",
        "endpoint": "198.18.0.1,198.18.0.2",
    }
    assert fields("write", namespace="ns", endpoint=[])["endpoint"] is None
    assert key_fields("error", ("ns", "a"))["entry"] == "a"
    assert key_fields("error", ("Deployment", "ns", "web")) | {"event": "-"} == {
        "event": "-",
        "namespace": "ns",
        "entry": "web",
        "endpoint": None,
    }
    assert key_fields("error", "ns")["namespace"] == "ns"
    assert key_fields("error", 7)["namespace"] is None


async def test_a_failed_reconcile_logs_an_error_line_with_the_entry_fields(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from beacon.retries import Retries

    caplog.set_level(logging.WARNING, logger="beacon.workqueue")

    async def fail(key: tuple[str, str]) -> None:
        raise RuntimeError("apiserver said no")

    queue: WorkQueue[tuple[str, str]] = WorkQueue(name="ServiceEntry", process=fail, retries=Retries(base=5.0))
    queue.schedule(("shop", "payments"))
    for _ in range(10):
        await asyncio.sleep(0)
    await queue.close()
    (record,) = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert (record.event, record.namespace, record.entry, record.endpoint, record.kind) == (  # type: ignore[attr-defined]
        "error",
        "shop",
        "payments",
        None,
        "ServiceEntry",
    )


def test_kopfs_object_lines_get_the_entry_fields_too(
    logging_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kopf
    from kopf._core.actions.loggers import ObjectLogger

    run_cli(monkeypatch, "--log-format", "json")
    body = {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": "payments", "namespace": "shop", "uid": "u"},
    }
    ObjectLogger(body=kopf.Body(body), settings=kopf.OperatorSettings()).error("Handler 'x' failed: boom")
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (line["namespace"], line["entry"], line["endpoint"], line["severity"]) == ("shop", "payments", None, "error")
    assert line["object"]["kind"] == "ServiceEntry"
