"""LDAP front-end: a bind-intercepting LDAP proxy with inline MFA.

Public API::

    from proxy.ldap.config import LdapFrontendConfig, BindCacheRule
    from proxy.ldap.events import LdapEvents, NullLdapEvents
    from proxy.ldap.server import LdapProxyFactory

    factory = LdapProxyFactory(config, authenticate, events=events, reactor=reactor)
    ports = factory.listen()          # every [ldap] listen / ldaps_listen address
    ...
    factory.disconnect_all()          # on shutdown, then port.stopListening()

Modules: ``ber`` (framing, peeking, the few messages decoded or encoded),
``server`` (factory and per-connection protocol), ``upstream`` (the
connection to the directory), ``bind`` (decision → BindResponse), ``dn``
(DN suffix rules: exempt, user_base, bind-cache windows), ``tls``,
``transport`` (low-latency writes), ``events``, ``config``. Which entry a
bind DN names, and whether both factors pass, is the core's business.
"""
