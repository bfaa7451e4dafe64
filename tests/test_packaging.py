"""The wheel: built from a copy of the sources, it holds every package, the gRPC contract and its stubs,
nothing else, and works installed on its own (imported from the install, not from this checkout).

Offline and quick: `pip wheel --no-build-isolation --no-index` builds with the setuptools at hand, and
the install is `--no-deps --target` beside the environment that already has the dependencies.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).parents[1]
PACKAGES = ("gptoss", "parallel", "engine", "cluster", "serve")
PROTO_DIR = "serve/proto/gptoss/v1"
# What a clone holds beside the sources, and what builds and runs leave in a checkout.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".tmp", "build", "dist", "*.egg-info", "__pycache__",
                                     "*.pyc", ".pytest_cache", ".ruff_cache", ".cache", "checkpoints",
                                     "*.safetensors", "*.tiktoken")


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into with --target)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)  # a build leaves build/ behind: not in the checkout
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist")])
    (wheel,) = (tmp / "dist").glob("gptoss_serve-*.whl")
    site = tmp / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    return wheel, site


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def wheel_metadata(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_wheel_holds_every_module_and_package(built):
    wheel, _ = built
    files = wheel_files(wheel)
    sources = {p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources - files == set()
    packages = {p.parent.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*")
                if p.is_file() and p.suffix == ".py" and "__pycache__" not in p.parts}
    assert {f"{p}/__init__.py" for p in packages} <= files  # no namespace package by accident


def test_wheel_ships_the_grpc_contract_beside_its_stubs(built):
    wheel, _ = built
    files = wheel_files(wheel)
    for name in ("gptoss.proto", "gptoss_pb2.py", "gptoss_pb2.pyi", "gptoss_pb2_grpc.py"):
        assert f"{PROTO_DIR}/{name}" in files
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{PROTO_DIR}/gptoss.proto") == (ROOT / PROTO_DIR / "gptoss.proto").read_bytes()


def test_wheel_holds_nothing_but_the_packages(built):
    wheel, _ = built
    tops = {name.split("/")[0] for name in wheel_files(wheel)}
    assert tops == set(PACKAGES)  # no tests/, benchmarks/, deploy/, docs/, scripts/


def test_wheel_metadata_says_what_pyproject_says(built):
    wheel, _ = built
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    metadata = email.parser.Parser().parsestr(wheel_metadata(wheel, "METADATA"))
    supported = SpecifierSet(project["requires-python"])
    assert SpecifierSet(metadata["Requires-Python"]) == supported
    minors = [f"3.{m}" for m in range(8, 20) if f"3.{m}" in supported]
    classifiers = {c.removeprefix("Programming Language :: Python :: ") for c in metadata.get_all("Classifier")}
    assert minors and {c for c in classifiers if c.startswith("3.")} == set(minors)  # no more, no fewer
    assert "gptoss-serve = serve.cli:main" in wheel_metadata(wheel, "entry_points.txt")


def test_installed_wheel_imports_and_runs_outside_the_checkout(built, tmp_path):
    _, site = built
    env = {**os.environ, "PYTHONPATH": str(site)}
    # cwd outside the checkout: the environment's editable install must not be what answers.
    probe = run([sys.executable, "-c", """if True:
        import importlib.resources, json
        import serve.app, serve.cli, serve.proto.gptoss.v1.gptoss_pb2_grpc as stubs
        import gptoss, parallel, engine, cluster
        proto = importlib.resources.files("serve.proto.gptoss.v1") / "gptoss.proto"
        assert proto.is_file(), proto
        print(json.dumps({m.__name__: m.__file__ for m in (serve.app, serve.cli, stubs, gptoss, parallel, engine, cluster)}))
        """], cwd=tmp_path, env=env)
    files = json.loads(probe.stdout.strip().splitlines()[-1])
    for module, file in files.items():
        assert Path(file).is_relative_to(site), f"{module} came from {file}, not from the installed wheel"

    help_text = run([sys.executable, "-m", "serve.cli", "--help"], cwd=tmp_path, env=env).stdout
    assert "serve" in help_text and "checkpoint" in help_text
    script = site / "bin" / "gptoss-serve"  # the console entry point pip wrote for the wheel
    assert "serve" in run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env).stdout
