"""The cluster files, checked without a cluster or a network: Ray's own schema for the launcher configs, KubeRay's
field names for the manifests, the pinned packages against constraints.txt / pyproject.toml, and every
``python -m pipelines.X`` command (RayJob entrypoints, cluster/README.md) against that module's own parser.

    .venv/bin/python -m pytest -q tests/test_cluster_files.py
"""
from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
README = CLUSTER / "README.md"
PACKAGES = ("dynloss", "pipelines", "tune_spaces")

# Field names of KubeRay's v1 CRDs (ray-operator/config/crd/bases, KubeRay 1.7), written out by hand: a misspelt
# field is pruned silently by the API server, so catch it here.
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
                   "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
              "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
                "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
AUTOSCALER_OPTIONS = {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
                      "resources", "securityContext", "upscalingMode", "version", "volumeMounts"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}


# ------------------------------------------------------------------------------------------------- helpers
def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def constraints() -> dict[str, str]:
    """constraints.txt as {name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def project_requirements() -> dict[str, Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def pip_requirements(command: str) -> dict[str, Requirement]:
    """The requirements named by the `pip install` commands in a shell line (options and their values skipped)."""
    reqs, words = {}, shlex.split(command)
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("--index-url", "--extra-index-url", "-c", "--constraint", "-e", "--editable", "-r"):
            i += 2
            continue
        if not w.startswith("-") and w not in ("pip", "install", "&&", "python") and not w.endswith("/python"):
            r = Requirement(w)
            reqs[r.name.lower()] = r
        i += 1
    return reqs


def pinned(reqs: dict[str, Requirement], name: str) -> str | None:
    """The version of an `==` pin, else None."""
    specs = list(reqs[name].specifier) if name in reqs else []
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def module_command(words: list[str]) -> tuple[str, list[str]] | None:
    """('train', args) for ['python', '-m', 'pipelines.train', *args], also after a leading `bash -c '...'`."""
    if words[:2] == ["bash", "-c"] and len(words) == 3:
        words = shlex.split(words[2])
    for i in range(len(words) - 2):
        if words[i] == "python" and words[i + 1] == "-m" and words[i + 2].startswith("pipelines."):
            return words[i + 2].split(".", 1)[1], words[i + 3:]
    return None


def check_command(module: str, args: list[str], where: str) -> None:
    """The module exists, its own argparse parser accepts the arguments, and the files they name exist."""
    assert (ROOT / "pipelines" / f"{module}.py").is_file(), f"{where}: no module pipelines.{module}"
    parser = importlib.import_module(f"pipelines.{module}").build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `python -m pipelines.{module}` rejects its arguments {args} (error above)")
    for option in ("config", "space"):
        value = getattr(ns, option, None)
        if value is not None:
            assert (ROOT / value).is_file(), f"{where}: --{option} {value} is not a file of this repository"
    if module in ("train", "tune"):
        check_overrides(module, ns, where)


def check_overrides(module: str, ns, where: str) -> None:
    """The config with the command's --set overrides (and the space, for a sweep) passes dynloss's validation.

    Offline: validation looks for a manifest at data.path, so a URI there (s3://, gs://: a network call) is
    swapped for an absent local path, which a config with a data.prepare block accepts; without one, skipped."""
    from dynloss.config import ConfigError, load_config
    from tune_spaces import SpaceError, load_space

    raw = yaml.safe_load((ROOT / ns.config).read_text())
    overrides = list(ns.set)
    uri = [i for i, o in enumerate(overrides) if o.startswith("data.path=") and "://" in o]
    if uri:
        if not (raw.get("data") or {}).get("prepare"):
            return
        for i in uri:
            overrides[i] = "data.path=/nonexistent/dynloss-cluster-test"
    try:
        load_config(ROOT / ns.config, overrides)
        if module == "tune":
            load_space(str(ROOT / ns.space), str(ROOT / ns.config), overrides)
    except (ConfigError, SpaceError) as e:
        pytest.fail(f"{where}: {e}")


# ------------------------------------------------------------------------------------ cluster launcher
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    validate_config(config)
    # what `ray up` validates: the config filled out with the provider's defaults, setup commands merged
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_gpu_workers_autoscale_from_zero(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {k: t for k, t in types.items() if k != config["head_node_type"]}
    gpu = {k: t for k, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, f"{name}: no worker node type declares a GPU"
    for key, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: {key} should scale from 0"
        assert 1 <= t["max_workers"] <= config["max_workers"], f"{name}: {key}.max_workers"
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["region"]
    assert "docker" not in config or not config["docker"], "no docker: the image brings the NVIDIA driver"


def test_site_specific_values_are_one_edit_each():
    """What a user must fill in is a visible placeholder (or a real value) and is not repeated inconsistently."""
    aws = load("aws.yaml")
    amis = {t["node_config"]["ImageId"] for t in aws["available_node_types"].values()}
    assert len(amis) == 1, "aws.yaml: every node type boots the same AMI"
    assert re.fullmatch(r"ami-[0-9a-f]+|REPLACE-ME-[\w-]+", amis.pop())
    gcp = load("gcp.yaml")
    project = gcp["provider"]["project_id"]
    assert isinstance(project, str) and project, "gcp.yaml: provider.project_id (REPLACE-ME-project-id in the repo)"
    for key, t in gcp["available_node_types"].items():
        for account in t["node_config"].get("serviceAccounts", []):
            assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), f"gcp.yaml: {key}'s account"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_setup_installs_pinned_cuda_torch_and_this_package(name):
    config = load(name)
    setup = config["setup_commands"]
    pins = constraints()
    torch_lines = [c for c in setup if "torch==" in c]
    assert len(torch_lines) == 1, f"{name}: one command installs the torch pair"
    reqs = pip_requirements(torch_lines[0])
    for package in ("torch", "torchvision"):
        assert pinned(reqs, package) == pins[package], f"{name}: {package} differs from constraints.txt"
    assert "download.pytorch.org/whl/cu" in torch_lines[0], f"{name}: torch from the PyTorch CUDA index"
    # the checkout synced by file_mounts is what `pip install -e` installs, pinned by its constraints.txt
    checkout = next(remote for remote, local in config["file_mounts"].items() if local in (".", "./"))
    assert any(f"-e {checkout}" in c and f"-c {checkout}/constraints.txt" in c for c in setup), \
        f"{name}: no `pip install -c {checkout}/constraints.txt -e {checkout}`"
    assert setup.index(torch_lines[0]) < next(i for i, c in enumerate(setup) if f"-e {checkout}" in c), \
        "the CUDA torch pair goes in first, or the package would pull the default build"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_starts_ray_with_token_auth(name):
    config = load(name)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", \
        f"{name}: the token must reach every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{name}: {key} without RAY_AUTH_MODE=token"
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_aws_and_gcp_set_up_nodes_the_same_way():
    aws, gcp = load("aws.yaml"), load("gcp.yaml")
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert aws[key] == gcp[key], f"aws.yaml and gcp.yaml differ in {key}"


# ------------------------------------------------------------------------------------------------ KubeRay
def cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", d["spec"]) for d in load_all("kuberay/raycluster.yaml")]
    specs += [(f"rayjob.yaml:{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for d in load_all("kuberay/rayjob.yaml") if "rayClusterSpec" in d["spec"]]
    return specs


def rayjobs() -> list[dict]:
    return load_all("kuberay/rayjob.yaml")


def test_kuberay_manifests_have_the_expected_kinds():
    clusters, jobs = load_all("kuberay/raycluster.yaml"), rayjobs()
    assert [d["kind"] for d in clusters] == ["RayCluster"]
    assert [d["kind"] for d in jobs] == ["RayJob", "RayJob"]
    for d in clusters + jobs:
        assert d["apiVersion"] == "ray.io/v1"
        assert d["metadata"]["name"]
    assert len({d["metadata"]["name"] for d in jobs}) == 2


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_kuberay_cluster_spec(where, spec):
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC}"
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP and "template" in spec["headGroupSpec"]
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert spec["rayVersion"].startswith(major_minor + "."), \
        f"{where}: rayVersion {spec['rayVersion']} is not the installed Ray {ray.__version__}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication off"
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert set(g) <= WORKER_GROUP and WORKER_GROUP_REQUIRED <= set(g), f"{where}: worker group {g.get('groupName')}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
    gpu_groups = [g for g in groups
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, f"{where}: no worker group limits nvidia.com/gpu"
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        image = pod["containers"][0]["image"]
        assert image.split(":", 1)[1].startswith(spec["rayVersion"]), f"{where}: {image} is not Ray {spec['rayVersion']}"
    for g in gpu_groups:
        image = g["template"]["spec"]["containers"][0]["image"]
        assert re.search(r"-(gpu|cu\d+)$", image), f"{where}: {image} has no CUDA"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_kuberay_pods_install_the_pinned_packages(where, spec):
    pins, project = constraints(), project_requirements()
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (install,) = pod["containers"][0]["args"]
        assert "ray start" not in install, "KubeRay appends its own `ray start` only when the args have none"
        reqs = pip_requirements(install)
        for name, wanted in project.items():
            assert name in reqs, f"{where}: pyproject.toml's {name} is not installed"
            assert reqs[name].extras >= wanted.extras, f"{where}: {name} without the extras {wanted.extras}"
            if name in pins:
                assert pinned(reqs, name) == pins[name], f"{where}: {name} differs from constraints.txt"
            else:
                assert reqs[name].specifier == wanted.specifier, f"{where}: {name}{reqs[name].specifier} != {wanted}"
        assert "download.pytorch.org/whl/cu" in install


def test_rayjobs_run_a_training_and_a_sweep():
    from ray.runtime_env import RuntimeEnv

    modules = []
    for job in rayjobs():
        name, spec = job["metadata"]["name"], job["spec"]
        assert set(spec) <= RAYJOB_SPEC, f"{name}: unknown fields {set(spec) - RAYJOB_SPEC}"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{name}: rayClusterSpec or clusterSelector"
        assert spec["shutdownAfterJobFinishes"] is True
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        RuntimeEnv(**env)  # Ray's own validation (working_dir URI form, env_vars types)
        assert "MLFLOW_TRACKING_URI" in env["env_vars"], f"{name}: the MLflow URI comes through the environment"
        for var in re.findall(r"\$\{?(\w+)", spec["entrypoint"]):
            assert var in env["env_vars"], f"{name}: the entrypoint uses ${var}, which runtimeEnvYAML does not set"
        command = module_command(shlex.split(spec["entrypoint"]))
        assert command, f"{name}: the entrypoint is not `python -m pipelines.X ...`"
        check_command(*command, where=f"rayjob.yaml:{name}")
        assert "--config" in command[1]
        modules.append(command[0])
    assert sorted(modules) == ["train", "tune"]


# ---------------------------------------------------------------------------------------- runtime_env.yaml
def test_runtime_env_ships_every_package_file():
    """`ray job submit --runtime-env cluster/runtime_env.yaml` must not leave any part of the packages behind."""
    from ray._private.runtime_env.packaging import _get_excludes  # the matcher Ray applies to `excludes`
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    excluded = _get_excludes(ROOT, env.get("excludes", []))
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert files
    # Ray skips a path when it or any directory above it matches
    dropped = sorted(str(p.relative_to(ROOT)) for p in files
                     if any(excluded(q) for q in (p, *p.parents) if q != ROOT and ROOT in q.parents))
    assert not dropped, f"cluster/runtime_env.yaml excludes package files (anchor the pattern with /): {dropped[:5]}"


# ------------------------------------------------------------------------------------------------ README
def readme_commands() -> list[tuple[str, list[str]]]:
    """(module, args) of every `python -m pipelines.X` / `dynloss X` command in README's code blocks."""
    from pipelines.cli import COMMANDS

    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", README.read_text(), re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            command = module_command(words)
            if command is None and "dynloss" in words:
                i = words.index("dynloss")
                if i + 1 < len(words) and words[i + 1] in COMMANDS:
                    command = words[i + 1], words[i + 2:]
            if command:
                found.append(command)
    return found


def test_readme_commands_are_accepted_by_the_pipelines():
    commands = readme_commands()
    assert {m for m, _ in commands} >= {"train", "tune", "prepare"}
    for module, args in commands:
        check_command(module, args, where=f"cluster/README.md: {module} {' '.join(args)}")


def test_readme_names_existing_modules_and_files():
    text = README.read_text()
    for module in re.findall(r"python -m pipelines\.(\w+)", text):
        assert (ROOT / "pipelines" / f"{module}.py").is_file(), f"cluster/README.md names pipelines.{module}"
    for path in set(re.findall(r"\b((?:cluster|pipelines/configs|tune_spaces)/[\w/.-]+\.(?:yaml|sh|md))", text)):
        assert (ROOT / path).is_file(), f"cluster/README.md names {path}, which does not exist"
    # the table of files at the top: paths relative to cluster/
    for row in re.findall(r"^\| (`.+?) \|", text, re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", row):
            assert (CLUSTER / name).is_file(), f"cluster/README.md lists cluster/{name}, which does not exist"
