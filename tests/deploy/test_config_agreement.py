"""AE titles, ports and host names agree across the compose file, the node, Orthanc and the Lua script."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from dicom_node.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "docker-compose.yml"
NODE_TOML = REPO / "deploy" / "compose" / "node.toml"
ORTHANC_JSON = REPO / "orthanc" / "orthanc.json"
AUTOROUTE = REPO / "orthanc" / "autoroute.lua"


def compose() -> Any:
    return YAML(typ="safe").load(COMPOSE.read_text(encoding="utf-8"))


def orthanc_config() -> dict[str, Any]:
    """orthanc.json with the compose service's ORTHANC__ environment overrides applied."""
    config: dict[str, Any] = json.loads(ORTHANC_JSON.read_text(encoding="utf-8"))
    env = compose()["services"]["orthanc"]["environment"]
    modalities = env.get("ORTHANC__DICOM_MODALITIES")
    if modalities is not None:
        config["DicomModalities"] = json.loads(modalities)
    return config


def target_modality() -> str:
    match = re.search(r"^local TARGET_MODALITY = '([^']+)'", AUTOROUTE.read_text(encoding="utf-8"), re.M)
    assert match, "autoroute.lua: TARGET_MODALITY not found"
    return match.group(1)


def test_compose_node_config_is_valid() -> None:
    load_config(NODE_TOML)


def test_orthanc_routes_to_the_node_service_by_its_ae_title_and_port() -> None:
    node = tomllib.loads(NODE_TOML.read_text(encoding="utf-8"))["node"]
    modality = orthanc_config()["DicomModalities"][target_modality()]
    aet, host, port = modality
    assert aet == node["ae_title"]
    assert port == node["port"]
    assert host in compose()["services"], f"Orthanc routes to {host}, which is not a compose service"
    assert host == "node"
    assert str(node["port"]) in [str(p) for p in compose()["services"]["node"]["expose"]]


def test_the_node_sends_results_to_the_orthanc_service() -> None:
    config = tomllib.loads(NODE_TOML.read_text(encoding="utf-8"))
    orthanc = orthanc_config()
    for name in config["analyses"]["hippocampus"]["destinations"]:
        destination = config["destinations"][name]
        assert destination["ae_title"] == orthanc["DicomAet"]
        assert destination["port"] == orthanc["DicomPort"]
        assert destination["host"] == "orthanc" and "orthanc" in compose()["services"]
    assert orthanc["DicomAet"] in config["node"]["allowed_calling_ae_titles"]


def test_the_node_healthcheck_is_an_allowed_caller_of_the_node() -> None:
    node = tomllib.loads(NODE_TOML.read_text(encoding="utf-8"))["node"]
    test = compose()["services"]["node"]["healthcheck"]["test"]
    calling = test[test.index("--calling-ae") + 1]
    assert calling in node["allowed_calling_ae_titles"]
    assert test[-1] == f"{node['ae_title']}@127.0.0.1:{node['port']}"


def test_the_published_dicom_port_and_dicomweb_roots_match_orthanc() -> None:
    orthanc = orthanc_config()
    assert f"{orthanc['DicomPort']}:{orthanc['DicomPort']}" in compose()["services"]["orthanc"]["ports"]
    nginx = (REPO / "deploy" / "nginx" / "ohif.conf").read_text(encoding="utf-8")
    assert f"server orthanc:{orthanc['HttpPort']};" in nginx
    assert orthanc["DicomWeb"]["Root"] == "/dicom-web/" and orthanc["DicomWeb"]["WadoRoot"] == "/wado"
    app_config = (REPO / "deploy" / "ohif" / "app-config.js").read_text(encoding="utf-8")
    assert "qidoRoot: '/dicom-web'" in app_config and "wadoUriRoot: '/wado'" in app_config


def test_the_dockerfile_healthcheck_matches_the_compose_one() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    test = compose()["services"]["node"]["healthcheck"]["test"][1:]
    assert json.dumps(test) in dockerfile
