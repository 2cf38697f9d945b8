"""Finding the control-plane binaries that tools/k8s/build.sh builds and caches.

Why it exists: the cluster code must not guess where binaries live. They come from, in order: the
BEACON_BIN_DIR environment variable, or the repository's own build script (which builds on a cold cache and
answers in a second on a warm one). Anything missing is reported by name with the command that fixes it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "coredns")


class BinariesMissingError(RuntimeError):
    """The control-plane binaries are not available."""


def repo_root() -> Path | None:
    """The checkout this package runs from, when it runs from one (dev/beacon_dev/devcluster/ -> repo)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "tools" / "k8s" / "build.sh").is_file() else None


def find_bin_dir(*, build: bool = True) -> Path:
    """Return the directory holding all of REQUIRED, building them through tools/k8s/build.sh if allowed."""
    env = os.environ.get("BEACON_BIN_DIR")
    if env:
        directory = Path(env)
    else:
        root = repo_root()
        if root is None:
            raise BinariesMissingError(
                "set BEACON_BIN_DIR to a directory with etcd, kube-apiserver, kube-controller-manager, kubectl "
                "and coredns (`make control-plane` in a beacon checkout builds them)"
            )
        script = root / "tools" / "k8s" / "build.sh"
        if not build:
            raise BinariesMissingError(f"control-plane binaries not located; run `make control-plane` ({script})")
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise BinariesMissingError(f"`bash {script}` failed with exit code {proc.returncode}; see its output")
        directory = Path(proc.stdout.strip().splitlines()[-1])
    missing = [name for name in REQUIRED if not os.access(directory / name, os.X_OK)]
    if missing:
        raise BinariesMissingError(f"{directory} lacks {', '.join(missing)}; run `make control-plane`")
    return directory
