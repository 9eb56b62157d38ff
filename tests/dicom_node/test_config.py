from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import build_config, load_config, parse_destination, validate_ae_title
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid() -> None:
    config = build_config({})
    assert config.node.ae_title == "DICOMNODE"
    assert config.node.port == 11112
    assert config.grouping.quiet_period_s <= config.grouping.max_wait_s
    assert "hippocampus" in config.analyses


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("A" * 17, "longer than 16"),
        ("AB\\CD", "backslash"),
        ("AB\x07", "control"),
    ],
)
def test_bad_ae_titles_are_refused_with_a_reason(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_ae_title(value)


def test_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[destinations.pacs]\nae_title = "ORTHANC"\nhost = "pacs"\nport = 70000\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        "node.toml: destinations.pacs.port: Input should be less than or equal to 65535"
    )


def test_every_error_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\nport = 0\nunknown = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "node.ae_title: AE title 'WAY_TOO_LONG_AE_TITLE' is longer than 16 characters" in text
    assert "node.port: Input should be greater than or equal to 1" in text
    assert "node.unknown: Extra inputs are not permitted" in text


def test_unknown_destination_in_analysis_is_refused() -> None:
    with pytest.raises(ConfigError, match="analyses.hippocampus.destinations names 'pacs'"):
        build_config({"analyses": {"hippocampus": {"plugin": "hippocampus", "destinations": ["pacs"]}}})


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_is_frozen() -> None:
    config = build_config({})
    with pytest.raises(Exception, match="frozen"):
        config.node.port = 1  # type: ignore[misc]


def test_parse_destination() -> None:
    assert parse_destination("ORTHANC@pacs.example:4242") == (
        "orthanc", {"ae_title": "ORTHANC", "host": "pacs.example", "port": 4242}
    )
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        parse_destination("ORTHANC:4242")


def test_example_config_in_deploy_is_valid() -> None:
    config = load_config(REPO / "deploy" / "node.toml")
    assert config.destinations
    assert config.destinations_for("hippocampus")


def test_effective_config_round_trips_through_toml(tmp_path: Path) -> None:
    from dicom_node.config import dump_toml

    config = load_config(REPO / "deploy" / "node.toml")
    path = tmp_path / "effective.toml"
    path.write_text(dump_toml(config.model_dump(mode="json")))
    assert load_config(path) == config


def test_state_defaults_to_sqlite_and_postgresql_needs_a_dsn() -> None:
    assert build_config({}).state.backend == "sqlite"
    with pytest.raises(ConfigError, match=r"node.toml: state: backend .postgresql. needs dsn = \"postgresql://USER@HOST:PORT/DB\""):
        build_config({"state": {"backend": "postgresql"}}, source="node.toml")
    with pytest.raises(ConfigError, match=r"node.toml: state.backend: Input should be 'sqlite' or 'postgresql'"):
        build_config({"state": {"backend": "mysql"}}, source="node.toml")


@pytest.mark.parametrize("dsn", [
    "postgresql://node:secret@db:5432/dicomnode",
    "postgresql://node@db:5432/dicomnode?password=secret",
])
def test_a_password_in_the_dsn_is_refused(dsn: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"state": {"backend": "postgresql", "dsn": dsn}}, source="node.toml")
    message = str(caught.value)
    assert message.startswith("node.toml: state.dsn: the dsn must not hold a password")
    assert "DICOM_NODE_DB_PASSWORD" in message and "secret" not in message


def test_dsn_must_be_a_postgresql_url() -> None:
    with pytest.raises(ConfigError, match=r"state.dsn: 'db:5432' is not a PostgreSQL URL"):
        build_config({"state": {"backend": "postgresql", "dsn": "db:5432"}}, source="node.toml")


def test_password_from_file_or_environment(tmp_path: Path) -> None:
    dsn = "postgresql://node@db:5432/dicomnode"
    from_env = build_config({"state": {"backend": "postgresql", "dsn": dsn}}).state
    assert from_env.password({"DICOM_NODE_DB_PASSWORD": "s3cret"}) == "s3cret"
    assert from_env.password({}) is None
    secret = tmp_path / "db-password"
    secret.write_text("from-file\n")
    from_file = build_config({"state": {"backend": "postgresql", "dsn": dsn,
                                        "password_file": str(secret)}}).state
    assert from_file.password({"DICOM_NODE_DB_PASSWORD": "ignored"}) == "from-file"
    secret.write_text("\n")
    with pytest.raises(ConfigError, match=r"state.password_file: .* is empty"):
        from_file.password({})
    secret.unlink()
    with pytest.raises(ConfigError, match=r"state.password_file: cannot read"):
        from_file.password({})


def test_sqlite_takes_no_dsn() -> None:
    with pytest.raises(ConfigError, match=r"state: dsn and password_file apply only to backend"):
        build_config({"state": {"dsn": "postgresql://node@db/dicomnode"}})


def test_http_instances_need_a_receiver_url() -> None:
    with pytest.raises(ConfigError, match=r'node.toml: queue: instances = "http" needs receiver_url'):
        build_config({"queue": {"instances": "http"}}, source="node.toml")
    with pytest.raises(ConfigError, match=r"node.toml: queue.receiver_url: 'node:8080' is not an http"):
        build_config({"queue": {"instances": "http", "receiver_url": "node:8080"}}, source="node.toml")
    queue = build_config({"queue": {"instances": "http", "receiver_url": "https://node:8080/"}}).queue
    assert queue.receiver_url == "https://node:8080"
    with pytest.raises(ConfigError, match=r"queue: stalled_after_s must be at least twice heartbeat_s"):
        build_config({"queue": {"heartbeat_s": 20, "stalled_after_s": 30}})
    with pytest.raises(ConfigError, match=r"analyses.hippocampus.devices: name at least one device class: 'cuda', 'cpu' or both"):
        build_config({"analyses": {"hippocampus": {"plugin": "hippocampus", "devices": []}}})
