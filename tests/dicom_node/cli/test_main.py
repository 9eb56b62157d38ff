"""The dicom-node command line, as an admin and a researcher use it."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from dicom_node.cli.main import ENTRY_POINT_GROUP, build_parser, main
from dicom_node.state.records import InstanceRecord, PlannedJob
from dicom_node.state.sqlite import SqliteLedger
from tests.conftest import HIPPO_CROP_STUDY1, REPO

pytestmark = pytest.mark.slow


def test_check_config_prints_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(REPO / "deploy" / "node.toml"), "--port", "11113",
                 "--destination", "ARCHIVE@archive:104"]) == 0
    out = capsys.readouterr().out
    assert "port = 11113" in out
    assert '[destinations.archive]\nae_title = "ARCHIVE"\nhost = "archive"\nport = 104' in out


def test_serve_run_analyses_flag_sets_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli.arguments import config_from_args

    parser = build_parser(commands=[])
    config_file = REPO / "deploy" / "node.toml"
    flagged = config_from_args(parser.parse_args(["serve", "--config", str(config_file), "--run-analyses"]))
    plain = config_from_args(parser.parse_args(["serve", "--config", str(config_file)]))
    assert flagged.queue.serve_runs_analyses and not plain.queue.serve_runs_analyses
    assert flagged.model_dump(exclude={"queue"}) == plain.model_dump(exclude={"queue"})
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "queue.serve_runs_analyses" in " ".join(capsys.readouterr().out.split())


def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text("[workers]\ndevice = 'gpu'\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.toml: workers.device: device 'gpu' is not one of" in err


def test_check_config_loads_the_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key",
                    "-out", "node.pem", "-days", "1", "-subj", "/CN=node"],
                   cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "broken.pem").write_text("not a certificate\n")
    config = tmp_path / "node.toml"

    def check(certificate: str) -> int:
        config.write_text(f'[node.tls]\ncertificate = "{tmp_path / certificate}"\n'
                          f'private_key = "{tmp_path / "node.key"}"\n'
                          f'ca_certificates = "{tmp_path / "node.pem"}"\n')
        return main(["check-config", "--config", str(config), "--destination", "PACS@pacs:2762+tls"])

    assert check("node.pem") == 0
    out = capsys.readouterr().out
    assert "[node.tls]" in out and "tls = true" in out
    assert check("broken.pem") == 2
    assert "node.tls: the TLS files cannot be used: " in capsys.readouterr().err


def test_status_shows_failures_and_retry_requeues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(InstanceRecord("1.2.3.1", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4",
                                          "1.2.840.10008.1.2.1", "/x", 1, "ORTHANC", 1.0),
                           {"modality": "MR", "description": "", "sop_class_uid": "", "manufacturer": "",
                            "rows": 1, "columns": 1, "orientation": None, "pixel_spacing": None,
                            "slice_thickness": None, "number_of_frames": None})
    (uid,) = ledger.complete_study("1.2", 2.0, [PlannedJob("hippocampus", "1.2.3")])
    job = ledger.claim_next_job(3.0, ["hippocampus"])
    assert job is not None
    ledger.finish_job(job.id, 4.0, state="done", deliveries=[("pacs", ["/r/seg.dcm"])],
                      summary={"measurements": [{"name": "v", "structure": "Hippocampus anterior",
                                                 "value": 1234.5, "unit": "mm3"}]})
    (delivery,) = ledger.due_deliveries(4.0)
    ledger.delivery_failed(delivery.id, 5.0, "cannot connect to ORTHANC@pacs:4242", retry_at=None)
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "deliveries pacs:dead" in out
    assert "Hippocampus anterior 1234.5 mm3" in out
    assert "pacs: dead after 1 attempt(s): cannot connect to ORTHANC@pacs:4242" in out
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["deliveries"] == {"dead": 1}
    assert main(["retry", "--data-dir", str(tmp_path)]) == 0
    assert "1 dead-lettered delivery(ies) re-queued" in capsys.readouterr().out
    assert SqliteLedger(tmp_path / "ledger.sqlite3").counts().deliveries == {"pending": 1}
    assert uid


def test_status_without_a_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "no ledger at" in capsys.readouterr().err
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_command_package_that_fails_is_named_and_the_others_still_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = EntryPoint("broken", "offline.no_such_module:add_parsers", ENTRY_POINT_GROUP)
    convert = EntryPoint("convert", "offline.convert:add_parsers", ENTRY_POINT_GROUP)
    parser = build_parser([broken, convert])
    err = capsys.readouterr().err
    assert "entry point 'broken' (offline.no_such_module:add_parsers)" in err
    assert "ModuleNotFoundError" in err
    args = parser.parse_args(["convert", "to-hdf5", "in", "out.h5", "out.json"])
    assert args.direction == "to-hdf5"
    assert parser.parse_args(["status", "--json"]).json


def test_the_node_names_no_analysis_and_has_no_offline_command_of_its_own() -> None:
    source = (REPO / "dicom_node" / "cli" / "main.py").read_text().lower()
    for name in ("hippocampus", "bodycomp", "body-composition", "body composition", "classifier", "blur"):
        assert name not in source, name
    assert "import offline" not in source and "from offline" not in source
    parser = build_parser([])
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "x", "--out", "y"])


def test_installed_commands_share_the_train_group(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["train", "hippocampus", "--epochs", "1"]).model == "hippocampus"
    assert parser.parse_args(["train", "slice-selection", "data", "models"]).model == "slice-selection"
    assert parser.parse_args(["batch", "a", "b", "--out", "o"]).workers == 2


def test_log_file_gets_every_line_and_rotates(tmp_path: Path) -> None:
    import logging

    from dicom_node.cli.main import add_log_file
    from dicom_node.errors import ConfigError

    log = tmp_path / "logs" / "debug.log"
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        add_log_file(log, max_bytes=4096, backup_count=2)
        add_log_file(log, max_bytes=4096, backup_count=2)  # once per file, not twice
        assert len(root.handlers) == len(before) + 1
        for k in range(200):
            logging.getLogger("dicom_node.test").info("line %03d of the rotation test", k)
        assert "line 199 of the rotation test" in log.read_text(encoding="utf-8")
        assert (tmp_path / "logs" / "debug.log.1").is_file() and (tmp_path / "logs" / "debug.log.2").is_file()
        assert not (tmp_path / "logs" / "debug.log.3").exists()
        assert log.stat().st_size <= 4096
        with pytest.raises(ConfigError, match="--log-file: cannot write"):
            add_log_file(tmp_path / "logs" / "debug.log.1" / "x.log", key="--log-file")
    finally:
        for handler in root.handlers[len(before):]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def test_batch_commands_log_to_a_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    log = tmp_path / "debug.log"
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--log-file", str(log), "convert", "to-hdf5",
                           str(HIPPO_CROP_STUDY1), str(tmp_path / "v.h5"), str(tmp_path / "v.json")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "offline.hdf5: wrote" in log.read_text(encoding="utf-8")
    assert "offline.hdf5: wrote" in done.stderr  # and still on stderr
def test_status_counts_low_confidence_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    series = {"modality": "MR", "description": "", "sop_class_uid": "", "manufacturer": "", "rows": 1,
              "columns": 1, "orientation": None, "pixel_spacing": None, "slice_thickness": None,
              "number_of_frames": None}
    for k, low in enumerate((True, False, True)):
        study = f"1.2.{k}"
        ledger.record_instance(InstanceRecord(f"{study}.9.1", f"{study}.9", study, "1.2.840.10008.5.1.4.1.1.4",
                                              "1.2.840.10008.1.2.1", "/x", 1, "ORTHANC", 1.0), series)
        ledger.complete_study(study, 2.0, [PlannedJob("hippocampus", f"{study}.9")])
        job = ledger.claim_next_job(3.0, ["hippocampus"])
        assert job is not None
        reasons = ["image and mirror disagree (Dice 0.13 < 0.87)"] if low else []
        ledger.finish_job(job.id, 4.0, state="done",
                          summary={"quality": {"low_confidence": low, "reasons": reasons, "checks": {}}})
    assert ledger.counts().low_confidence == 2
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Low-confidence results: 2" in out
    assert out.count("LOW CONFIDENCE: image and mirror disagree (Dice 0.13 < 0.87)") == 2
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["results"] == {"low_confidence": 2}
