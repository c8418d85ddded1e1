"""A real SMTP server for the tests: aiosmtpd, on a free loopback port, in a
thread of the test process. It keeps every mail it accepted::

    with SmtpServer.start() as smtp:          # plain SMTP
        ... [mail] smtp = smtp.address, security = "none"
        smtp.wait_for(1)                      # the mails, once there are that many
        smtp.messages[0]["Subject"], smtp.body(0), smtp.recipients(0)

``SmtpServer.start(tls_dir=folder, username="u", password="p")`` offers
STARTTLS with a certificate for 127.0.0.1 from a fresh test CA
(``smtp.ca_file``) and requires AUTH (after STARTTLS). ``stop()`` and
``start()`` again on the same port simulate an outage. :class:`Blackhole`
accepts TCP connections and never answers (a hung server).
"""

from __future__ import annotations

import email
import email.policy
import pathlib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.integration.slapd import make_ca, make_server_cert

WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if address in self.server.reject:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.server.lock:
            self.server.messages.append(msg)  # type: ignore[arg-type]
            self.server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.server.tls_used.append(session.ssl is not None)
            self.server.authenticated.append(bool(session.authenticated))
        return "250 2.0.0 Ok: queued as TEST"


class SmtpServer:
    def __init__(self, port: int, tls_dir: pathlib.Path | None = None,
                 username: str = "", password: str = "") -> None:
        self.port = port
        self.username, self.password = username, password
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.tls_used: list[bool] = []
        self.authenticated: list[bool] = []
        self.reject: set[str] = set()
        self.lock = threading.Lock()
        self.ca_file: pathlib.Path | None = None
        self._context: ssl.SSLContext | None = None
        if tls_dir is not None:
            tls_dir.mkdir(parents=True, exist_ok=True)
            ca_path, ca_key, ca_cert = make_ca(tls_dir, "smtp test CA")
            cert, key = make_server_cert(tls_dir, ca_key, ca_cert, ["127.0.0.1"])
            self.ca_file = ca_path
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(str(cert), str(key))
        self._controller: Controller | None = None

    @classmethod
    def start_new(cls, **options: Any) -> SmtpServer:
        server = cls(free_port(), **options)
        server.start()
        return server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login.decode() == self.username
              and auth_data.password.decode() == self.password)
        return AuthResult(success=ok, handled=False)  # False: aiosmtpd answers 535

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._context is not None:
            kwargs.update(tls_context=self._context, require_starttls=True)
        if self.username:
            # AUTH PLAIN only: after a refused PLAIN, smtplib tries LOGIN with an
            # initial response, a dialogue aiosmtpd 1.4 leaves hanging.
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=True, auth_exclude_mechanism=["LOGIN"])
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                      server_hostname="127.0.0.1", ready_timeout=10, **kwargs)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = WAIT) -> list[EmailMessage]:
        """The mails received, once there are at least ``count`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.messages)} mail(s) within {timeout:g} s, "
                             f"expected {count}: {[m['Subject'] for m in self.messages]}")

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m, (_, rcpts) in zip(self.messages, self.envelopes, strict=True)
                    if address in rcpts]

    @staticmethod
    def body(message: EmailMessage) -> str:
        part = message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class Blackhole:
    """Accepts TCP connections on a loopback port and never says a word."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()
