"""The form Twilio posts for an inbound WhatsApp text message, for `wabot send`, the demo and the tests."""

from __future__ import annotations

import secrets


def new_message_sid() -> str:
    return "SM" + secrets.token_hex(16)


def inbound_form(
    body: str, *, sender: str, to: str, account_sid: str, sid: str | None = None, profile_name: str = "Test"
) -> dict[str, str]:
    """The fields of a real inbound text message, as Twilio's WhatsApp webhook sends them; `sender` as +E.164."""
    sender = sender.removeprefix("whatsapp:")
    sid = sid or new_message_sid()
    return {
        "MessageSid": sid,
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "AccountSid": account_sid,
        "From": f"whatsapp:{sender}",
        "To": to,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "MessageType": "text",
        "SmsStatus": "received",
        "WaId": sender.lstrip("+"),
        "ProfileName": profile_name,
        "ApiVersion": "2010-04-01",
    }
