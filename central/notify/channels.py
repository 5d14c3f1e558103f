"""Sending one delivery: a webhook POST (signed) or an e-mail (SMTP with STARTTLS). Both block, so the worker runs
them in threads; both raise DeliveryError with a one-line reason that never holds a secret.

Webhook: `POST url` with the delivery's JSON document as the body and
    Content-Type: application/json
    X-PDM-Delivery: <uuid>                      stable across retries: the receiver drops one it has seen
    X-PDM-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed by the channel's secret>
Any 2xx is delivered; anything else (redirects are not followed), a timeout or a broken connection is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from central import __version__
from central.notify import transport
from central.notify.config import Email, Webhook


class DeliveryError(Exception):
    """The channel did not take the delivery; the message says why (for the delivery log)."""


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, raw: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def send(channel: Webhook | Email, delivery_id: str, payload: dict[str, Any]) -> None:
    if isinstance(channel, Webhook):
        post(channel, delivery_id, payload)
    else:
        mail(channel, delivery_id, payload)


def post(channel: Webhook, delivery_id: str, payload: dict[str, Any]) -> None:
    raw = body(payload)
    headers = {"Content-Type": "application/json", "User-Agent": f"pdm-central/{__version__}",
               "X-PDM-Delivery": delivery_id,
               "X-PDM-Signature": signature(channel.secret.get_secret_value(), raw)}
    try:
        status = transport.post(channel.url, raw, headers, channel.timeout_s)
    except transport.Broken as exc:
        raise DeliveryError(str(exc)) from None
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")


def subject(payload: dict[str, Any]) -> str:
    if payload.get("transition") == "digest":
        return f"[pdm] {payload.get('count')} alarm transitions on route {payload.get('route')}"
    episode = payload.get("episode", {})
    words = {"opened": "opened", "to_alarm": "raised to alarm", "closed": "back to ok",
             "escalation": "not acknowledged"}
    what = words.get(str(payload.get("transition")), str(payload.get("transition")))
    return (f"[pdm] {episode.get('gateway')}/{episode.get('machine_id')}: {what} "
            f"({episode.get('peak_state')}, {episode.get('dominant_mode')})")


def mail(channel: Email, delivery_id: str, payload: dict[str, Any]) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = channel.sender, ", ".join(channel.to), subject(payload)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = f"<{delivery_id}@pdm-central>"  # stable across retries: mail clients drop repeats
    message["X-PDM-Delivery"] = delivery_id
    message.set_content(json.dumps(payload, indent=2, sort_keys=True))
    try:
        with smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout_s) as smtp:
            smtp.ehlo()
            if channel.starttls:
                context = ssl.create_default_context(cafile=str(channel.ca_file) if channel.ca_file else None)
                smtp.starttls(context=context)
                smtp.ehlo()
            if channel.username:
                smtp.login(channel.username, channel.password.get_secret_value())
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryError(f"SMTP: login refused ({exc.smtp_code})") from None
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"SMTP: the server answered {exc.smtp_code}") from None
    except ssl.SSLError as exc:
        raise DeliveryError(f"STARTTLS failed: {exc.reason}") from None
    except smtplib.SMTPServerDisconnected:
        raise DeliveryError("SMTP: the server hung up") from None
    except smtplib.SMTPException:
        raise DeliveryError("SMTP: the exchange failed") from None
    except TimeoutError:
        raise DeliveryError(f"SMTP: no answer within {channel.timeout_s:g} s") from None
    except OSError as exc:
        raise DeliveryError(f"SMTP: cannot reach {channel.host}:{channel.port} ({exc.strerror or 'refused'})") \
            from None
