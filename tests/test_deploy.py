"""The deployment files in deploy/ agree with the package they deploy: the manifests parse, every `bioadapt serve`
command in them parses with the real command line, the Ray / Python / Hypha versions they name are the installed
ones, the Ray nodes and the service share one image, one Ray token and one data path, ports stay on 127.0.0.1,
and `docker compose config` accepts the compose file (where Docker's compose plugin is installed)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bioadapt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "kubernetes"
TEXT_FILES = [DEPLOY / "Dockerfile", DEPLOY / "README.md", DEPLOY / "with-ray-node.sh",
              DEPLOY / "slurm" / "bioadapt-ray.sbatch"]
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
RAY_VERSION = importlib.metadata.version("ray")
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
RAY_SERVICES = ("ray-head", "ray-gpu-worker", "bioadapt")  # compose services that are Ray nodes
DUMMY_SECRETS = {"RAY_AUTH_TOKEN": "0" * 64, "HYPHA_JWT_SECRET": "1" * 64}


# -- helpers ----------------------------------------------------------------------------------------------
def serve_options() -> set[str]:
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    return {option for action in serve._actions for option in action.option_strings}


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def commands_in(node) -> list[list[str]]:
    """Every container command in parsed YAML: compose's `command`, Kubernetes' `command` + `args`."""
    found = []
    if isinstance(node, dict):
        parts = []
        for key in ("command", "args"):
            value = node.get(key)
            if isinstance(value, list):
                parts += [str(v) for v in value]
            elif isinstance(value, str):
                parts += shlex.split(value)
        if parts:
            found.append(parts)
        for value in node.values():
            found += commands_in(value)
    elif isinstance(node, list):
        for value in node:
            found += commands_in(value)
    return found


def serve_argv(command: list[str]) -> list[str] | None:
    """The arguments after `bioadapt serve` in a command (behind a wrapper such as with-ray-node.sh), or None."""
    for i in range(len(command) - 1):
        if command[i].endswith("bioadapt") and command[i + 1] == "serve":
            return command[i + 2:]
    return None


def serve_flags_in_text(text: str) -> set[str]:
    """Flags written after `bioadapt serve` in shell, Dockerfile or Markdown text (up to the end of the command),
    and those collected in the batch script's `serve_flags` array."""
    text = re.sub(r'"\s*,\s*"', " ", text.replace("\\\n", " "))  # JSON arrays (Dockerfile CMD) read as words
    flags = set()
    for line in text.splitlines():
        pieces = [m.group(1) for m in re.finditer(r"\bbioadapt\s+serve\b(.*)", line)]
        pieces += [m.group(1) for m in re.finditer(r"\bserve_flags\+?=\((.*)", line)]
        for piece in pieces:
            piece = re.split(r"`|;|&&|\|\||\s#", piece)[0]
            flags.update(flag.split("=")[0] for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", piece))
    return flags


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def containers(doc: dict) -> list[dict]:
    """Containers of a Deployment or of every group of a RayCluster."""
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# -- the files parse, and their commands are bioadapt's -----------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_parses(path):
    docs = documents(path)
    assert docs, f"{path} holds no YAML document"
    if path.parent == K8S:
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


def test_every_serve_command_in_the_manifests_parses():
    parser = build_parser()
    seen = 0
    for path in YAML_FILES:
        for doc in documents(path):
            for command in commands_in(doc):
                argv = serve_argv(command)
                if argv is None:
                    continue
                seen += 1
                unknown = {a.split("=")[0] for a in argv if a.startswith("--")} - serve_options()
                assert not unknown, f"{path.name}: `bioadapt serve` has no {sorted(unknown)}"
                try:
                    parser.parse_args(["serve", *argv])
                except SystemExit:
                    pytest.fail(f"{path.name}: `bioadapt serve {' '.join(argv)}` does not parse")
    assert seen >= 2, "expected the bioadapt service in compose.yaml and kubernetes/bioadapt.yaml"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_serve_flag_in_the_dockerfile_scripts_and_readme_exists(path):
    named = serve_flags_in_text(path.read_text())
    assert named or path.name == "with-ray-node.sh", f"no `bioadapt serve` flags found in {path.name}"
    unknown = named - serve_options()
    assert not unknown, f"{path.name} names `bioadapt serve` flags that do not exist: {sorted(unknown)}"


# -- versions ------------------------------------------------------------------------------------------------
def test_dockerfile_and_compose_build_the_installed_ray_and_python():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert set(re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.MULTILINE)) == {RAY_VERSION}
    assert set(re.findall(r"^ARG PYTHON_VERSION=(\S+)", dockerfile, re.MULTILINE)) == {PYTHON_VERSION}
    build = compose_services()["bioadapt"]["build"]
    assert build["args"]["RAY_VERSION"] == RAY_VERSION and build["args"]["PYTHON_VERSION"] == PYTHON_VERSION


def test_the_raycluster_runs_the_installed_ray():
    (cluster,) = [doc for doc in k8s_documents() if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == RAY_VERSION


@pytest.mark.parametrize("path", [*TEXT_FILES, *YAML_FILES], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_versions_named_anywhere_are_the_installed_ones(path):
    text = path.read_text()
    for version in re.findall(r"(?<![A-Za-z])[Rr]ay[ =:-]{0,2}v?(\d+\.\d+(?:\.\d+)?)", text):
        assert RAY_VERSION == version or RAY_VERSION.startswith(version + "."), (path.name, "Ray", version)
    for version in re.findall(r"(?<![A-Za-z])(?:[Pp]ython|py) ?(3\.\d+)", text):
        assert version == PYTHON_VERSION, (path.name, "Python", version)
    packages = {"hypha": "hypha", "hypha-rpc": "hypha_rpc"}
    for name, version in re.findall(r"\b(hypha(?:-rpc)?) (\d+\.\d+\.\d+)", text):
        assert importlib.metadata.version(packages[name]) == version, (path.name, name, version)
    pinned = dict(re.findall(r"^([\w.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE))
    for name, version in re.findall(r"\b(sqlmodel|torch)==(\d[\w.]*)", text):
        assert pinned.get(name) == version, (path.name, name, version, "constraints.txt pins", pinned.get(name))


# -- compose: one image, one token, one data path, loopback ports ----------------------------------------------
def test_compose_ray_nodes_share_image_token_and_data_path():
    services = compose_services()
    assert {"hypha", "ray-head", "ray-gpu-worker", "bioadapt"} <= set(services)
    images = {name: services[name]["image"] for name in ("hypha", *RAY_SERVICES)}
    assert len(set(images.values())) == 1, images
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "${RAY_AUTH_TOKEN" in env["RAY_AUTH_TOKEN"], (name, env)
        assert "data:/data" in services[name]["volumes"], name
    head_port = re.search(r"--port=(\d+)", " ".join(services["ray-head"]["command"])).group(1)
    argv = serve_argv(services["bioadapt"]["command"])
    assert argv[argv.index("--ray-address") + 1] == f"ray-head:{head_port}"
    assert argv[argv.index("--data-dir") + 1] == "/data"
    assert f"--address=ray-head:{head_port}" in services["ray-gpu-worker"]["command"]
    (device,) = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_publishes_ports_on_loopback_by_default():
    for name, service in compose_services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)


# -- Kubernetes: the service and the RayCluster agree ----------------------------------------------------------
def test_kubernetes_pods_share_image_token_and_data_volume():
    docs = k8s_documents()
    (cluster,) = [doc for doc in docs if doc["kind"] == "RayCluster"]
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    (service,) = containers(deployments["bioadapt"])
    ray_containers = containers(cluster)
    assert len({c["image"] for c in [*ray_containers, service, *containers(deployments["hypha"])]}) == 1
    for container in [*ray_containers, service]:
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "bioadapt-ray-auth", container["name"]
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"], container["name"]
    argv = serve_argv([*service["command"], *service["args"]])
    assert argv[argv.index("--ray-address") + 1] == f"{cluster['metadata']['name']}-head-svc:6379"
    assert argv[argv.index("--data-dir") + 1] == "/data"
    assert env_of(service)["BIOADAPT_DATABASE_URL"]["secretKeyRef"]["name"] == "bioadapt-db"
    (claim,) = [doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


# -- the token helper ------------------------------------------------------------------------------------------
def test_mint_token_signs_a_user_token_with_the_servers_secret():
    from jose import jwt

    secret = "2" * 64
    result = subprocess.run([sys.executable, str(DEPLOY / "mint_token.py"), "alice", "--grant", "ws-user-bioadapt",
                             "--days", "1"], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "HYPHA_JWT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["sub"] == "alice" and "ws:ws-user-bioadapt#r" in claims["scope"]
    missing = subprocess.run([sys.executable, str(DEPLOY / "mint_token.py"), "alice"], capture_output=True,
                             text=True, timeout=120, check=False, env={k: v for k, v in os.environ.items()
                                                          if k not in ("HYPHA_JWT_SECRET", "JWT_SECRET")})
    assert missing.returncode == 2 and "HYPHA_JWT_SECRET" in missing.stderr


# -- docker compose config --------------------------------------------------------------------------------------
def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH: `docker compose config` not run")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[0] if (probe.stderr or probe.stdout) else ""
        pytest.skip(f"the docker client has no compose plugin ({reason}): `docker compose config` not run")
    return [docker, "compose", "--project-directory", str(DEPLOY), "-f", str(COMPOSE)]


def compose_config(compose: list[str], tmp_path: Path, secrets: dict[str, str], *args: str):
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    env = {k: v for k, v in os.environ.items() if k not in DUMMY_SECRETS}
    return subprocess.run([*compose, "--env-file", str(env_file), *args, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)


def test_docker_compose_config_accepts_the_compose_file(tmp_path):
    compose = docker_compose()
    result = compose_config(compose, tmp_path, DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"hypha", "ray-head", "ray-gpu-worker", "bioadapt"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    assert services["bioadapt"]["environment"]["RAY_AUTH_TOKEN"] == DUMMY_SECRETS["RAY_AUTH_TOKEN"]
    with_postgres = compose_config(compose, tmp_path, DUMMY_SECRETS, "--profile", "postgres")
    assert with_postgres.returncode == 0, with_postgres.stderr
    assert "postgres" in json.loads(with_postgres.stdout)["services"]
    without_token = compose_config(compose, tmp_path, {"HYPHA_JWT_SECRET": DUMMY_SECRETS["HYPHA_JWT_SECRET"]})
    assert without_token.returncode != 0 and "RAY_AUTH_TOKEN" in without_token.stderr


# -- with-ray-node.sh, with stand-ins for `ray` and `bioadapt` ----------------------------------------------------
def run_wrapper(tmp_path: Path, args: list[str], env: dict[str, str] | None = None, ray_fails: bool = False):
    """Run deploy/with-ray-node.sh with fake `ray` and `bioadapt` commands that record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, status in (("ray", 1 if ray_fails else 0), ("bioadapt", 0)):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\nexit {status}\n')
        script.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run(["bash", str(DEPLOY / "with-ray-node.sh"), *args], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "PATH": path, **(env or {})})
    recorded = {name: (tmp_path / f"{name}.args").read_text().splitlines()
                for name in ("ray", "bioadapt") if (tmp_path / f"{name}.args").exists()}
    return result, recorded


def test_with_ray_node_joins_the_cluster_then_serves_with_a_minted_token(tmp_path):
    from jose import jwt

    secret = "3" * 64
    args = ["bioadapt", "serve", "--server-url", "http://hypha:9527", "--ray-address", "ray-head:6379"]
    result, recorded = run_wrapper(tmp_path, args, {"HYPHA_JWT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    assert recorded["ray"] == ["start", "--address=ray-head:6379", "--num-cpus=0", "--num-gpus=0",
                               "--disable-usage-stats"]
    assert recorded["bioadapt"][:-2] == args[1:] and recorded["bioadapt"][-2] == "--token"
    claims = jwt.decode(recorded["bioadapt"][-1], secret, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["sub"] == "bioadapt"


def test_with_ray_node_leaves_embedded_ray_and_given_tokens_alone(tmp_path):
    args = ["bioadapt", "serve", "--ray-address=auto", "--token", "given"]
    result, recorded = run_wrapper(tmp_path, args, {"HYPHA_JWT_SECRET": "4" * 64})
    assert result.returncode == 0, result.stderr
    assert "ray" not in recorded and recorded["bioadapt"] == args[1:]


def test_with_ray_node_gives_up_on_an_unreachable_head(tmp_path):
    result, recorded = run_wrapper(tmp_path, ["bioadapt", "serve", "--ray-address", "nowhere:6379"],
                                   {"RAY_JOIN_TIMEOUT_S": "0"}, ray_fails=True)
    assert result.returncode == 1 and "could not join the Ray cluster at nowhere:6379" in result.stderr
    assert "bioadapt" not in recorded
