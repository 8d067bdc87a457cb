"""The one exception type that crosses from the core to the edge.

Messages quote the request (field names, values), so they are made safe once,
here: control characters, lone surrogates and other unprintable characters
are escaped, and the length is bounded. The HTTP status line never carries a
message, only the fixed ASCII `reason` of its code: TorchServe's Python backend
frames the reason phrase by its length in characters, not bytes, so one
non-ASCII character desynchronises the worker from the frontend, and Netty
refuses CR/LF there.
"""
from __future__ import annotations

MAX_MESSAGE_CHARS = 600  # the JSON error body and the log line
MAX_FIELD_CHARS = 64  # a field name quoted in a message


def printable(text: str, limit: int) -> str:
    """`text` with every unprintable character escaped (\\n, \\x1b, \\ud800 ...)
    and cut to at most `limit` characters, marked with an ellipsis when cut."""
    out = []
    size = 0
    for ch in text:
        piece = ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        size += len(piece)
        if size > limit:
            out.append("...")
            break
        out.append(piece)
    return "".join(out)


def quote_field(name: str) -> str:
    """A client-chosen field name, short and printable, for a message: in
    double quotes where it is empty or starts or ends with white space, which
    would otherwise vanish from the message (`: unknown parameter`)."""
    text = printable(name, MAX_FIELD_CHARS)
    return f'"{text}"' if not text.strip() or text != text.strip() else text


class RequestError(Exception):
    """A request the service refuses. The subclass says why; each kind's
    answer (HTTP status, the JSON body's `type`, the status line's fixed
    ASCII reason) is written once, on the class, and nowhere else: the edge
    reads it from there (and TorchServe maps the status to gRPC's).
    `field` is the request field at fault."""

    status = 400
    type = "BadRequest"
    reason = "Bad Request"

    def __init__(self, field: str | None, message: str):
        message = printable(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.field = None if field is None else quote_field(field)
        self.message = message

    @property
    def code(self) -> int:
        return self.status

    def as_dict(self) -> dict:
        return {"code": self.status, "type": self.type, "message": self.message}


# The one table of refusals, written as one: each kind and its answer (HTTP
# status, the JSON body's `type`, the status line's reason), which the edge
# reads off the class; TorchServe maps the status to gRPC's.
class BadRequest(RequestError):  # the body or a field cannot be read as a request at all
    status, type, reason = 400, "BadRequest", "Bad Request"
class Forbidden(RequestError):  # a URL input this server may not fetch (a non-public address, a port other than 80/443)  # noqa: E302
    status, type, reason = 403, "Forbidden", "Forbidden"
class TooLarge(RequestError):  # an input or the answer is over a size limit  # noqa: E302
    status, type, reason = 413, "PayloadTooLarge", "Payload Too Large"
class UnsupportedMedia(RequestError):  # an input is no image of an accepted format  # noqa: E302
    status, type, reason = 415, "UnsupportedMediaType", "Unsupported Media Type"
class InvalidParameter(RequestError):  # a field's value is out of range or inconsistent  # noqa: E302
    status, type, reason = 422, "InvalidParameter", "Unprocessable Entity"
class InternalError(RequestError):  # a fault of this service, not of the request  # noqa: E302
    status, type, reason = 500, "InternalServerError", "Internal Server Error"
class Busy(RequestError):  # the worker cannot take this on now (too many URL name lookups still running)  # noqa: E302
    status, type, reason = 503, "ServiceUnavailable", "Service Unavailable"
class TimedOut(RequestError):  # the time budget or the client's deadline ran out  # noqa: E302
    status, type, reason = 504, "GatewayTimeout", "Gateway Timeout"
class OutOfMemory(RequestError):  # the device cannot hold this request now  # noqa: E302
    status, type, reason = 507, "InsufficientStorage", "Insufficient Storage"


KINDS = (BadRequest, Forbidden, TooLarge, UnsupportedMedia, InvalidParameter, InternalError, Busy, TimedOut,
         OutOfMemory)
