"""The Kubernetes manifests under deploy/: pure unit tests, no Kubernetes and no Ray cluster.

Every RayService and RayJob is checked against KubeRay's CRD (shared/kuberay/, beside the checkout)
with unknown fields refused, as `kubectl apply --validate=strict` would; each overlay is checked as
kustomize builds it (a small builder here that knows `resources` and `images`, compared with
`kubectl kustomize` where kubectl is installed). Then what the CRD cannot know: the embedded Serve
config deploys our app with our config, and the worker groups hold the EP groups the autoscaler may
ask for. The image: deploy/Dockerfile read as BuildKit reads it (tests/dockerfile_helpers.py), its
base images' Ray and Python against pyproject.toml, and every path it copies against the build
context its .dockerignore leaves.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from serve.config import AppConfig, load_config, parse_config
from tests.dockerfile_helpers import (
    copy_problems,
    docker_ignores,
    dockerignore_of,
    dockerignore_rules,
    instructions,
    parse_dockerfile,
)

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY_CRDS = Path(__file__).parents[2] / "shared" / "kuberay"
RAY_VERSION = "2.60.0"
DOCKERFILE = DEPLOY / "Dockerfile"
BUILD_CONTEXT = ROOT  # `docker build -f deploy/Dockerfile ... .` from the repository root (checked below)

# The app config each manifest embeds, also shipped as a standalone example under deploy/configs/.
EMBEDDED_CONFIGS = {
    "overlays/gpu-1x8/rayservice.yaml": "gpt-oss-120b-g8.yaml",
    "overlays/gpu-2x4/rayservice.yaml": "gpt-oss-120b-g8.yaml",
    "overlays/cpu/rayservice.yaml": "cpu-default.yaml",
    "batch/rayjob.yaml": "batch-gpt-oss-120b-g8.yaml",
}
OVERLAYS = sorted(p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.glob("overlays/*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml"))
# RayJobSpec's fields (ray-operator/apis/ray/v1/rayjob_types.go), for when no RayJob CRD is at hand.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
OBJECT_META_FIELDS = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}


# --- loading ----------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last; kubectl's strict
    validation reports it)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        duplicates = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader) if doc is not None]


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def kustomize_build(directory: Path) -> list[dict]:
    """What `kubectl kustomize DIRECTORY` renders, for the two fields our kustomizations use."""
    kustomization = load_yaml((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "images"}
    assert not unknown, f"{directory}: teach kustomize_build {sorted(unknown)}, or keep to resources and images"
    objects = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += kustomize_build(path) if path.is_dir() else load_yaml_documents(path)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for obj in objects:
            _set_image(obj, image)
    return objects


def _split_image(image: str) -> tuple[str, str | None]:
    """("registry:5000/name", "tag") from "registry:5000/name:tag"; the tag is None when there is none."""
    name, colon, tag = image.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (image, None)


def _set_image(node: Any, image: dict) -> None:
    """kustomize's `images` transformer: every container whose image has this name, at any depth of
    the object (custom resources too), gets the new name and tag."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag = _split_image(container["image"])
                    if name == image["name"]:
                        name, tag = image.get("newName", name), image.get("newTag", tag)
                        container["image"] = name if tag is None else f"{name}:{tag}"
            else:
                _set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, image)


def manifest_files(kind: str) -> list[str]:
    """Every file under deploy/ holding an object of this kind (relative paths, for test ids)."""
    files = [p.relative_to(DEPLOY) for p in DEPLOY.rglob("*.yaml")]
    return sorted(f.as_posix() for f in files if f.parts[0] != "configs"
                  and any(d.get("kind") == kind for d in load_yaml_documents(DEPLOY / f)))


def the_object(path: Path, kind: str) -> dict:
    (obj,) = [d for d in load_yaml_documents(path) if d.get("kind") == kind]
    return obj


# --- the CRD schema, made strict --------------------------------------------------------------------

def strict_schema(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and
    neither says how to treat others nor preserves unknown fields: unknown fields become errors, as
    kubectl's strict field validation makes them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict_schema(out["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in out:
            out[keyword] = [strict_schema(sub) for sub in out[keyword]]
    if "not" in out:
        out["not"] = strict_schema(out["not"])
    return out


@functools.cache
def crd_schema(kind: str, strict: bool = True) -> dict:
    """The openAPIV3Schema of the served, storage version of KubeRay's CRD for `kind`."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay's CRDs are not at {KUBERAY_CRDS} (a checkout without ../shared)")
    path = KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"no {path.name} in {KUBERAY_CRDS}")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    assert version["name"] == "v1", "the manifests say ray.io/v1"
    schema = version["schema"]["openAPIV3Schema"]
    return strict_schema(schema) if strict else schema


def schema_errors(obj: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(obj))


def ray_cluster_spec_schema() -> dict:
    """RayClusterSpec, as the RayService CRD has it (a RayJob's rayClusterSpec is the same Go type)."""
    return crd_schema("RayService")["properties"]["spec"]["properties"]["rayClusterConfig"]


def object_problems(obj: dict) -> list[str]:
    """What strict validation of a RayService or RayJob reports (empty: it would be accepted)."""
    problems = [f"metadata.{k}: unknown field" for k in sorted(set(obj.get("metadata", {})) - OBJECT_META_FIELDS)]
    if obj["kind"] == "RayService":
        return problems + schema_errors(obj, crd_schema("RayService"))
    assert obj["kind"] == "RayJob"
    if (KUBERAY_CRDS / "ray.io_rayjobs.yaml").exists():
        return problems + schema_errors(obj, crd_schema("RayJob"))
    # No RayJob CRD here: the fields by hand, and the cluster against RayService's RayClusterSpec.
    if obj.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: must be ray.io/v1, got {obj.get('apiVersion')!r}")
    problems += [f"{k}: unknown field" for k in sorted(set(obj) - {"apiVersion", "kind", "metadata", "spec"})]
    spec = obj.get("spec", {})
    problems += [f"spec.{k}: unknown field" for k in sorted(set(spec) - RAYJOB_SPEC_FIELDS)]
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("spec.entrypoint: a command is required")
    if "rayClusterSpec" not in spec:
        problems.append("spec.rayClusterSpec: required (a cluster of the job's own)")
    else:
        problems += [f"spec.rayClusterSpec.{e}" for e in schema_errors(spec["rayClusterSpec"], ray_cluster_spec_schema())]
    return problems


# --- what the manifests deploy ------------------------------------------------------------------------

def serve_config(rayservice: dict) -> dict:
    return load_yaml(rayservice["spec"]["serveConfigV2"])


def app_config_of(obj: dict) -> AppConfig:
    """The app config a RayService's application or a RayJob's ConfigMap carries."""
    if obj["kind"] == "RayService":
        (app,) = serve_config(obj)["applications"]
        return parse_config(app["args"], "args")
    (configmap,) = [d for d in kustomize_build(DEPLOY / "batch") if d["kind"] == "ConfigMap"]
    return parse_config(load_yaml(configmap["data"]["batch.yaml"]), "batch.yaml")


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


def ray_pods(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: dict) -> tuple[float, int]:
    """The CPUs and GPUs Ray sees on a pod of this group: rayStartParams, else the container's limits
    (else requests), as KubeRay derives them."""
    container = ray_container(group)
    resources = container.get("resources", {})
    quantities = {**resources.get("requests", {}), **resources.get("limits", {})}
    params = group.get("rayStartParams", {})
    cpus = cpu_quantity(params.get("num-cpus", quantities.get("cpu", 0)))
    gpus = int(params.get("num-gpus", quantities.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def provisioning_problems(spec: dict, config: AppConfig, groups: tuple[int, int], gateways: bool) -> list[str]:
    """Whether the worker groups hold between `groups[0]` and `groups[1]` EP groups of the config: each
    EP group of G ranks fills whole pods; maxReplicas leaves no group the autoscaler may ask for without
    its pods (its placement group would stay pending) and no pods that no group can use; minReplicas
    keeps exactly the fewest groups' pods up."""
    G, device = config.group.num_ranks, config.group.device
    workers = spec.get("workerGroupSpecs", [])
    with_gpus = [w for w in workers if pod_resources(w)[1] > 0]
    if device == "cuda":
        if len(with_gpus) != 1:
            return [f"device cuda needs exactly one worker group with GPUs, got {len(with_gpus)}"]
        (worker,) = with_gpus
        cpus, ranks_per_pod = pod_resources(worker)
        if G % ranks_per_pod:
            return [f"{worker['groupName']}: an EP group of {G} ranks does not fill whole pods of {ranks_per_pod} GPUs"]
    elif device == "cpu":
        if with_gpus or len(workers) != 1:
            return [f"device cpu wants one worker group without GPUs, got {[w['groupName'] for w in workers]}"]
        (worker,) = workers
        cpus, ranks_per_pod = pod_resources(worker)[0], G  # the embedded model lives on one pod: no spanning
    else:
        return [f"set group.device explicitly (cuda or cpu) where nodes join by autoscaling, got {device!r}"]
    pods_per_group = G // ranks_per_pod
    name, min_pods, max_pods = worker["groupName"], worker.get("minReplicas", 0), worker.get("maxReplicas", 0)
    problems = []
    # One pod alone must hold its ranks and, when serving, the replica's own bundle and every gateway.
    needed = ranks_per_pod * config.group.num_cpus_per_rank
    if gateways:
        needed += config.model_server.num_cpus + config.gateway.num_replicas * config.gateway.num_cpus
    if cpus < needed:
        problems.append(f"{name}: {cpus:g} CPUs per pod, {needed:g} needed")
    low, high = groups
    if min_pods != pods_per_group * low:
        problems.append(f"{name}: minReplicas {min_pods} != {pods_per_group} pods per EP group x {low} groups")
    if max_pods < pods_per_group * high:
        problems.append(f"{name}: maxReplicas {max_pods} < {pods_per_group} pods per EP group x {high} groups")
    if max_pods % pods_per_group:
        problems.append(f"{name}: maxReplicas {max_pods} is not a multiple of {pods_per_group} pods per EP group")
    if not min_pods <= worker.get("replicas", 0) <= max_pods:
        problems.append(f"{name}: replicas {worker.get('replicas')} outside [minReplicas, maxReplicas]")
    return problems


def group_bounds(obj: dict, config: AppConfig) -> tuple[int, int]:
    """The fewest and most EP groups: the app config's, or a Serve config override of the ModelServer
    deployment's options (which Serve applies without replacing replicas)."""
    if obj["kind"] == "RayJob":
        return 1, 1  # the job's cluster is sized for one EP group
    from serve.app import MODEL_SERVER_NAME

    (app,) = serve_config(obj)["applications"]
    for deployment in app.get("deployments", []):
        if deployment["name"] == MODEL_SERVER_NAME and "autoscaling_config" in deployment:
            a = deployment["autoscaling_config"]
            return a.get("min_replicas", 1), a.get("max_replicas", 1)
        if deployment["name"] == MODEL_SERVER_NAME and "num_replicas" in deployment:
            return (deployment["num_replicas"],) * 2
    a = config.model_server.autoscaling
    return (a.min_replicas, a.max_replicas) if a else (config.model_server.num_replicas or 1,) * 2


def embedded_config_file(object_id: str) -> Path:
    """The deploy/configs/ file whose mapping the object of this test id embeds."""
    source = object_id.removesuffix(" (built)")  # a file, or the kustomization that built the object
    (file,) = {c for f, c in EMBEDDED_CONFIGS.items() if f == source or f.startswith(source + "/")}
    return DEPLOY / "configs" / file


def by_kind_and_name(objects) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def all_objects() -> list[tuple[str, dict]]:
    """(id, object) for each RayService and RayJob: the files as they are, then as each kustomization builds them."""
    found = [(f, the_object(DEPLOY / f, kind)) for kind in ("RayService", "RayJob") for f in manifest_files(kind)]
    for k in KUSTOMIZATIONS:
        found += [(f"{k} (built)", d) for d in kustomize_build(DEPLOY / k) if d["kind"] in ("RayService", "RayJob")]
    return found


OBJECTS = all_objects()
OBJECT_IDS = [name for name, _ in OBJECTS]


# --- the image ------------------------------------------------------------------------------------------

def docker_build_commands() -> list[list[str]]:
    """The arguments of every `docker build` that deploy/README.md and the Dockerfile's comments give."""
    text = (DEPLOY / "README.md").read_text() + DOCKERFILE.read_text()
    return [line.split("docker build", 1)[1].split() for line in text.splitlines() if "docker build" in line]


def image_python(image: str) -> str:
    """The Python ("3.11") an image's tag names: python:3.11-slim, rayproject/ray:2.60.0-py311-cpu."""
    name, tag = _split_image(image)
    name = name.removeprefix("docker.io/").removeprefix("library/")
    found = {"python": r"^(\d+)\.(\d+)\b", "rayproject/ray": r"-py(\d)(\d+)(-|$)"}.get(name)
    m = re.search(found, tag or "") if found else None
    if m is None:
        raise ValueError(f"{image}: no Python version in its tag")
    return f"{m[1]}.{m[2]}"


def python_problems(dockerfile_text: str, requires_python: str) -> list[str]:
    """Whether every stage of the image runs one Python (the wheel is built by the Python that runs it)
    that the wheel's requires-python allows, and PYTHON_TAG names it."""
    dockerfile = parse_dockerfile(dockerfile_text)
    pythons = {stage.name or "(final)": image_python(stage.image) for stage in dockerfile.stages}
    if len(set(pythons.values())) != 1:
        return [f"the stages run different Pythons: {pythons}"]
    (python,) = set(pythons.values())
    problems = []
    if python not in SpecifierSet(requires_python):
        problems.append(f"Python {python} is outside requires-python {requires_python}")
    if dockerfile.global_args.get("PYTHON_TAG") != "py" + python.replace(".", ""):
        problems.append(f"PYTHON_TAG={dockerfile.global_args.get('PYTHON_TAG')} does not name Python {python}")
    return problems


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def build_context_rules() -> list:
    ignore = dockerignore_of(DOCKERFILE, BUILD_CONTEXT)
    return dockerignore_rules(ignore) if ignore else []


# --- the tests ------------------------------------------------------------------------------------------

def test_every_manifest_is_accounted_for():
    assert set(manifest_files("RayService")) | set(manifest_files("RayJob")) == set(EMBEDDED_CONFIGS)
    assert set(EMBEDDED_CONFIGS.values()) == {p.name for p in (DEPLOY / "configs").glob("*.yaml")}


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_manifest_validates_strictly_against_the_kuberay_crd(name, obj):
    assert object_problems(obj) == []


@pytest.mark.parametrize("path, typo", [
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplica"], 1),
    (["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "volumeMount"], []),
    (["spec", "serveConfig"], "applications: []"),
], ids=["worker-group", "container", "spec"])
def test_strict_validation_refuses_a_misspelt_field(tmp_path, path, typo):
    manifest = tmp_path / "rayservice.yaml"
    shutil.copy(DEPLOY / "overlays/gpu-1x8/rayservice.yaml", manifest)
    obj = the_object(manifest, "RayService")
    node = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = typo
    manifest.write_text(yaml.safe_dump(obj))

    obj = the_object(manifest, "RayService")
    problems = object_problems(obj)
    assert len(problems) == 1 and repr(path[-1]) in problems[0], problems
    # The CRD as published lets it through: the strict walk is what catches it.
    assert schema_errors(obj, crd_schema("RayService", strict=False)) == []


def test_a_key_given_twice_is_refused(tmp_path):
    manifest = tmp_path / "rayservice.yaml"
    text = (DEPLOY / "overlays/cpu/rayservice.yaml").read_text()
    manifest.write_text(text.replace("    enableInTreeAutoscaling: true\n",
                                     "    enableInTreeAutoscaling: true\n    enableInTreeAutoscaling: false\n"))
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        load_yaml_documents(manifest)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubectl_kustomize_builds_what_these_tests_check(kustomization):
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / kustomization)], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    assert by_kind_and_name(yaml.safe_load_all(rendered)) == by_kind_and_name(kustomize_build(DEPLOY / kustomization))


@pytest.mark.parametrize("name, obj", [o for o in OBJECTS if o[1]["kind"] == "RayService"],
                         ids=[n for n, o in OBJECTS if o["kind"] == "RayService"])
def test_serve_config_deploys_our_app(name, obj):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    import serve.app

    config = serve_config(obj)
    ServeDeploySchema.model_validate(config)  # Ray's own check of serveConfigV2 (it ignores unknown keys...)
    assert set(config) <= set(ServeDeploySchema.model_fields)  # ...which we do not
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    grpc = config["grpc_options"]
    assert grpc["port"] == 9000 and grpc["enable_reflection"] is True
    assert grpc["grpc_servicer_functions"] == serve.app.GRPC_SERVICER_FUNCTIONS
    for function in grpc["grpc_servicer_functions"]:  # what Serve's gRPC proxy imports
        module, _, attribute = function.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute))
    (app,) = config["applications"]
    assert {"name", "route_prefix", "import_path", "args"} <= set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["name"] == "gptoss" and app["route_prefix"] == "/"
    module, _, attribute = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is serve.app.build_app
    parse_config(app["args"], "args")


@pytest.mark.parametrize("name, obj", [o for o in OBJECTS if o[1]["kind"] == "RayService"],
                         ids=[n for n, o in OBJECTS if o["kind"] == "RayService"])
def test_build_app_takes_the_embedded_args_without_a_warning(name, obj):
    import serve.app

    (app,) = serve_config(obj)["applications"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Serve warns of options it will refuse in a later release
        serve.app.build_app(app["args"])  # no Ray cluster needed: the device is explicit


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_embedded_app_config_is_the_example_config(name, obj):
    assert app_config_of(obj) == load_config(embedded_config_file(name))


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "configs").glob("*.yaml")))
def test_example_config_loads(path):
    config = load_config(DEPLOY / "configs" / path)
    assert config.group.device in ("cpu", "cuda")  # explicit: nodes join later by autoscaling


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_worker_groups_hold_every_ep_group_the_autoscaler_may_ask_for(name, obj):
    config = app_config_of(obj)
    assert provisioning_problems(cluster_spec(obj), config, group_bounds(obj, config),
                                 gateways=obj["kind"] == "RayService") == []


@pytest.mark.parametrize("change, problem", [
    (lambda w: w.update(minReplicas=1, replicas=1), "minReplicas 1 != 2 pods per EP group x 1 groups"),
    (lambda w: w.update(maxReplicas=2), "maxReplicas 2 < 2 pods per EP group x 2 groups"),
    (lambda w: w.update(maxReplicas=5), "maxReplicas 5 is not a multiple of 2 pods per EP group"),
    (lambda w: ray_container(w)["resources"]["limits"].update({"nvidia.com/gpu": "3"}),
     "an EP group of 8 ranks does not fill whole pods of 3 GPUs"),
    (lambda w: ray_container(w)["resources"]["limits"].update(cpu="8"), "8 CPUs per pod, 18.5 needed"),
], ids=["min-pods", "max-pods", "partial-group", "gpus", "cpus"])
def test_a_worker_group_that_does_not_fit_the_ep_groups_is_reported(change, problem):
    obj = copy.deepcopy(the_object(DEPLOY / "overlays/gpu-2x4/rayservice.yaml", "RayService"))
    config = app_config_of(obj)
    change(cluster_spec(obj)["workerGroupSpecs"][0])
    problems = provisioning_problems(cluster_spec(obj), config, group_bounds(obj, config), gateways=True)
    assert any(problem in p for p in problems), problems


def test_a_serve_override_of_the_group_bounds_counts_too():
    obj = copy.deepcopy(the_object(DEPLOY / "overlays/gpu-1x8/rayservice.yaml", "RayService"))
    config = serve_config(obj)
    config["applications"][0]["deployments"] = [
        {"name": "ModelServer", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}]
    obj["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    problems = provisioning_problems(cluster_spec(obj), app_config_of(obj), group_bounds(obj, app_config_of(obj)),
                                     gateways=True)
    assert problems == ["gpu-8: maxReplicas 2 < 1 pods per EP group x 3 groups"]


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_cluster_autoscales_and_keeps_the_head_free(name, obj):
    config, spec = app_config_of(obj), cluster_spec(obj)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica, rank or gateway on the head
    if obj["kind"] == "RayService":
        assert spec["enableInTreeAutoscaling"] is True
        assert config.model_server.autoscaling is not None and config.model_server.num_replicas is None


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_ray_pods_drain_before_they_are_killed_and_keep_kuberays_probes(name, obj):
    config = app_config_of(obj)
    for group_name, group in ray_pods(cluster_spec(obj)):
        container = ray_container(group)
        # KubeRay's own probes check the raylet and, on workers, the Serve proxy: leave them in place.
        assert "readinessProbe" not in container and "livenessProbe" not in container, group_name
        assert container["image"].endswith("-gpu" if config.group.device == "cuda" else "-cpu"), group_name
        if obj["kind"] == "RayService":
            grace_s = group["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace_s > config.model_server.graceful_shutdown_timeout_s, group_name


@pytest.mark.parametrize("name, obj", OBJECTS, ids=OBJECT_IDS)
def test_every_ray_pod_sees_the_checkpoint_and_the_api_keys(name, obj):
    config = app_config_of(obj)
    checkpoint = config.model.checkpoint
    for group_name, group in ray_pods(cluster_spec(obj)):
        container = ray_container(group)
        if checkpoint is not None:  # the same folder on every node, from one shared volume
            volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
            mounts = [m for m in container.get("volumeMounts", [])
                      if checkpoint.startswith(m["mountPath"].rstrip("/") + "/")]
            assert len(mounts) == 1, f"{group_name}: no volume mounted above {checkpoint}"
            assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] == "gptoss-models"
        if config.auth.api_keys_env:  # any pod may host a gateway
            (env,) = [e for e in container.get("env", []) if e["name"] == config.auth.api_keys_env]
            assert "secretKeyRef" in env["valueFrom"], group_name


@pytest.mark.parametrize("name, obj", [(n, o) for n, o in OBJECTS if o["kind"] == "RayService"],
                         ids=[i for i, (_, o) in zip(OBJECT_IDS, OBJECTS, strict=True) if o["kind"] == "RayService"])
def test_every_ray_pod_caps_grpc_messages_at_the_gateways_request_limit(name, obj):
    """Serve's gRPC proxy reads RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (default 2 GiB) on the pod that hosts it: it
    must refuse what the gateway would refuse, before the message travels."""
    limit = str(app_config_of(obj).gateway.max_request_bytes)
    for group_name, group in ray_pods(cluster_spec(obj)):
        values = [e.get("value") for e in ray_container(group).get("env", [])
                  if e["name"] == "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]
        assert values == [limit], group_name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_exposes_http_and_grpc(overlay):
    objects = by_kind_and_name(kustomize_build(DEPLOY / overlay))
    rayservice = objects["RayService", "gptoss"]
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(cluster_spec(rayservice)["headGroupSpec"])["ports"]}
    # KubeRay's gptoss-serve-svc carries the head container's port named `serve` (HTTP) only.
    assert head_ports["serve"] == 8000 and head_ports["serve-grpc"] == 9000
    grpc = objects["Service", "gptoss-grpc"]
    (port,) = grpc["spec"]["ports"]
    assert port["port"] == 9000 and port["targetPort"] == "serve-grpc"
    assert grpc["spec"]["selector"]["ray.io/serve"] == "true"  # KubeRay's label of the pods that serve
    own_labels = {k: v for k, v in grpc["spec"]["selector"].items() if not k.startswith("ray.io/")}
    for _, group in ray_pods(cluster_spec(rayservice)):
        assert own_labels.items() <= group["template"]["metadata"]["labels"].items()
        assert {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}["serve-grpc"] == 9000


def test_batch_job_runs_the_batch_command_on_its_configmap():
    objects = {o["kind"]: o for o in kustomize_build(DEPLOY / "batch")}
    job, configmap = objects["RayJob"], objects["ConfigMap"]
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["gptoss-serve", "batch", "--config", "/etc/gptoss/batch.yaml"]
    assert "--input" in entrypoint and "--output" in entrypoint
    assert not Path(entrypoint[entrypoint.index("--output") + 1]).suffix  # a folder of parts (resumable)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    config = app_config_of(job)
    gpus = sum(int(group.get("replicas", 1)) * int(ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
               for _, group in ray_pods(job["spec"]["rayClusterSpec"]))
    assert gpus == config.batch.num_groups * config.group.num_ranks  # every group of the pool fits, none idles
    for group_name, group in ray_pods(job["spec"]["rayClusterSpec"]):  # the driver runs on the head
        pod = group["template"]["spec"]
        (mount,) = [m for m in ray_container(group)["volumeMounts"] if m["mountPath"] == "/etc/gptoss"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"], group_name
    assert set(configmap["data"]) == {"batch.yaml"}


def test_deploy_readme_gives_the_batch_jobs_own_command():
    (job,) = [o for o in kustomize_build(DEPLOY / "batch") if o["kind"] == "RayJob"]
    readme = " ".join((DEPLOY / "README.md").read_text().split())
    assert f"`{' '.join(job['spec']['entrypoint'].split())}`" in readme


def test_ray_version_agrees_everywhere():
    import ray
    from packaging.requirements import Requirement

    assert ray.__version__ == RAY_VERSION
    (ray_requirement,) = [r for r in map(Requirement, pyproject()["project"]["dependencies"]) if r.name == "ray"]
    assert RAY_VERSION in ray_requirement.specifier
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    assert dockerfile.global_args["RAY_VERSION"] == RAY_VERSION
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", DOCKERFILE.read_text(), re.M)
    name, tag = _split_image(dockerfile.stages[-1].image)  # the image the pods run, with the ARGs' defaults
    assert name == "rayproject/ray" and tag.startswith(f"{RAY_VERSION}-"), dockerfile.stages[-1].image


def test_every_stage_of_the_image_runs_the_python_that_pyproject_allows():
    assert python_problems(DOCKERFILE.read_text(), pyproject()["project"]["requires-python"]) == []


@pytest.mark.parametrize("old, new", [
    ("FROM python:3.11-slim AS wheel", "FROM python:3.12-slim AS wheel"),
    ("ARG PYTHON_TAG=py311", "ARG PYTHON_TAG=py312"),
], ids=["wheel-stage", "ray-image"])
def test_stages_of_the_image_on_different_pythons_are_reported(old, new):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = python_problems(text.replace(old, new), pyproject()["project"]["requires-python"])
    assert len(problems) == 1 and problems[0].startswith("the stages run different Pythons"), problems


def test_a_python_outside_requires_python_is_reported():
    text = DOCKERFILE.read_text().replace("ARG PYTHON_TAG=py311", "ARG PYTHON_TAG=py310")
    text = text.replace("FROM python:3.11-slim", "FROM python:3.10-slim")
    assert python_problems(text, ">=3.11,<3.14") == ["Python 3.10 is outside requires-python >=3.11,<3.14"]


def test_docker_builds_run_from_the_repository_root():
    commands = docker_build_commands()
    assert len(commands) >= 2, "the README and the Dockerfile say how to build the image"
    for args in commands:
        assert args[args.index("-f") + 1] == "deploy/Dockerfile" and args[-1] == ".", args


def test_every_path_the_dockerfile_copies_is_in_the_build_context():
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    assert [s for stage in dockerfile.stages for c in stage.copies for s in c.sources]
    assert copy_problems(dockerfile, BUILD_CONTEXT, build_context_rules()) == []


@pytest.mark.parametrize("line, problem", [
    ("COPY pyproject.toml missing.txt /x/", "COPY missing.txt: not in the build context"),
    ("COPY tests tests", "COPY tests: tests is left out by the .dockerignore"),
    ('ADD --chown=1000:100 ["docs/batch.md", "/x/"]', "ADD docs/batch.md: docs/batch.md is left out"),
    ("COPY serve/*.nothing /x/", "COPY serve/*.nothing: not in the build context"),
    ("COPY --from=wheel --chown=1000:100 /nowhere /x/", None),
], ids=["missing", "ignored-folder", "ignored-file-json-form", "empty-glob", "from-a-stage"])
def test_a_copy_the_build_would_miss_is_reported(line, problem):
    dockerfile = parse_dockerfile(DOCKERFILE.read_text() + line + "\n")
    problems = copy_problems(dockerfile, BUILD_CONTEXT, build_context_rules())
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize("path, ignored", [
    ("pyproject.toml", False), ("serve/app.py", False), ("serve/proto/gptoss/v1/gptoss.proto", False),
    ("serve/__pycache__/app.cpython-311.pyc", True), ("tests/test_deploy.py", True), (".venv/bin/python", True),
    ("deploy/Dockerfile", True),
])
def test_the_build_context_holds_the_sources_only(path, ignored):
    assert docker_ignores(path, build_context_rules()) is ignored


def test_the_wheel_stage_copies_everything_pip_wheel_reads():
    project, find = pyproject()["project"], pyproject()["tool"]["setuptools"]["packages"]["find"]
    sources = {s for c in parse_dockerfile(DOCKERFILE.read_text()).stage("wheel").copies for s in c.sources}
    assert {"pyproject.toml", project["readme"]} | {p.removesuffix("*") for p in find["include"]} <= sources


def test_the_images_build_steps_prebuild_every_kernel_and_a_rank_without_a_compiler_loads_them(tmp_path):
    """The image has no C compiler: its build must leave a prebuilt library of every kernel where
    GPTOSS_KERNELS_DIR points, and a process with no compiler must load them (not fall back to torch).
    The step's own command runs here, into a temporary folder."""
    steps = instructions(DOCKERFILE.read_text())
    final = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"):]
    [kernels_dir] = [rest.split("=", 1)[1] for keyword, rest in final if keyword == "ENV"
                     and rest.startswith("GPTOSS_KERNELS_DIR=")]
    [prebuild] = [rest for keyword, rest in final if keyword == "RUN" and "gptoss-serve kernels --prebuild" in rest]
    assert '--prebuild "$GPTOSS_KERNELS_DIR"' in prebuild and kernels_dir.startswith("/")
    assert "purge" in prebuild.split("--prebuild", 1)[1], "the compiler leaves the image in the same layer"

    gptoss_serve = str(Path(sys.executable).with_name("gptoss-serve"))
    out = tmp_path / "kernels"
    subprocess.run([gptoss_serve, "kernels", "--prebuild", str(out)], check=True, capture_output=True, timeout=300)
    from engine.kernels import KERNEL_SOURCES
    from gptoss import native

    manifest = json.loads((out / native.MANIFEST).read_text())
    assert sorted(manifest) == sorted(source.stem for source in KERNEL_SOURCES)
    assert all(native.cpu_levels()[-1] in entry["builds"] for entry in manifest.values())  # the plainest level

    no_compiler = {**os.environ, "GPTOSS_KERNELS_DIR": str(out), "CC": str(tmp_path / "no-compiler"),
                   "PATH": "/nonexistent", "GPTOSS_CACHE_DIR": str(tmp_path / "empty-cache")}
    status = subprocess.run([gptoss_serve, "kernels"], env=no_compiler, capture_output=True, text=True, timeout=300,
                            check=True).stdout
    best = native.cpu_levels()[0]
    assert status.splitlines() == [f"{source.stem}: prebuilt {best}" for source in KERNEL_SOURCES], status
