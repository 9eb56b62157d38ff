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
    assert queue.receiver_url == "https://node:8080" and queue.receivers() == ("https://node:8080",)
    queue = build_config({"queue": {"instances": "http",
                                    "receiver_urls": ["https://a:8080/", "https://b:8080"]}}).queue
    assert queue.receivers() == ("https://a:8080", "https://b:8080")
    with pytest.raises(ConfigError, match=r"queue.receiver_urls: 'https://a:8080' is listed twice"):
        build_config({"queue": {"instances": "http", "receiver_urls": ["https://a:8080/", "https://a:8080"]}})
    with pytest.raises(ConfigError, match=r"queue.receiver_urls: 'b' is not an http"):
        build_config({"queue": {"instances": "http", "receiver_urls": ["https://a:8080", "b"]}})
    with pytest.raises(ConfigError, match=r"queue: give receiver_url \(one receiving node\) or receiver_urls, not both"):
        build_config({"queue": {"instances": "http", "receiver_url": "http://a:1", "receiver_urls": ["http://b:1"]}})
    with pytest.raises(ConfigError, match=r"queue: stalled_after_s must be at least twice heartbeat_s"):
        build_config({"queue": {"heartbeat_s": 20, "stalled_after_s": 30}})
    with pytest.raises(ConfigError, match=r"queue: forget_workers_after_s must be at least stalled_after_s"):
        build_config({"queue": {"forget_workers_after_s": 20}})
    with pytest.raises(ConfigError, match=r"analyses.hippocampus.devices: name at least one device class: 'cuda', 'cpu' or both"):
        build_config({"analyses": {"hippocampus": {"plugin": "hippocampus", "devices": []}}})
def test_a_source_validates_with_errors_naming_the_key(tmp_path: Path) -> None:
    config = build_config({"sources": {"pacs": {"ae_title": "ORTHANC", "url": "http://pacs:8042/"}}})
    assert config.sources["pacs"].mode == "push"
    assert config.sources["pacs"].url == "http://pacs:8042"
    assert config.source_for_caller("ORTHANC") == "pacs"
    assert config.source_for_caller("OTHER") is None
    cases = [
        ({"ae_title": "ORTHANC", "url": "pacs:8042"}, "sources.pacs.url: url 'pacs:8042' is not an http"),
        ({"ae_title": "ORTHANC", "url": "http://pacs", "mode": "poll"},
         "sources.pacs.mode: Input should be 'push' or 'pull'"),
        ({"ae_title": "A" * 17, "url": "http://pacs"}, "sources.pacs.ae_title: AE title"),
        ({"ae_title": "ORTHANC", "url": "http://pacs", "username": "ai"},
         "sources.pacs: username needs password_file or password_env"),
        ({"ae_title": "ORTHANC", "url": "http://pacs", "username": "ai", "password_env": "X",
          "password_file": "/x"}, "sources.pacs: give password_file or password_env, not both"),
        ({"url": "http://pacs"}, "sources.pacs.ae_title: Field required"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as caught:
            build_config({"sources": {"pacs": table}}, source="node.toml")
        assert f"node.toml: {message}" in str(caught.value)
    with pytest.raises(ConfigError, match="ae_title 'ORTHANC' is also the AE title of sources.a"):
        build_config({"sources": {"a": {"ae_title": "ORTHANC", "url": "http://a"},
                                  "b": {"ae_title": "ORTHANC", "url": "http://b"}}})


def test_a_source_password_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "orthanc-password"
    secret.write_text("s3cret\n")
    config = build_config({"sources": {
        "f": {"ae_title": "F", "url": "http://f", "username": "ai", "password_file": str(secret)},
        "e": {"ae_title": "E", "url": "http://e", "username": "ai", "password_env": "NODE_TEST_ORTHANC_PW"},
        "m": {"ae_title": "M", "url": "http://m", "username": "ai", "password_file": str(tmp_path / "none")},
    }})
    assert config.sources["f"].password("f") == "s3cret"
    monkeypatch.delenv("NODE_TEST_ORTHANC_PW", raising=False)
    with pytest.raises(ConfigError, match="sources.e.password_env: the environment variable"
                                          " NODE_TEST_ORTHANC_PW is not set"):
        config.sources["e"].password("e")
    monkeypatch.setenv("NODE_TEST_ORTHANC_PW", "from-env")
    assert config.sources["e"].password("e") == "from-env"
    with pytest.raises(ConfigError, match="sources.m.password_file: cannot read"):
        config.sources["m"].password("m")


def test_an_analysis_may_send_its_results_to_a_source_by_rest() -> None:
    sources = {"pacs": {"ae_title": "ORTHANC", "url": "http://pacs:8042"}}
    config = build_config({"sources": sources,
                           "analyses": {"hippocampus": {"plugin": "hippocampus", "destinations": ["source:pacs"]}}})
    assert config.destinations_for("hippocampus") == ("source:pacs",)
    with pytest.raises(ConfigError, match="analyses.hippocampus.destinations names 'source:archive',"
                                          " but \\[sources\\] has no 'archive' \\(pacs\\)"):
        build_config({"sources": sources,
                      "analyses": {"hippocampus": {"plugin": "hippocampus", "destinations": ["source:archive"]}}})
def test_connection_limits_default_for_a_busy_pacs_and_name_the_key(tmp_path: Path) -> None:
    node = build_config({}).node
    assert node.max_associations >= 20  # a PACS flushing its queue opens many at once
    assert node.max_connections_per_address >= node.max_associations
    path = tmp_path / "node.toml"
    path.write_text("[node]\nmax_pending_connections = 0\nassociation_wait_s = 90\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "node.max_pending_connections: Input should be greater than or equal to 1" in str(info.value)
    assert "node.association_wait_s: Input should be less than or equal to 60" in str(info.value)


def test_tls_keys_are_checked_and_destinations_take_the_node_files(tmp_path: Path) -> None:
    for name in ("node.pem", "node.key", "ca.pem"):
        (tmp_path / name).write_text("PEM\n")
    node_tls = (f'[node.tls]\ncertificate = "{tmp_path / "node.pem"}"\n'
                f'private_key = "{tmp_path / "node.key"}"\nca_certificates = "{tmp_path / "ca.pem"}"\n')
    path = tmp_path / "node.toml"
    path.write_text(node_tls + '[destinations.pacs]\nae_title = "PACS"\nhost = "pacs"\nport = 2762\n'
                    'tls = true\nallowed_peer_names = ["pacs.example.org"]\n')
    config = load_config(path)
    pacs = config.destinations["pacs"]
    assert pacs.tls and pacs.certificate == tmp_path / "node.pem"
    assert pacs.ca_certificates == tmp_path / "ca.pem" and pacs.allowed_peer_names == ("pacs.example.org",)
    cases = {
        f'[node.tls]\ncertificate = "{tmp_path / "node.pem"}"\n':
            "node.tls: certificate and private_key go together",
        f'[node.tls]\ncertificate = "{tmp_path / "missing.pem"}"\nprivate_key = "{tmp_path / "node.key"}"\n':
            f"node.tls.certificate: file '{tmp_path / 'missing.pem'}' does not exist",
        '[node.tls]\nrequire_client_certificate = true\n':
            "node.tls: require_client_certificate needs ca_certificates",
        '[destinations.pacs]\nae_title = "PACS"\nhost = "pacs"\nport = 2762\ntls = true\n':
            "destinations.pacs.ca_certificates (or node.tls.ca_certificates) is needed with tls = true",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert message in str(info.value), str(info.value)


def test_destination_option_understands_tls() -> None:
    assert parse_destination("ORTHANC@pacs:2762+tls") == (
        "orthanc", {"ae_title": "ORTHANC", "host": "pacs", "port": 2762, "tls": True})
    assert "tls" not in parse_destination("ORTHANC@pacs:4242")[1]
def test_job_server_keys_are_validated_and_default_under_the_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[api]\njobs_root = "jobs"\n[api.job_names]\n"3dblur" = ""\n[node]\nlog_max_bytes = 10\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "node.toml: api.jobs_root: jobs_root 'jobs' must be an absolute path" in text
    assert "node.toml: api.job_names: job name '3dblur' -> '': neither may be empty" in text
    assert "node.toml: node.log_max_bytes: Input should be greater than or equal to 4096" in text
    config = build_config({"node": {"data_dir": str(tmp_path)}})
    assert config.api.jobs_folder(config.node.data_dir) == tmp_path / "jobs"
    assert config.api.job_names == {"3dblur": "gaussian-blur"} and config.node.log_file is None
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
