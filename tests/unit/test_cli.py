"""The operator's command line: --shard builds the sharded options (identity from POD_NAME, Leases in
POD_NAMESPACE), --shard and --peering exclude each other, and the connection-loss hint flags build the hint
policy (--no-hints turns hints off)."""

from __future__ import annotations

import pytest

import beacon.__main__ as cli
import beacon.app as app
from beacon.operator_runtime import Options, ShardOptions
from beacon.prober import HintPolicy


def test_shard_flags_build_the_shard_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Options] = []
    monkeypatch.setattr(app, "run", seen.append)
    monkeypatch.setenv("POD_NAME", "beacon-operator-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "platform")
    assert cli.main(["operator", "--metrics-port", "0", "--shard", "--shard-lease-seconds", "6"]) == 0
    assert seen[0].shard == ShardOptions(
        identity="beacon-operator-7d9f-abcde", namespace="platform", group="beacon", lease_seconds=6.0
    )
    assert cli.main(["operator", "--metrics-port", "0"]) == 0
    assert seen[1].shard is None


def test_shard_and_peering_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["operator", "--shard", "--peering"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_hint_flags_build_the_hint_policy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Options] = []
    monkeypatch.setattr(app, "run", seen.append)
    assert cli.main(["operator", "--metrics-port", "0"]) == 0
    assert seen[0].connection_loss_hints is True
    assert seen[0].hint_policy == HintPolicy()
    argv = ["--hint-reprobe-seconds", "0.25", "--hint-gap-seconds", "0", "--hint-rate", "50", "--hint-burst", "80"]
    assert cli.main(["operator", "--metrics-port", "0", "--no-hints", *argv]) == 0
    assert seen[1].connection_loss_hints is False
    assert seen[1].hint_policy == HintPolicy(reprobe_seconds=0.25, gap_seconds=0.0, rate=50.0, burst=80)
    for bad in (["--hint-rate", "0"], ["--hint-reprobe-seconds", "nan"], ["--hint-burst", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["operator", *bad])
    assert "--hint-burst" in capsys.readouterr().err
