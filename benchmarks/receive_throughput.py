"""Receive throughput of the node's Storage SCP against DCMTK storescp and Orthanc, same files, same sender.

Prints MB/s per receiver and the node's ratios against the references measured in the same run.
pynetdicom-noop (benchmarks/noop_scp.py) answers every C-STORE without storing anything: the
ceiling of any pynetdicom-based SCP here. node-scp, node-scp-nocheck and node-scp-tls
(benchmarks/scp_receiver.py) run the node's Storage SCP alone: as shipped, without the structural
completeness check, and over DICOM TLS (certificates made with openssl, storescu +tls), so the
cost of the check and of TLS are measured in the same run. Not part of the test suite. Run from
the repository root:

    .venv/bin/python -m benchmarks.receive_throughput [--repeats 3] [--ct-slices 300]
        [--receivers dicom-node,storescp,orthanc,pynetdicom-noop,node-scp,node-scp-nocheck,node-scp-tls]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.local.node_process import NodeProcess  # noqa: E402
from deploy.local.orthanc_process import DCMTK_ENV, OrthancProcess, free_port, wait_for_port  # noqa: E402
from tests.factories import series_from_ras_volume, write_datasets  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def make_ct(folder: Path, slices: int) -> list[Path]:
    """A real abdominal CT resampled to ``slices`` x 512 x 512 (about 0.5 MB per file)."""
    image = nib.load(SHARED / "ct-abdomen" / "example_ct.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float32)
    zoom = (512 / data.shape[0], 512 / data.shape[1], slices / data.shape[2])
    volume = ndimage.zoom(data, zoom, order=1)
    spacing = tuple(float(s) / z for s, z in zip(image.header.get_zooms()[:3], zoom, strict=True))
    datasets = series_from_ras_volume(volume, spacing, modality="CT", shuffle=False,
                                      series_description="benchmark CT")
    return write_datasets(datasets, folder)


def make_mr_studies(folder: Path, copies: int) -> list[Path]:
    """``copies`` of the real MR studies (every series), each with new UIDs."""
    sources = sorted(p for p in (SHARED / "hippocampus-dicom").rglob("*.dcm"))
    paths = []
    for copy in range(copies):
        uid_map: dict[str, str] = {}
        for source in sources:
            ds = pydicom.dcmread(source)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                old = str(ds.get(keyword))
                uid_map.setdefault(old, str(generate_uid()))
                setattr(ds, keyword, uid_map[old])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{copy:03d}" / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path)
            paths.append(path)
    return paths


def send(files: Sequence[Path], port: int, called: str, associations: int,
         extra_args: Sequence[str] = ()) -> float:
    """storescu ``files`` split over ``associations`` parallel processes; return seconds."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    lists = []
    for index, chunk in enumerate(chunks):
        listing = Path(tempfile.mkstemp(suffix=f"-{index}.txt")[1])
        listing.write_text("\n".join(map(str, chunk)))
        lists.append(listing)

    def run(listing: Path) -> None:
        files_here = listing.read_text().split("\n")
        subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, *extra_args, "127.0.0.1", str(port),
                        *files_here],
                       check=True, capture_output=True, env={**os.environ, **DCMTK_ENV})

    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(run, lists))
    elapsed = time.perf_counter() - start
    for listing in lists:
        listing.unlink()
    return elapsed


class Receiver:
    def __init__(self, name: str, called: str, start: Callable[[Path], int], stop: Callable[[], None],
                 send_args: Sequence[str] = ()):
        self.name, self.called, self.start, self.stop = name, called, start, stop
        self.send_args = list(send_args)


def process_receiver(name: str, called: str, command: Callable[[Path, int], list[str]],
                     ready_s: float, cwd: Path | None = None, send_args: Sequence[str] = ()) -> Receiver:
    """A receiver run as one process listening on a free port, terminated after each round."""
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start(work: Path) -> int:
        port = free_port()
        work.mkdir(parents=True)
        state["p"] = subprocess.Popen(command(work, port), cwd=cwd, env={**os.environ, **DCMTK_ENV},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port, ready_s)
        return port

    def stop() -> None:
        state["p"].terminate()
        state["p"].wait()

    return Receiver(name, called, start, stop, send_args)


def storescp_receiver() -> Receiver:
    return process_receiver(
        "storescp", "STORESCP",
        lambda work, port: ["storescp", "-aet", "STORESCP", "-od", str(work), "--sort-on-study-uid", "st",
                            str(port)],
        ready_s=10)


def noop_receiver() -> Receiver:
    """pynetdicom with the node's set-up, acknowledging without storing: any pynetdicom SCP's ceiling."""
    return process_receiver(
        "pynetdicom-noop", "NOOPSCP",
        lambda work, port: [sys.executable, "-m", "benchmarks.noop_scp", str(port)],
        ready_s=30, cwd=REPO)


def orthanc_receiver() -> Receiver:
    state: dict[str, OrthancProcess] = {}

    def start(work: Path) -> int:
        orthanc = OrthancProcess(work, overrides={"LuaScripts": [], "Plugins": []})
        orthanc.start()
        state["o"] = orthanc
        return orthanc.dicom_port

    return Receiver("orthanc", "ORTHANC", start, lambda: state["o"].stop())


def node_receiver() -> Receiver:
    state: dict[str, NodeProcess] = {}

    def start(work: Path) -> int:
        node = NodeProcess(work, port=free_port(), destinations={},
                           config={"analyses": {"hippocampus": {"plugin": "hippocampus", "enabled": False}}})
        node.start()
        state["n"] = node
        return node.port

    return Receiver("dicom-node", "DICOMNODE", start, lambda: state["n"].stop())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and the server and client certificates it signs (PEM), made with openssl."""
    folder.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=benchmark CA")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1")
    return {path.name: path for path in folder.iterdir()}


def scp_receivers(certs: dict[str, Path]) -> list[Receiver]:
    """The node's Storage SCP alone: as shipped, without the completeness check, over TLS."""
    def command(*flags: str) -> Callable[[Path, int], list[str]]:
        return lambda work, port: [sys.executable, "-m", "benchmarks.scp_receiver", str(port), str(work),
                                   *flags]

    tls_flags = (str(certs["server.pem"]), str(certs["server.key"]), str(certs["ca.pem"]))
    storescu_tls = ("+tls", str(certs["client.key"]), str(certs["client.pem"]), "+cf", str(certs["ca.pem"]))
    return [
        process_receiver("node-scp", "NODESCP", command(), ready_s=30, cwd=REPO),
        process_receiver("node-scp-nocheck", "NODESCP", command("--no-structure-check"), ready_s=30, cwd=REPO),
        process_receiver("node-scp-tls", "NODESCP", command("--tls", *tls_flags), ready_s=30, cwd=REPO,
                         send_args=storescu_tls),
    ]


def check_rate(files: Sequence[Path]) -> float:
    """MB/s of the node's structural check over the data sets of ``files``, read beforehand."""
    from pydicom.uid import UID

    from dicom_node.receive.structure import check_structure, data_set_offset

    blobs = []
    for path in files:
        data = path.read_bytes()
        syntax = UID(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
        blobs.append((memoryview(data)[data_set_offset(data):], syntax))
    start = time.perf_counter()
    for data, syntax in blobs:
        check_structure(data, syntax)
    return sum(len(data) for data, _ in blobs) / 1e6 / (time.perf_counter() - start)


#: (label, numerator, denominator) of the ratios printed when both receivers ran.
RATIOS = (
    ("node/storescp", "dicom-node", "storescp"),
    ("node/orthanc", "dicom-node", "orthanc"),
    ("noop/storescp", "pynetdicom-noop", "storescp"),
    ("check/nocheck", "node-scp", "node-scp-nocheck"),
    ("tls/clear", "node-scp-tls", "node-scp"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--mr-copies", type=int, default=4)
    parser.add_argument("--receivers", default="", help="comma-separated names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
        root = Path(tmp)
        datasets = {
            f"CT {args.ct_slices}x512x512": make_ct(root / "ct", args.ct_slices),
            f"MR studies x{args.mr_copies}": make_mr_studies(root / "mr", args.mr_copies),
        }
        for label, files in datasets.items():
            print(f"{label}: structural check alone {check_rate(files):.0f} MB/s (in process, files cached)")
        receivers = [node_receiver(), storescp_receiver(), orthanc_receiver(), noop_receiver(),
                     *scp_receivers(make_certificates(root / "certs"))]
        if args.receivers:
            chosen = args.receivers.split(",")
            receivers = [r for r in receivers if r.name in chosen]
        names = {r.name for r in receivers}
        ratios_here = [(label, a, b) for label, a, b in RATIOS if a in names and b in names]
        print(f"{'files':<22} {'assoc':>5} " + " ".join(f"{r.name:>16}" for r in receivers) + "   "
              + " ".join(f"{label:>13}" for label, _, _ in ratios_here)
              + f"   (MB/s, median of {args.repeats})")
        for label, files in datasets.items():
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            for associations in (1, 4):
                rates: dict[str, list[float]] = {r.name: [] for r in receivers}
                ratios: dict[str, list[float]] = {name: [] for name, _, _ in ratios_here}
                for repeat in range(args.repeats):
                    round_rates = {}
                    for receiver in receivers:  # interleaved, so drift hits all alike
                        work = root / f"run-{receiver.name}-{associations}-{repeat}-{label[:2]}"
                        port = receiver.start(work)
                        try:
                            seconds = send(files, port, receiver.called, associations, receiver.send_args)
                        finally:
                            receiver.stop()
                            shutil.rmtree(work, ignore_errors=True)
                        round_rates[receiver.name] = megabytes / seconds
                        rates[receiver.name].append(megabytes / seconds)
                    for name, numerator, denominator in ratios_here:
                        ratios[name].append(round_rates[numerator] / round_rates[denominator])
                print(f"{label:<22} {associations:>5} "
                      + " ".join(f"{statistics.median(rates[r.name]):>16.1f}" for r in receivers) + "   "
                      + " ".join(f"{statistics.median(ratios[name]):>13.2f}" for name, _, _ in ratios_here),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
