"""DICOM TLS between Orthanc and the node, both ways, with certificates made here by ``openssl``."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import (
    DCMTK_ENV,
    NODE_MODALITY,
    OrthancProcess,
    StoreScpProcess,
    free_port,
    wait_until,
)
from dicom_node.cli.main import main
from dicom_node.config import Destination
from dicom_node.deliver.sender import send_files
from dicom_node.errors import DeliveryFailed
from tests.conftest import HIPPO_DICOM
from tests.integration.conftest import OrthancFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERIES = HIPPO_DICOM / "Study2" / "14_HCropVolume"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, certificates it signs for the node, Orthanc and a client, and a rogue
    self-signed certificate with the same names that the CA never signed."""
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=dicom-node test CA", cwd=folder)
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("node", "orthanc", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=folder)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem",
            "-days", "2", "-subj", "/CN=client", "-addext", "subjectAltName=IP:127.0.0.1", cwd=folder)
    return {path.stem if path.suffix == ".pem" else f"{path.stem}.key": path
            for path in folder.iterdir() if path.suffix in (".pem", ".key")}


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def tls_pair(tmp_path: Path, certs: dict[str, Path],
             make_orthanc: OrthancFactory) -> Iterator[tuple[NodeProcess, OrthancProcess]]:
    """A node and an Orthanc that speak DICOM only over TLS and require each other's certificate."""
    node_port, orthanc_port = free_port(), free_port()
    orthanc = make_orthanc(dicom_port=orthanc_port, overrides={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs["orthanc"]),
        "DicomTlsPrivateKey": str(certs["orthanc.key"]),
        "DicomTlsTrustedCertificates": str(certs["ca"]),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {NODE_MODALITY: {"AET": "DICOMNODE", "Host": "127.0.0.1",
                                            "Port": node_port, "UseDicomTls": True}},
    })
    node = NodeProcess(tmp_path / "node", port=node_port,
                       destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc_port)},
                       config={"node": {"allowed_calling_ae_titles": [],
                                        "tls": {"certificate": str(certs["node"]),
                                                "private_key": str(certs["node.key"]),
                                                "ca_certificates": str(certs["ca"]),
                                                "require_client_certificate": True}},
                               "destinations": {"pacs": {"tls": True}},
                               "api": {"enabled": True, "port": free_port()}})
    node.start()
    yield node, orthanc
    node.stop()
    print(node.log_text()[-6000:])


def echo_with(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = (context, "127.0.0.1") if context is not None else None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=tls_args)
    except (OSError, ssl.SSLError):
        return False
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    elif assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        assoc.dul.socket.socket.close()  # pynetdicom leaves a failed TLS socket open
    return established


def client_context(certs: dict[str, Path], name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs["ca"])
    if name is not None:
        context.load_cert_chain(certs[name], certs[f"{name}.key"])
    return context


def test_orthanc_and_node_exchange_a_study_and_its_results_over_tls(
    tls_pair: tuple[NodeProcess, OrthancProcess], certs: dict[str, Path]
) -> None:
    node, orthanc = tls_pair
    files = sorted(SERIES.glob("*.dcm"))
    for path in files:
        orthanc.upload(path)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    def results_in_orthanc() -> list[str] | None:  # Orthanc -> node, analysis, node -> Orthanc
        series = orthanc.get_json("/series?expand")
        made = [s["MainDicomTags"].get("Modality") for s in series
                if s["MainDicomTags"].get("Modality") in ("SEG", "SR", "OT")]
        return made if len(made) >= 2 else None

    wait_until(results_in_orthanc, deadline_s=180, what="results back in Orthanc over TLS", poll_s=1.0)
    jobs = [j for j in node.ledger().job_rows(limit=100) if j.study_uid == study_uid]
    assert [d.state for j in jobs if j.analysis == "hippocampus" for d in j.deliveries] == ["sent"]
    log = node.log_text()
    assert "(DICOM TLS)" in log and "Traceback" not in log
    # the HTTP API serves HTTPS with the same certificate and client check
    api = f"https://127.0.0.1:{node.config['api']['port']}/healthz"
    with urllib.request.urlopen(api, context=client_context(certs, "client"), timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(api, context=client_context(certs, None), timeout=10)


def test_peers_without_a_valid_certificate_and_clear_text_are_refused(
    tls_pair: tuple[NodeProcess, OrthancProcess], certs: dict[str, Path]
) -> None:
    node, _ = tls_pair
    # a peer that opens the TLS port and says nothing holds up no handshake but its own
    with socket.create_connection(("127.0.0.1", node.port), timeout=10):
        started = time.monotonic()
        assert echo_with(node.port, client_context(certs, "client"))
        assert time.monotonic() - started < 2.0
    assert not echo_with(node.port, client_context(certs, None))  # no certificate
    assert not echo_with(node.port, client_context(certs, "rogue"))  # not signed by the CA
    legacy = client_context(certs, "client")
    with warnings.catch_warnings():  # deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.minimum_version = legacy.maximum_version = ssl.TLSVersion.TLSv1_1
    assert not echo_with(node.port, legacy)  # TLS 1.1 is too old
    clear = subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                            str(sorted(SERIES.glob("*.dcm"))[0])],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **DCMTK_ENV})
    assert clear.returncode != 0
    assert not node.ledger().series_of_study(
        str(pydicom.dcmread(sorted(SERIES.glob("*.dcm"))[0], stop_before_pixels=True).StudyInstanceUID))
    assert echo_with(node.port, client_context(certs, "client"))  # still serving
    log = node.log_text()
    assert "Traceback" not in log
    assert "association with 127.0.0.1:" in log  # the refusals, one WARNING each


@pytest.fixture
def tls_storescp(tmp_path: Path, certs: dict[str, Path]) -> Iterator[StoreScpProcess]:
    """DCMTK storescp over DICOM TLS only, with Orthanc's certificate, requiring a client's."""
    scp = StoreScpProcess(tmp_path / "tls-storescp", aet="PACS", options=[
        "+tls", str(certs["orthanc.key"]), str(certs["orthanc"]), "+cf", str(certs["ca"])])
    scp.start()
    yield scp
    scp.stop()
    print(scp.log_text()[-3000:])


def tls_destination(scp: StoreScpProcess, certs: dict[str, Path], **options: object) -> Destination:
    return Destination(ae_title=scp.aet, host=scp.host, port=scp.port, tls=True,
                       certificate=certs["node"], private_key=certs["node.key"],
                       ca_certificates=certs["ca"], **options)


def test_allowed_peer_names_are_checked_against_the_certificate_of_a_real_peer(
    tls_storescp: StoreScpProcess, certs: dict[str, Path]
) -> None:
    files = sorted(SERIES.glob("*.dcm"))[:2]
    # its certificate: CN orthanc, subjectAltName IP 127.0.0.1 and DNS localhost
    for allowed in (("localhost",), ("orthanc",), ("pacs.example.org", "127.0.0.1")):
        stored = send_files(files[:1], tls_destination(tls_storescp, certs, allowed_peer_names=allowed),
                            calling_ae_title="DICOMNODE")
        assert len(stored) == 1
    assert len(tls_storescp.wait_for_count(3, deadline_s=10)) == 3
    with pytest.raises(DeliveryFailed) as info:
        send_files(files, tls_destination(tls_storescp, certs, allowed_peer_names=("pacs.example.org",)),
                   calling_ae_title="DICOMNODE")
    message = str(info.value)
    assert "presented a certificate for 127.0.0.1, localhost, orthanc" in message
    assert "none of allowed_peer_names (pacs.example.org)" in message
    assert not info.value.retryable  # dead-lettered at once: a re-try cannot change the certificate
    time.sleep(0.5)
    assert len(tls_storescp.received()) == 3  # nothing sent to it


def test_cli_echo_and_send_over_tls_use_the_configured_certificates(
    tmp_path: Path, tls_storescp: StoreScpProcess, certs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    peer = f"{tls_storescp.aet}@{tls_storescp.host}:{tls_storescp.port}+tls"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nae_title = "AINODE"\n'
        f'[node.tls]\ncertificate = "{certs["node"]}"\nprivate_key = "{certs["node.key"]}"\n'
        f'ca_certificates = "{certs["ca"]}"\n'
        f'[destinations.pacs]\nae_title = "{tls_storescp.aet}"\nhost = "{tls_storescp.host}"\n'
        f'port = {tls_storescp.port}\ntls = true\n')
    assert main(["echo", peer, "--config", str(config)]) == 0
    assert "0x0000 Success" in capsys.readouterr().out
    assert main(["send", "pacs", "--config", str(config), str(sorted(SERIES.glob("*.dcm"))[0])]) == 0
    assert "sent 1 instance(s)" in capsys.readouterr().out
    (received,) = tls_storescp.wait_for_count(1, deadline_s=10)
    assert pydicom.dcmread(received).file_meta.SourceApplicationEntityTitle == "AINODE"  # node.ae_title
    explicit = ["--tls-certificate", str(certs["client"]), "--tls-private-key", str(certs["client.key"])]
    assert main(["echo", peer, *explicit, "--tls-ca-certificates", str(certs["ca"])]) == 0
    capsys.readouterr()
    # a CA that did not sign the peer's certificate: refused, with the reason
    assert main(["echo", peer, *explicit, "--tls-ca-certificates", str(certs["rogue"])]) == 1
    error = capsys.readouterr().err
    assert f"failed: TLS handshake with {peer.removesuffix('+tls')} failed: CERTIFICATE_VERIFY_FAILED" in error
    assert "; checked against ca_certificates)" in error  # and OpenSSL's reason before it
    # TLS with nothing to check the peer against is a configuration error
    assert main(["echo", peer]) == 2
    assert "--tls-ca-certificates" in capsys.readouterr().err
