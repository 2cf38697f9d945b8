"""`make run` (python -m beacon_dev run) without KUBECONFIG: local control plane, operator, live examples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import eventually

pytestmark = [pytest.mark.integration, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]


def test_make_run_shows_live_ready_counts_and_cleans_up(tmp_path: Path, cluster: DevCluster) -> None:
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["BEACON_BIN_DIR"] = str(cluster.bin_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "beacon_dev", "run", "--random-ports", "--dir", str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        else:
            pytest.fail("make run never became ready:\n" + "".join(lines))
        text = "".join(lines)
        assert f"export KUBECONFIG={workdir / 'admin.kubeconfig'}" in text
        assert "kubectl get beacon -A" in text
        kubectl = [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={workdir / 'admin.kubeconfig'}"]

        def ready() -> str | None:
            out = subprocess.run(
                [*kubectl, "get", "serviceentries", "-n", "shop", "-o", "json"], capture_output=True, text=True
            )
            if out.returncode != 0:
                return None
            items = json.loads(out.stdout)["items"]
            summary = items[0].get("status", {}).get("readySummary") if items else None
            return summary if summary == "2/2" else None

        eventually(ready, timeout=60, what="payments READY 2/2 in the demo")
        table = subprocess.run([*kubectl, "get", "beacon", "-A"], capture_output=True, text=True).stdout
        assert "payments" in table
        assert "2/2" in table
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not workdir.exists()
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bcn-{proc.pid}-" not in namespaces
