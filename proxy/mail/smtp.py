"""Sending one mail with the standard library's SMTP client (smtplib), blocking:
``serve`` calls it in its mail thread pool, never on the reactor, and
``mfa-proxy mail test`` calls it directly.

``security``: ``none`` (plain SMTP), ``starttls`` (STARTTLS required: a server
that does not offer it is a failure, never a fallback to clear text) or
``tls`` (TLS from the first byte, SMTPS). The server's certificate and name
are checked unless ``tls_verify`` is off.
"""

from __future__ import annotations

import email.policy
import smtplib
import socket
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from policy.mail import Rendered
from proxy.mail.config import MailConfig


@dataclass(frozen=True)
class SendResult:
    """How one send ended. ``reason`` (a metric label) when it failed; ``permanent``:
    the server refused it for good (a 5xx), trying again will not help;
    ``reply``: the server's last words (or the error), for logs and the CLI."""

    ok: bool
    reply: str
    reason: str = ""
    permanent: bool = False


def build_message(config: MailConfig, to: str, rendered: Rendered) -> EmailMessage:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = config.from_header
    msg["To"] = to
    msg["Subject"] = rendered.subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=config.envelope_from.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    msg.set_content(rendered.text)
    if rendered.html:
        msg.add_alternative(rendered.html, subtype="html")
    return msg


def tls_context(config: MailConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file or None)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _reply(code: int, text: bytes | str) -> str:
    words = text.decode(errors="replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(words.split())}".strip()


def send(config: MailConfig, to: str, message: EmailMessage) -> SendResult:
    """Deliver ``message`` to ``to`` through the configured server (blocking)."""
    try:
        return _send(config, to, message)
    except smtplib.SMTPRecipientsRefused as e:
        code, text = next(iter(e.recipients.values()))
        return _refused(code, text)
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
        return _refused(e.smtp_code, e.smtp_error)
    except smtplib.SMTPAuthenticationError as e:
        return SendResult(False, _reply(e.smtp_code, e.smtp_error), "auth")
    except smtplib.SMTPNotSupportedError as e:
        return SendResult(False, str(e) or "not supported by the server", "tls")
    except (ssl.SSLError, ssl.CertificateError) as e:
        return SendResult(False, f"TLS: {e}", "tls")
    except smtplib.SMTPResponseException as e:
        return _refused(e.smtp_code, e.smtp_error)
    except (smtplib.SMTPException, OSError) as e:  # refused, reset, timeout, DNS
        return SendResult(False, f"{type(e).__name__}: {e}", "unreachable")


def _refused(code: int, text: bytes | str) -> SendResult:
    permanent = 500 <= code < 600
    return SendResult(False, _reply(code, text), "refused" if permanent else "temporary",
                      permanent)


class _Recording(smtplib.SMTP):
    """smtplib's client, keeping the server's last reply (the answer to DATA,
    "250 2.0.0 Ok: queued as …", which ``send_message`` does not return)."""

    last_reply: tuple[int, bytes] = (0, b"")

    def getreply(self) -> tuple[int, bytes]:
        reply = super().getreply()
        self.last_reply = reply
        return reply


class _RecordingSSL(_Recording, smtplib.SMTP_SSL):
    pass


def _send(config: MailConfig, to: str, message: EmailMessage) -> SendResult:
    timeout = config.timeout_seconds
    smtp: _Recording
    if config.security == "tls":
        smtp = _RecordingSSL(config.host, config.port, local_hostname=_local_name(),
                             timeout=timeout, context=tls_context(config))
    else:
        smtp = _Recording(config.host, config.port, timeout=timeout,
                          local_hostname=_local_name())
    with smtp:
        smtp.ehlo_or_helo_if_needed()
        if config.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError(
                    f"{config.server} does not offer STARTTLS (security = \"starttls\")")
            code, text = smtp.starttls(context=tls_context(config))
            if code != 220:
                raise smtplib.SMTPResponseException(code, text)
            smtp.ehlo()
        if config.username:
            smtp.login(config.username, config.password)
        options = ["SMTPUTF8"] if not to.isascii() and smtp.has_extn("smtputf8") else []
        refused = smtp.send_message(message, config.envelope_from, [to], mail_options=options)
        if refused:
            code, text = refused[to]
            return _refused(code, text)
        return SendResult(True, _reply(*smtp.last_reply))


def _local_name() -> str:
    # Not smtplib's default, getfqdn(): a reverse look-up that can hang on a host
    # without DNS. The name in EHLO is informational.
    return socket.gethostname() or "localhost"
