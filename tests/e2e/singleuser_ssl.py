"""The fake single-user server of singleuser.py, over mutual TLS (JupyterHub's internal_ssl).

With `c.JupyterHub.internal_ssl = True` the spawner gives the server a key and
certificate signed by the hub's `notebooks-ca` and the bundle of CAs it must
accept clients from (`hub-ca` and `proxy-client-ca`), in
JUPYTERHUB_SSL_KEYFILE, JUPYTERHUB_SSL_CERTFILE and JUPYTERHUB_SSL_CLIENT_CA,
and expects it on `https://` (JUPYTERHUB_SERVICE_URL). Like JupyterHub's own
mock server (jupyterhub/tests/mocksu.py, make_ssl_context with
Purpose.CLIENT_AUTH) it requires a client certificate from those CAs: the hub's
readiness check presents `hub-internal`, the proxy presents `proxy-client`.

Answers are singleuser.py's, plus the header `X-Fake-Singleuser-Peer` naming the
common name of the client certificate the request came with, so a test can tell
that a request arrived through the proxy's client certificate.

Standard library only.
"""

import os
import signal
import ssl
import sys
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import singleuser  # noqa: E402

KEYFILE = os.environ["JUPYTERHUB_SSL_KEYFILE"]
CERTFILE = os.environ["JUPYTERHUB_SSL_CERTFILE"]
CLIENT_CA = os.environ["JUPYTERHUB_SSL_CLIENT_CA"]
# A client that connects and never finishes the handshake must not hold a thread forever.
HANDSHAKE_TIMEOUT = 10


def peer_common_name(sock):
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


class Handler(singleuser.Handler):
    def setup(self):
        # The handshake runs here, in the request's own thread, not in the accept loop.
        self.request.settimeout(HANDSHAKE_TIMEOUT)
        self.request.do_handshake()
        self.request.settimeout(None)
        self.peer = peer_common_name(self.request)
        super().setup()

    def end_headers(self):
        self.send_header("X-Fake-Singleuser-Peer", self.peer)
        super().end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Refused handshakes (no or wrong client certificate) are expected: one line, no trace.
        sys.stderr.write(
            f"[fake-singleuser {singleuser.USER}] {client_address}: {sys.exc_info()[1]}\n"
        )


def main():
    url = urlsplit(singleuser.SERVICE_URL)
    if url.scheme != "https":
        sys.exit(f"singleuser_ssl.py: JUPYTERHUB_SERVICE_URL is {url.geturl()}, not https")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=CLIENT_CA)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(CERTFILE, KEYFILE)
    server = Server((url.hostname, url.port), Handler)
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    threading.Thread(target=singleuser.exit_with_parent, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write(
        f"[fake-singleuser {singleuser.USER}] listening with TLS on {url.hostname}:{url.port} "
        f"for {singleuser.SERVICE_URL} (client CA {CLIENT_CA})\n"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
