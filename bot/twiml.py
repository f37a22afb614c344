"""TwiML replies: the XML the webhook answers with."""

from __future__ import annotations

from fastapi.responses import Response
from twilio.twiml.messaging_response import MessagingResponse

TWIML_MEDIA_TYPE = "application/xml"


def twiml(parts: list[str]) -> Response:
    """One `<Message>` per part, in order; an empty `<Response/>` when there is nothing to say
    (an empty 200 body is an error for Twilio)."""
    response = MessagingResponse()
    for part in parts:
        response.message(part)
    return Response(content=response.to_xml(xml_declaration=True), media_type=TWIML_MEDIA_TYPE)
