"""TLS settings for both sides of the LDAP front-end.

The listener side serves ``cert_file``/``key_file`` (ldaps:// and StartTLS);
the upstream side verifies the directory's certificate and name against
``ca_file`` (or the system's trust store) unless ``tls_verify`` is off.
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


def _certificates(path: str) -> list[ssl.Certificate]:
    pem = Path(path).read_bytes()
    certificates = [ssl.Certificate.loadPEM(block) for block in _PEM_CERTIFICATE.findall(pem)]
    if not certificates:
        raise ValueError(f"{path}: no PEM certificate")
    return certificates


def server_options(cert_file: str, key_file: str) -> ssl.CertificateOptions:
    """What the listener presents: the leaf first, then any intermediates from the same file."""
    leaf, *chain = _certificates(cert_file)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(key_file).read_bytes())
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf.original,
        extraCertChain=[c.original for c in chain],
    )


def upstream_options(host: str, ca_file: str, verify: bool) -> Any:
    """An IOpenSSLClientConnectionCreator for the upstream (ldaps:// or StartTLS).

    With ``verify`` the certificate must chain to ``ca_file`` (or, when empty,
    the system trust store) and name ``host`` (DNS or IP SAN).
    """
    if not verify:
        return ssl.CertificateOptions(verify=False)
    if ca_file:
        trust = ssl.trustRootFromCertificates(_certificates(ca_file))  # type: ignore[no-untyped-call]
    else:
        trust = ssl.platformTrust()  # type: ignore[no-untyped-call]
    return ssl.optionsForClientTLS(host, trustRoot=trust)
