"""LDAP front-end: a bind-intercepting LDAP proxy with inline MFA.

Public API::

    from proxy.ldap.config import LdapFrontendConfig, BindCacheRule
    from proxy.ldap.events import LdapEvents, NullLdapEvents
    from proxy.ldap.server import LdapProxyFactory

    factory = LdapProxyFactory(config, authenticate, events=events, reactor=reactor)
    ports = factory.listen()          # every [ldap] listen / ldaps_listen address
    ...
    factory.disconnect_all()          # on shutdown, then port.stopListening()

Modules: ``server`` (factory and per-connection protocol), ``upstream``
(the connection to the directory), ``bind`` (decision → BindResponse),
``dn`` (DN suffix rules: exempt, user_base, bind-cache windows),
``transport`` (low-latency writes), ``events``, ``config``. The wire format
-- BER, messages, framing, result codes, TLS options -- is
:mod:`backends.ldapwire`, shared with the directory client. Which entry a
bind DN names, and whether both factors pass, is the core's business.
"""
