"""The names :mod:`proxy.ldap.server` reads as ``ber.…``, from :mod:`backends.ldapwire`.

Only a re-export, kept while server.py is being restructured; new code
imports from ``backends.ldapwire`` (``messages``, ``framing``, ``ber``).
"""

from backends.ldapwire.ber import BerError
from backends.ldapwire.framing import MessageFramer
from backends.ldapwire.messages import (
    ABANDON_REQUEST,
    BIND_REQUEST,
    BIND_RESPONSE,
    EXTENDED_REQUEST,
    FINAL_RESPONSE,
    FINAL_RESPONSES,
    MAX_MESSAGE_ID,
    OPERATION_NAMES,
    REQUESTS,
    START_TLS_OID,
    UNBIND_REQUEST,
    BindRequest,
    LdapResult,
    MessageHeader,
    ResultCode,
    abandoned_message_id,
    decode_bind_request,
    decode_result,
    encode_bind_request,
    encode_bind_response,
    encode_extended_response,
    encode_notice_of_disconnection,
    encode_result,
    extended_request_name,
    peek,
    peek_id_and_tag,
    response_for,
)

__all__ = [
    "ABANDON_REQUEST",
    "BIND_REQUEST",
    "BIND_RESPONSE",
    "EXTENDED_REQUEST",
    "FINAL_RESPONSE",
    "FINAL_RESPONSES",
    "MAX_MESSAGE_ID",
    "OPERATION_NAMES",
    "REQUESTS",
    "START_TLS_OID",
    "UNBIND_REQUEST",
    "BerError",
    "BindRequest",
    "LdapResult",
    "MessageFramer",
    "MessageHeader",
    "ResultCode",
    "abandoned_message_id",
    "decode_bind_request",
    "decode_result",
    "encode_bind_request",
    "encode_bind_response",
    "encode_extended_response",
    "encode_notice_of_disconnection",
    "encode_result",
    "extended_request_name",
    "peek",
    "peek_id_and_tag",
    "response_for",
]
