"""The operator's event loop: uvloop by default, asyncio's own with `--no-uvloop` or BEACON_UVLOOP=0."""

from __future__ import annotations

import pytest
import uvloop

from beacon.operator_runtime import loop_factory


def test_uvloop_by_default_and_asyncios_loop_on_request() -> None:
    factory = loop_factory(uvloop=True)
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert loop_factory(uvloop=False) is None  # asyncio.Runner's default loop


@pytest.mark.parametrize(
    ("argv", "env", "uvloop_on"), [([], None, True), (["--no-uvloop"], None, False), ([], "0", False)]
)
def test_the_flag_and_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, uvloop_on: bool
) -> None:
    import beacon.__main__ as cli
    import beacon.app as app

    if env is not None:
        monkeypatch.setenv("BEACON_UVLOOP", env)
    seen: list[bool] = []
    monkeypatch.setattr(app, "run", lambda options: seen.append(options.uvloop))
    assert cli.main(["operator", "--metrics-port", "0", *argv]) == 0
    assert seen == [uvloop_on]
