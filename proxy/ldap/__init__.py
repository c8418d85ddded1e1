"""LDAP front-end: a bind-intercepting LDAP proxy with inline MFA.

Public API::

    from proxy.ldap.config import LdapFrontendConfig, BindCacheRule
    from proxy.ldap.events import LdapEvents, NullLdapEvents
    from proxy.ldap.server import LdapProxyFactory

    factory = LdapProxyFactory(config, authenticator.start, events=events, reactor=reactor)
    ports = factory.listen()          # every [ldap] listen / ldaps_listen address
    ...
    factory.disconnect_all()          # on shutdown, then port.stopListening()

Modules: ``server`` (the factory, and the per-connection protocol that
carries out what ``session`` decides), ``session`` (one connection's state
machine: events in, actions out, no I/O; the sequencing invariants),
``upstream_session`` (the upstream session's bookkeeping), ``upstream`` (the
connection to the directory), ``bind`` (the bind flow's steps: plan, core
request, the session bind that is the password check, its verdict, and the
BindResponse for each outcome),
``dn`` (DN suffix rules: exempt, user_base, bind-cache windows),
``transport`` (low-latency writes), ``events``, ``config``. The wire format
-- BER, messages, framing, result codes, TLS options -- is
:mod:`backends.ldapwire`, shared with the directory client. Which entry a
bind DN names, and whether both factors pass, is the core's business.
"""
