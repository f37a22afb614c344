"""TwiML replies: the XML the webhook answers with."""

from __future__ import annotations

from fastapi.responses import Response
from twilio.twiml.messaging_response import MessagingResponse

from bot.xml_text import xml_safe

TWIML_MEDIA_TYPE = "application/xml"


def twiml(parts: list[str]) -> Response:
    """One `<Message>` per part, in order; an empty `<Response/>` when there is nothing to say
    (an empty 200 body is an error for Twilio). Characters XML forbids are left out, or the document would not parse."""
    response = MessagingResponse()
    for part in parts:
        response.message(xml_safe(part))
    return Response(content=response.to_xml(xml_declaration=True), media_type=TWIML_MEDIA_TYPE)
