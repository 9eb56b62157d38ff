"""Serve the prebuilt OHIF viewer and proxy its DICOMweb requests to Orthanc on the same origin.

The local (no Docker) counterpart of ``deploy/nginx/ohif.conf``:

- the OHIF bundle (``scripts/fetch-ohif.sh`` unpacks it into ``deploy/local/ohif/``) at the web
  root, ``index.html`` for client-side routes such as ``/viewer?StudyInstanceUIDs=...``, ``.wasm``
  as ``application/wasm``, and ``/app-config.js`` from ``deploy/ohif/app-config.js``;
- ``/dicom-web/...`` and ``/wado`` proxied to Orthanc's HTTP port (Orthanc 1.10 sends no CORS
  headers, so the viewer must reach it on its own origin);
- ``includefield=a,b`` rewritten as ``includefield=a&includefield=b``: the Orthanc DICOMweb
  plugin 1.7 ignores comma-separated values, which OHIF sends (PS3.18 8.3.4.1 allows both).

Python standard library only. Run it with
``python -m deploy.local.ohif_proxy --orthanc http://127.0.0.1:8042 --port 3000``.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import mimetypes
import posixpath
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEB_ROOT = REPO_ROOT / "deploy" / "local" / "ohif"
DEFAULT_APP_CONFIG = REPO_ROOT / "deploy" / "ohif" / "app-config.js"
PROXIED_PREFIXES = ("/dicom-web/", "/wado")
"""Paths forwarded to Orthanc (its ``DicomWeb.Root`` and ``DicomWeb.WadoRoot``)."""

CONTENT_TYPES = {
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses any other type
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".html": "text/html; charset=utf-8",
}
# RFC 9110 7.6.1: connection-specific fields are not forwarded by a proxy.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host",
})
CHUNK_BYTES = 256 * 1024


def split_includefield(query: str) -> str:
    """Rewrite comma-separated ``includefield`` values of a query string as repeated parameters.

    Parameters
    ----------
    query
        The raw query string, without ``?`` (``includefield=00081030,00080060&limit=25``).

    Returns
    -------
    str
        The same query with every ``includefield`` value split at commas (encoded ``%2C``
        included); other parameters and their order are left exactly as they were.
    """
    if not query:
        return query
    out: list[str] = []
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if sep and urllib.parse.unquote_plus(key) == "includefield":
            fields = urllib.parse.unquote_plus(value).split(",")
            out.extend(f"{key}={urllib.parse.quote(field.strip(), safe='')}" for field in fields if field.strip())
        else:
            out.append(part)
    return "&".join(out)


class OhifRequestHandler(BaseHTTPRequestHandler):
    """One request: a static file of the viewer, or a DICOMweb request forwarded to Orthanc."""

    server: OhifProxyServer
    protocol_version = "HTTP/1.1"  # keep-alive: the viewer makes hundreds of small requests

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        """Serve a file of the viewer, or forward a DICOMweb query or retrieval to Orthanc."""
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        """Answer as :meth:`do_GET` would, without the body."""
        self._dispatch(send_body=False)

    def do_POST(self) -> None:  # noqa: N802 - STOW-RS, when a client uploads through the viewer
        """Forward a DICOMweb store to Orthanc; anything else is 405."""
        if self._proxied(self.path):
            self._forward()
        else:
            self.send_error(405)

    def _proxied(self, path: str) -> bool:
        route = urllib.parse.urlsplit(path).path
        return route.startswith(PROXIED_PREFIXES) or route == "/dicom-web"

    def _dispatch(self, *, send_body: bool) -> None:
        if self._proxied(self.path):
            self._forward()
        else:
            self._serve_static(send_body=send_body)

    # -- static files ------------------------------------------------------------------------

    def _serve_static(self, *, send_body: bool) -> None:
        route = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if route == "/app-config.js" and self.server.app_config is not None:
            self._send_file(self.server.app_config, send_body=send_body, cache=False)
            return
        file = self._resolve(route)
        if file is None:
            # Client-side routes (/viewer, /segmentation, ...) are answered by the app itself;
            # a missing asset (it has an extension) is a real 404, not index.html.
            if posixpath.splitext(route)[1]:
                self.send_error(404)
                return
            file = self.server.web_root / "index.html"
        self._send_file(file, send_body=send_body, cache=file.name != "index.html")

    def _resolve(self, route: str) -> Path | None:
        """Map a URL path to a file under the web root, refusing anything outside it."""
        normalised = posixpath.normpath(route)
        if normalised in ("/", "."):
            return None
        candidate = (self.server.web_root / normalised.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.server.web_root):
            return None
        if candidate.is_dir():
            candidate = candidate / "index.html"
        return candidate if candidate.is_file() else None

    def _send_file(self, file: Path, *, send_body: bool, cache: bool) -> None:
        content_type = CONTENT_TYPES.get(file.suffix.lower()) or (
            mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        )
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        # Bundles carry content hashes in their names; index.html and app-config.js do not.
        self.send_header("Cache-Control", "public, max-age=3600" if cache else "no-cache")
        self.end_headers()
        if send_body:
            with file.open("rb") as stream:
                shutil.copyfileobj(stream, self.wfile, CHUNK_BYTES)

    # -- proxy -------------------------------------------------------------------------------

    def _forward(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        target = split.path + (f"?{split_includefield(split.query)}" if split.query else "")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self.server.orthanc_host, self.server.orthanc_port,
                                              timeout=self.server.timeout_s)
        try:
            upstream.request(self.command, target, body=body, headers=headers)
            response = upstream.getresponse()
        except OSError as error:
            upstream.close()
            logger.warning("Orthanc unreachable for %s %s: %s", self.command, split.path, error)
            self.send_error(502, "Orthanc is unreachable")
            return
        try:
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            declared = response.getheader("Content-Length")
            if self.command == "HEAD":
                self.send_header("Content-Length", declared or "0")
                self.end_headers()
                return
            if declared is not None:
                self.send_header("Content-Length", declared)
                self.end_headers()
                shutil.copyfileobj(response, self.wfile, CHUNK_BYTES)
            else:  # Orthanc streamed it chunked: pass it on chunked
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := response.read(CHUNK_BYTES):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Log each request at DEBUG rather than on standard error."""
        logger.debug("%s %s", self.address_string(), format % args)


class OhifProxyServer(ThreadingHTTPServer):
    """The viewer's origin: static OHIF files plus Orthanc's DICOMweb, one thread per connection.

    Parameters
    ----------
    address
        ``(host, port)`` to listen on; port 0 picks a free one (see :attr:`port`).
    orthanc_url
        Orthanc's HTTP root, e.g. ``http://127.0.0.1:8042``.
    web_root
        The unpacked OHIF ``dist/`` folder.
    app_config
        Served as ``/app-config.js`` instead of the bundle's own (``None``: the bundle's).
    timeout_s
        Timeout of each request to Orthanc.

    Raises
    ------
    FileNotFoundError
        ``web_root`` has no ``index.html`` (run ``scripts/fetch-ohif.sh``).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        orthanc_url: str,
        web_root: Path = DEFAULT_WEB_ROOT,
        app_config: Path | None = DEFAULT_APP_CONFIG,
        timeout_s: float = 120.0,
    ) -> None:
        self.web_root = Path(web_root).resolve()
        if not (self.web_root / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF bundle in {self.web_root}: run scripts/fetch-ohif.sh")
        self.app_config = Path(app_config) if app_config is not None else None
        parsed = urllib.parse.urlsplit(orthanc_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"orthanc_url must be http://HOST:PORT, got {orthanc_url!r}")
        self.orthanc_host = parsed.hostname
        self.orthanc_port = parsed.port or 80
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        super().__init__(address, OhifRequestHandler)

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel picked when 0 was asked for)."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The viewer's address, without a trailing slash."""
        host = self.server_address[0]
        # typeshed allows bytes for any address family; an AF_INET socket names itself in str.
        if isinstance(host, (bytes, bytearray)):
            host = host.decode()
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def start(self) -> None:
        """Serve in a background thread (for tests and :mod:`deploy.local.stack`)."""
        self._thread = threading.Thread(target=self.serve_forever, name="ohif-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the socket and join the serving thread."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()

    def __enter__(self) -> OhifProxyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve the viewer until interrupted (``python -m deploy.local.ohif_proxy``).

    Parameters
    ----------
    argv
        Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    int
        The exit status: 0 once interrupted.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP root")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--web-root", type=Path, default=DEFAULT_WEB_ROOT)
    parser.add_argument("--app-config", type=Path, default=DEFAULT_APP_CONFIG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with OhifProxyServer((args.host, args.port), orthanc_url=args.orthanc, web_root=args.web_root,
                         app_config=args.app_config) as server:
        logger.info("OHIF at %s, DICOMweb proxied to %s", server.url, args.orthanc)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
