"""The wheel: built from a copy of the sources, it holds every package, the gRPC contract and its stubs,
nothing else, and works installed on its own in a fresh venv outside the checkout (imported from that
venv, not from this checkout).

Offline and quick: `pip wheel --no-build-isolation --no-index` builds with the setuptools at hand. The
fresh venv (`python -m venv`, no system site-packages) gets the wheel alone (`--no-deps`); its
dependencies come from this environment's site-packages, put at the end of its path by a .pth file
(plain path lines: that folder's own .pth files, among them an editable install of this checkout, are
not run), so the venv's own copy of the project is the one found.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Built:
    wheel: Path
    venv: Path  # the fresh venv the wheel is installed in
    site_packages: Path  # the venv's own


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)  # a build leaves build/ behind: not in the checkout
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist")])
    (wheel,) = (tmp / "dist").glob("gptoss_serve-*.whl")

    venv = tmp / "fresh"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site_packages = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             env=clean_env()).stdout.strip())
    assert site_packages.is_relative_to(venv), site_packages
    dependencies = dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib"))
    (site_packages / "_dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    # This environment's pip installs into the venv's python (which has none); scripts get its shebang.
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], env=clean_env())
    return Built(wheel, venv, site_packages)


def clean_env() -> dict[str, str]:
    """This environment less what would put the checkout or another environment on the venv's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def wheel_metadata(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_wheel_holds_every_module_and_package(built):
    wheel = built.wheel
    files = wheel_files(wheel)
    sources = {p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources - files == set()
    packages = {p.parent.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*")
                if p.is_file() and p.suffix == ".py" and "__pycache__" not in p.parts}
    assert {f"{p}/__init__.py" for p in packages} <= files  # no namespace package by accident


def test_wheel_ships_the_grpc_contract_beside_its_stubs(built):
    wheel = built.wheel
    files = wheel_files(wheel)
    for name in ("gptoss.proto", "gptoss_pb2.py", "gptoss_pb2.pyi", "gptoss_pb2_grpc.py"):
        assert f"{PROTO_DIR}/{name}" in files
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{PROTO_DIR}/gptoss.proto") == (ROOT / PROTO_DIR / "gptoss.proto").read_bytes()


def test_wheel_ships_the_kernel_sources_where_their_loaders_look(built):
    from gptoss import greedy_unembedding, mxfp4_linear

    for path in (mxfp4_linear.SOURCE, greedy_unembedding.SOURCE):
        source = path.relative_to(ROOT).as_posix()
        assert source in wheel_files(built.wheel)
        with zipfile.ZipFile(built.wheel) as z:
            assert z.read(source) == path.read_bytes()


def test_wheel_holds_nothing_but_the_packages(built):
    wheel = built.wheel
    tops = {name.split("/")[0] for name in wheel_files(wheel)}
    assert tops == set(PACKAGES)  # no tests/, benchmarks/, deploy/, docs/, scripts/


def test_wheel_metadata_says_what_pyproject_says(built):
    wheel = built.wheel
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    metadata = email.parser.Parser().parsestr(wheel_metadata(wheel, "METADATA"))
    supported = SpecifierSet(project["requires-python"])
    assert SpecifierSet(metadata["Requires-Python"]) == supported
    minors = [f"3.{m}" for m in range(8, 20) if f"3.{m}" in supported]
    classifiers = {c.removeprefix("Programming Language :: Python :: ") for c in metadata.get_all("Classifier")}
    assert minors and {c for c in classifiers if c.startswith("3.")} == set(minors)  # no more, no fewer
    assert "gptoss-serve = serve.cli:main" in wheel_metadata(wheel, "entry_points.txt")


def test_installed_wheel_imports_from_the_fresh_venv_outside_the_checkout(built, tmp_path):
    # cwd outside the checkout, no PYTHONPATH: nothing but the venv's path can answer.
    probe = run([str(built.venv / "bin" / "python"), "-c", """if True:
        import importlib.metadata, importlib.resources, json, sys
        import serve.app, serve.cli, serve.proto.gptoss.v1.gptoss_pb2_grpc as stubs
        import gptoss, parallel, engine, cluster
        proto = importlib.resources.files("serve.proto.gptoss.v1") / "gptoss.proto"
        assert proto.is_file(), proto
        from gptoss import greedy_unembedding, mxfp4_linear
        for source in (mxfp4_linear.SOURCE, greedy_unembedding.SOURCE):  # the kernels build from the wheel
            assert source.is_file(), source
        assert callable(serve.app.build_app)
        dist = importlib.metadata.distribution("gptoss-serve")
        print(json.dumps({"prefix": sys.prefix, "dist": str(dist.locate_file("")),
                          "modules": {m.__name__: m.__file__ for m in (serve.app, serve.cli, stubs, gptoss, parallel,
                                                                       engine, cluster)}}))
        """], cwd=tmp_path, env=clean_env())
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found["prefix"]) == built.venv
    assert Path(found["dist"]) == built.site_packages  # the wheel's metadata, not the editable install's
    for module, file in found["modules"].items():
        assert Path(file).is_relative_to(built.site_packages), f"{module} came from {file}, not from the fresh venv"


def test_installed_gptoss_serve_runs_from_the_fresh_venv(built, tmp_path):
    script = built.venv / "bin" / "gptoss-serve"  # the console entry point pip wrote for the wheel
    assert script.read_text().splitlines()[0] == f"#!{built.venv / 'bin' / 'python'}"
    for command, expected in [("serve", "--grpc-port"), ("batch", "--output"), ("checkpoint", "--preset")]:
        help_text = run([str(script), command, "--help"], cwd=tmp_path, env=clean_env()).stdout
        assert expected in help_text, help_text
    # One real command: torch and safetensors, from the dependencies, write a tiny checkpoint.
    run([str(script), "checkpoint", "--preset", "tiny", "--out", str(tmp_path / "tiny")], cwd=tmp_path,
        env=clean_env())
    assert (tmp_path / "tiny" / "config.json").is_file()
