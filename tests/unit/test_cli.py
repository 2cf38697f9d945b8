"""The operator's command line: --shard builds the sharded options (identity from POD_NAME, Leases in
POD_NAMESPACE), and --shard and --peering exclude each other."""

from __future__ import annotations

import pytest

import beacon.__main__ as cli
import beacon.app as app
from beacon.operator_runtime import Options, ShardOptions


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
