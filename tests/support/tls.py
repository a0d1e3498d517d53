"""A private CA made with the ``openssl`` command, and an OctoPrint that answers over TLS.

:func:`make_pki` writes what an admin with a home-made CA has: the CA's certificate
(what ``ca_file`` names) and a server certificate for ``127.0.0.1`` signed by it.
:class:`HttpsServer` serves a :class:`~tests.support.fake_octoprint.FakeOctoPrint`'s
answers over a real TLS socket on loopback, so the client's certificate check is
OpenSSL's own, exactly as against OctoPrint behind a TLS proxy.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.fake_octoprint import FakeOctoPrint, _handler_for
from tests.support.real import missing

# Quick to make and accepted everywhere; RSA would cost a second per key.
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    """A CA and one server certificate signed by it, all PEM files."""

    ca: Path  # the CA's certificate: what ca_file names
    cert: Path  # the server's certificate
    key: Path  # the server's private key


def make_pki(directory: Path, *, san: str = "IP:127.0.0.1") -> Pki:
    """Given a directory, make a CA and a server certificate for ``san`` in it; return them.

    ``san`` is the certificate's subjectAltName ("IP:127.0.0.1", "DNS:octopi.local").
    Skip (or fail, see :func:`tests.support.real.missing`) without ``openssl``.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("no openssl command (Debian package openssl)")
        raise AssertionError("unreachable")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, request = (
        directory / "server.pem",
        directory / "server.key",
        directory / "server.csr",
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName = {san}\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    steps = [
        [
            *("req", "-x509", *_KEY, "-keyout", ca_key, "-out", ca, "-days", "2"),
            *("-subj", "/CN=reconnectd test CA"),
            *("-addext", "basicConstraints = critical, CA:TRUE"),
            *("-addext", "keyUsage = critical, keyCertSign, cRLSign"),
            *("-addext", "subjectKeyIdentifier = hash"),
        ],
        ["req", "-new", *_KEY, "-keyout", key, "-out", request, "-subj", "/CN=octoprint"],
        [
            *("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key),
            *("-set_serial", "2", "-days", "2", "-out", cert, "-extfile", extensions),
        ],
    ]
    for step in steps:
        done = subprocess.run(
            [openssl, *map(str, step)], capture_output=True, text=True, check=False, timeout=60
        )
        assert done.returncode == 0, f"openssl {step[0]} failed: {done.stderr}"
    return Pki(ca=ca, cert=cert, key=key)


class HttpsServer:
    """A threaded HTTPS server on a free loopback port; a context manager.

    The TLS handshake runs as each connection is accepted: a client that rejects
    the certificate ends its connection there, and the server just goes on.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], pki: Pki) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert, pki.key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"https-{self.url}",
            daemon=True,
        )
        self._thread.start()

    def __enter__(self) -> HttpsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port; calling it again does nothing."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def https_octoprint(fake: FakeOctoPrint, pki: Pki) -> HttpsServer:
    """Given a fake OctoPrint and a PKI, return a server giving its answers over TLS."""
    return HttpsServer(_handler_for(fake), pki)
