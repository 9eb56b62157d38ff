"""docker compose, Dockerfiles, nginx and systemd files, checked offline (no Docker engine in CI)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from deploy.local.ohif_proxy import split_includefield

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_SCALE_OUT = DEPLOY / "docker-compose.scale-out.yml"
DOCKERFILES = {  # Dockerfile: its build context
    DEPLOY / "Dockerfile": REPO,
    DEPLOY / "ohif" / "Dockerfile": DEPLOY,
}
VENV_BIN = Path(sys.executable).parent


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def tool(name: str) -> str:
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh --test")
    return found


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_SCALE_OUT], ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_specification(path: Path) -> None:
    run = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def single_box(compose: Any) -> dict[str, Any]:
    """The services `docker compose up` starts without a profile."""
    return {name: service for name, service in compose["services"].items() if not service.get("profiles")}


def test_every_service_restarts_checks_its_health_and_pins_its_image() -> None:
    compose = load_yaml(COMPOSE)
    default = single_box(compose)
    assert set(default) == {"orthanc", "node", "ohif"}  # the single box, nothing else to run
    for name, service in default.items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert "secrets" not in service, f"{name}: the single box reads no secret file"
        assert set(service.get("depends_on", {})) <= set(default), f"{name} waits for a profiled service"
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
                assert mount.endswith(":ro"), f"{name}: configuration {source} must be read-only"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_orthanc_service_uses_the_repository_configuration_and_nodelay() -> None:
    orthanc = load_yaml(COMPOSE)["services"]["orthanc"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in orthanc["volumes"]}
    assert mounts["../orthanc/orthanc.json"] == "/etc/orthanc/orthanc.json"
    assert mounts["../orthanc/autoroute.lua"] == "/etc/orthanc/autoroute.lua"
    env = orthanc["environment"]
    assert env["TCP_NODELAY"] == "1"
    assert json.loads(env["ORTHANC__LUA_SCRIPTS"]) == ["/etc/orthanc/autoroute.lua"]
    assert "8042" not in json.dumps(orthanc.get("ports", [])), "Orthanc's unauthenticated HTTP must stay inside compose"


def test_gpu_override_reserves_nvidia_devices_for_the_node_only() -> None:
    gpu = load_yaml(COMPOSE_GPU)
    assert set(gpu["services"]) == {"node"}
    (device,) = gpu["services"]["node"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("dockerfile", list(DOCKERFILES), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    run = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", list(DOCKERFILES), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_pins_its_bases_and_copies_only_what_exists(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    context = DOCKERFILES[dockerfile]
    stages = set()
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
            if " AS " in args.upper():
                stages.add(args.split()[-1])
        assert keyword != "ADD", "use COPY (ADD fetches URLs and unpacks archives implicitly)"
        if keyword == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert (context / source).exists(), f"COPY source {source} missing from {context}"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions)


def test_node_image_runs_as_an_unprivileged_user_with_pinned_torch() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "torch==2.13.0" in runs and "--index-url" in runs


def test_dockerignore_lets_every_copied_path_through() -> None:
    """The root .dockerignore excludes everything but what deploy/Dockerfile copies."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for keyword, args in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    ohif_allowed = (DEPLOY / ".dockerignore").read_text()
    assert "!nginx/" in ohif_allowed and "!ohif/app-config.js" in ohif_allowed


INCLUDEFIELD_CASES = [
    "",
    "limit=25",
    "includefield=00081030,00080060&limit=101&offset=0",
    "includefield=00081030%2C00080060",
    "PatientName=a%2Cb&includefield=0020000D",
    "includefield=a,,b&fuzzymatching=false&includefield=c",
]


def test_nginx_njs_and_local_proxy_split_includefield_alike() -> None:
    """deploy/nginx/includefield.js and ohif_proxy.split_includefield give the same queries."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run scripts/setup.sh --test")
    source = (DEPLOY / "nginx" / "includefield.js").read_text().replace("export default", "module.exports =")
    script = source + "\nprocess.stdout.write(JSON.stringify(" + json.dumps(INCLUDEFIELD_CASES) + ".map(splitQuery)));"
    run = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(run.stdout) == [split_includefield(q) for q in INCLUDEFIELD_CASES]
    assert split_includefield(INCLUDEFIELD_CASES[2]) == "includefield=00081030&includefield=00080060&limit=101&offset=0"
    assert split_includefield(INCLUDEFIELD_CASES[4]) == INCLUDEFIELD_CASES[4]


def test_nginx_serves_the_app_at_the_root_and_proxies_dicomweb() -> None:
    conf = (DEPLOY / "nginx" / "ohif.conf").read_text()
    assert "try_files $uri $uri/ /index.html;" in conf
    assert "application/wasm wasm;" in conf
    for prefix in ("/dicom-web/", "/wado"):
        assert f"location ^~ {prefix} {{" in conf
    assert conf.count("proxy_pass http://orthanc$uri$is_args$dicomweb_args;") == 2
    assert "server orthanc:8042;" in conf


def test_systemd_unit_runs_the_node_unprivileged_with_nodelay() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / "dicom-node.service").read_text())
    service = unit["Service"]
    assert service["User"] == "dicom-node" and service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith("dicom-node serve --config /etc/dicom-node/node.toml")
    assert "TCP_NODELAY=1" in (DEPLOY / "systemd" / "dicom-node.service").read_text()
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # present on Debian; its only complaint here is the absent venv
        run = subprocess.run([analyze, "verify", str(DEPLOY / "systemd" / "dicom-node.service")],
                             capture_output=True, text=True, timeout=60)
        problems = [line for line in (run.stdout + run.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]
        assert not problems, problems


def test_scale_out_adds_postgres_and_scalable_workers_sharing_no_volume_with_the_node() -> None:
    from dicom_node.config import load_config

    compose = load_yaml(COMPOSE)
    services = compose["services"]
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert {name: profiles[name] for name in ("postgres", "db-upgrade", "worker", "worker-gpu")} == {
        "postgres": ["scale-out"], "db-upgrade": ["scale-out"], "worker": ["scale-out"], "worker-gpu": ["gpu"]}
    override = load_yaml(COMPOSE_SCALE_OUT)
    assert set(override["services"]) == {"node"}  # the override only re-points the receiving node
    node = override["services"]["node"]
    assert node["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
    assert set(node["secrets"]) == {"db-password", "api-token"}
    services = {**services, "node": node}
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15.") and postgres["healthcheck"]["test"][1] == "pg_isready"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db-password"
    assert services["db-upgrade"]["command"][:2] == ["db", "upgrade"]
    worker = services["worker"]
    assert worker["command"][0] == "worker" and worker["command"][-2:] == ["--device", "cpu"]
    # `--scale worker=N`: nothing that two replicas would clash on
    assert "container_name" not in worker and "ports" not in worker
    assert not any(str(m).startswith("node-data") for m in worker.get("volumes", []))
    assert worker["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["command"][-1] == "cuda:0"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name in ("node", "worker", "worker-gpu"):
        mounts = [m.split(":")[0] for m in services[name]["volumes"]]
        assert "./compose/node-scale-out.toml" in mounts, name
    # the configuration they mount: PostgreSQL at the postgres service, workers fetch from the node
    config = load_config(DEPLOY / "compose" / "node-scale-out.toml")
    assert config.state.backend == "postgresql" and config.state.dsn is not None
    assert "@postgres:5432/" in config.state.dsn
    assert str(config.state.password_file) == "/run/secrets/db-password"
    assert config.queue.instances == "http" and config.queue.receiver_url == f"http://node:{config.api.port}"
    assert str(config.api.port) in [str(p) for p in services["node"]["expose"]]
    assert str(config.api.token_file) == "/run/secrets/api-token"
    assert set(compose["secrets"]) == {"db-password", "api-token"}
    for secret in compose["secrets"].values():  # the secrets folder keeps them out of git
        path = DEPLOY / secret["file"]
        run = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, timeout=30)
        assert run.returncode == 0, f"{path} is not ignored by git"


def test_systemd_worker_unit_runs_one_worker_per_device_unprivileged() -> None:
    path = DEPLOY / "systemd" / "dicom-node-worker@.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    service = unit["Service"]
    assert service["User"] == "dicom-node" and service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith(
        "dicom-node worker --config /etc/dicom-node/node.toml --data-dir /var/lib/dicom-node-worker/%i --device %i")
    assert int(service["TimeoutStopSec"]) > 600  # longer than the default queue.stop_grace_s
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        run = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (run.stdout + run.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]
        assert not problems, problems
