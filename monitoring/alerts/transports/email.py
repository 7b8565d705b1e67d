"""Email through Django's mail backend (settings.EMAIL_*): SMTP in production, the console locally.

With Django's SMTP backend the send ends within its timeout, also when the mail server trickles its replies: its
connection is shut down at the deadline (monitoring.alerts.transports.deadline). Another backend is used as it is.
"""

from __future__ import annotations

import smtplib

from django.conf import settings
from django.core import mail
from django.core.exceptions import ValidationError
from django.core.mail.backends import smtp
from django.core.validators import validate_email

from monitoring.alerts.transports.base import Delivery, Message, Transport, TransportError, one_line
from monitoring.alerts.transports.deadline import Deadline, watch_socket


class _WatchedConnection:
    """An SMTP connection whose sockets (the plain one, then the TLS one) its send's deadline shuts down."""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        watch_socket(sock)
        return sock

    def starttls(self, *args, **kwargs):
        reply = super().starttls(*args, **kwargs)
        watch_socket(self.sock)
        return reply


class _WatchedSMTP(_WatchedConnection, smtplib.SMTP):
    pass


class _WatchedSMTPSSL(_WatchedConnection, smtplib.SMTP_SSL):
    pass


class _WatchedSMTPBackend(smtp.EmailBackend):
    """Django's SMTP backend, its settings unchanged, with connections that the deadline can cut."""

    @property
    def connection_class(self):
        return _WatchedSMTPSSL if self.use_ssl else _WatchedSMTP


class EmailTransport(Transport):
    kind = "email"
    label = "Email"
    fields = ("to",)

    @classmethod
    def field_errors(cls, config: dict) -> dict[str, str]:
        to = config.get("to")
        if not isinstance(to, list) or not to:
            return {"to": "required: a list of at least one email address"}
        invalid = []
        for address in to:
            try:
                if not isinstance(address, str):
                    raise ValidationError("not a string")
                validate_email(address)
            except ValidationError:
                invalid.append(repr(address))
        return {"to": f"not an email address: {', '.join(invalid)}"} if invalid else {}

    def deliver(self, message: Message, *, timeout: float) -> Delivery:
        recipients = self.config["to"]
        body = message.text
        if message.portal_url and message.portal_url not in body:
            body += f"\n\nAlert history: {message.portal_url}\n"
        email = mail.EmailMessage(
            subject=one_line(message.subject, 250),  # a newline in a subject is refused (BadHeaderError)
            body=body, from_email=settings.DEFAULT_FROM_EMAIL, to=recipients,
            # Auto-Submitted (RFC 3834) keeps out-of-office replies from answering an alert.
            headers={"Auto-Submitted": "auto-generated", "X-RQ-Ops-Portal-Group": one_line(message.group_key, 300)},
            connection=_connection(timeout=min(timeout, settings.EMAIL_TIMEOUT)),
        )
        server = f"{settings.EMAIL_HOST}:{settings.EMAIL_PORT}"
        deadline = Deadline(timeout)
        try:
            try:
                with deadline:
                    sent = email.send()
            except (smtplib.SMTPException, OSError) as error:
                if deadline.passed:  # cut at the deadline, or a network wait ran out with it
                    raise TransportError(f"mail server {server} did not finish within {timeout:.3g} s",
                                         permanent=False) from error
                raise
        except smtplib.SMTPRecipientsRefused as error:
            # Only raised when every recipient was refused (a partly refused list is delivered to the others).
            # A 4xx refusal (greylisting, a full mailbox) passes; a 5xx one (no such user) does not.
            # The addresses are channel configuration (Admins only) and the server's replies usually repeat them:
            # the error, which Support reads, gives each recipient's place in the channel's list and the code.
            codes = [code for code, _ in error.recipients.values()]
            places = {address: number for number, address in enumerate(recipients, start=1)}
            refusals = ", ".join(f"recipient {places.get(address, '?')} of {len(recipients)} ({code})"
                                 for address, (code, _reply) in error.recipients.items())
            raise TransportError(f"mail server {server} refused the recipients: {one_line(refusals, 300)} (see the "
                                 f"channel's addresses)", permanent=all(500 <= code < 600 for code in codes)) from error
        except smtplib.SMTPResponseException as error:
            # Sender refused, login refused, message refused, greeting refused: the SMTP reply code says whether
            # trying again can help (5xx: no; 4xx: yes).
            what = {smtplib.SMTPSenderRefused: f"refused the sender {settings.DEFAULT_FROM_EMAIL}",
                    smtplib.SMTPAuthenticationError: "refused the login (EMAIL_HOST_USER, EMAIL_HOST_PASSWORD)",
                    }.get(type(error), "refused the message")
            reply = f"{error.smtp_code} {one_line(_decode(error.smtp_error))}"
            raise TransportError(f"mail server {server} {what}: {reply}", permanent=500 <= error.smtp_code < 600,
                                 settings_fault=isinstance(error, (smtplib.SMTPSenderRefused,
                                                                   smtplib.SMTPAuthenticationError))) from error
        except smtplib.SMTPException as error:
            raise TransportError(f"mail server {server} failed: {type(error).__name__} {one_line(str(error))}",
                                 permanent=False) from error
        except OSError as error:  # refused connection, timeout (socket.timeout is an OSError), TLS failure
            raise TransportError(f"cannot send mail through {server}: {one_line(str(error) or type(error).__name__)}",
                                 permanent=False) from error
        if sent != 1:
            raise TransportError(f"the mail backend sent {sent} messages instead of one", permanent=False)
        plural = "s" if len(recipients) > 1 else ""
        return Delivery(http_status=None, detail=f"sent to {len(recipients)} recipient{plural}")


def _decode(reply) -> str:
    return reply.decode("utf-8", errors="replace") if isinstance(reply, bytes) else str(reply)


def _connection(*, timeout: float):
    """The configured mail backend; Django's SMTP backend as one whose connections the deadline can cut."""
    connection = mail.get_connection(timeout=timeout)
    return _WatchedSMTPBackend(timeout=timeout) if type(connection) is smtp.EmailBackend else connection
