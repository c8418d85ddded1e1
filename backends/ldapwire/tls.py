"""TLS for both sides: the certificate a listener serves, and how a client checks a directory's.

The front-end's listeners serve ``cert_file``/``key_file`` (ldaps:// and
StartTLS); both clients of the directory -- the front-end's upstream
connection and the directory backend -- verify its certificate and name
against ``ca_file`` (or the system's trust store) unless ``tls_verify`` is
off. One loader reads the CA bundle for both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from OpenSSL import crypto
from twisted.internet import ssl

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def certificates(path: str) -> list[ssl.Certificate]:
    """Every certificate of a PEM file, in order; ValueError when it holds none."""
    pem = Path(path).read_bytes()
    found = [ssl.Certificate.loadPEM(block) for block in _PEM_CERTIFICATE.findall(pem)]
    if not found:
        raise ValueError(f"{path}: no PEM certificate")
    return found


def trust_root(ca_file: str) -> Any:
    """The CAs of ``ca_file`` (a PEM bundle), or the system's when it is empty
    (an IOpenSSLTrustRoot)."""
    if not ca_file:
        return ssl.platformTrust()  # type: ignore[no-untyped-call]
    return ssl.trustRootFromCertificates(certificates(ca_file))  # type: ignore[no-untyped-call]


def server_options(cert_file: str, key_file: str) -> ssl.CertificateOptions:
    """What a listener presents: the leaf first, then any intermediates from the same file."""
    leaf, *chain = certificates(cert_file)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(key_file).read_bytes())
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf.original,
        extraCertChain=[c.original for c in chain],
    )


class ClientTls:
    """How a client checks the directory's certificate, for every connection it makes.

    With ``verify`` the certificate must chain to ``ca_file`` (or, when empty,
    the system trust store) and name the host connected to (DNS or IP SAN).
    The CA file is read at the first connection and kept for the later ones.
    """

    def __init__(self, ca_file: str, verify: bool) -> None:
        self.ca_file = ca_file
        self.verify = verify
        self._trust: Any = None

    def creator(self, host: str) -> Any:
        """An IOpenSSLClientConnectionCreator for ``host`` (ldaps:// or StartTLS).

        Raises OSError or ValueError when the CA file cannot be read or holds
        no certificate."""
        if not self.verify:
            return ssl.CertificateOptions(verify=False)
        if self._trust is None:
            self._trust = trust_root(self.ca_file)
        return ssl.optionsForClientTLS(host, trustRoot=self._trust)


def client_options(host: str, ca_file: str, verify: bool) -> Any:
    """:meth:`ClientTls.creator` for one host, once."""
    return ClientTls(ca_file, verify).creator(host)
