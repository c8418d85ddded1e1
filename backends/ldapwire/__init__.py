"""LDAP on the wire, one package for both sides of the proxy.

As ``twisted.names.dns`` serves Twisted's DNS client and server alike, this
package serves the directory client (:mod:`backends.ldap_async` and the
modules it is built from) and the LDAP front-end (:mod:`proxy.ldap`):

- :mod:`~backends.ldapwire.ber`: BER primitives (TLV reading in place, encoding);
- :mod:`~backends.ldapwire.messages`: RFC 4511 messages: tags, result codes
  (one ``ResultCode``), the envelope, bind, search, extended operations,
  results, entries;
- :mod:`~backends.ldapwire.framing`: one framer cutting a stream into messages;
- :mod:`~backends.ldapwire.filters`: RFC 4515 filter templates compiled to BER;
- :mod:`~backends.ldapwire.tls`: the trust loader, client and server TLS options;
- :mod:`~backends.ldapwire.connect`: endpoints and a one-connection factory;
- :mod:`~backends.ldapwire.transport`: writes that go out at once, TCP_NODELAY.

The first four are pure code over bytes (no reactor, no socket); the last
three are the Twisted edge both sides share. ``proxy`` may import this
package; nothing here imports ``proxy`` or ``policy``, and ``policy`` never
imports it.
"""
