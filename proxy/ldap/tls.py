"""The names :mod:`proxy.ldap.server` reads as ``tls.…``, from :mod:`backends.ldapwire.tls`.

Only a re-export, kept while server.py is being restructured; new code
imports from ``backends.ldapwire.tls`` (``upstream_options`` is its
``client_options``).
"""

from backends.ldapwire.tls import client_options as upstream_options
from backends.ldapwire.tls import server_options

__all__ = ["server_options", "upstream_options"]
