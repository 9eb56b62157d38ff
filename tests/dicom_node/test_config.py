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


def test_priors_pacs_url_must_be_http(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[priors]\npacs_url = "pacs.example.org:8042"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "node.toml: priors.pacs_url: must be an http:// or https:// URL, got 'pacs.example.org:8042'"
    path.write_text('[priors]\npacs_url = "http://pacs.example.org:8042"\ntimeout_s = 5\n')
    config = load_config(path)
    assert (config.priors.pacs_url, config.priors.timeout_s, config.priors.enabled) == (
        "http://pacs.example.org:8042", 5.0, True)
