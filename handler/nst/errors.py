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
    """A client-chosen field name, short and printable, for a message."""
    return printable(name, MAX_FIELD_CHARS)


class RequestError(Exception):
    """A client error: `code` is the HTTP status, `field` the request field at fault."""

    TYPES = {
        400: "BadRequest",
        403: "Forbidden",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
        422: "InvalidParameter",
        500: "InternalServerError",
        503: "ServiceUnavailable",
        504: "GatewayTimeout",
        507: "InsufficientStorage",
    }
    # The HTTP reason phrase of each status: fixed ASCII, never request text.
    REASONS = {
        400: "Bad Request",
        403: "Forbidden",
        413: "Payload Too Large",
        415: "Unsupported Media Type",
        422: "Unprocessable Entity",
        500: "Internal Server Error",
        503: "Service Unavailable",
        504: "Gateway Timeout",
        507: "Insufficient Storage",
    }

    def __init__(self, code: int, field: str | None, message: str):
        message = printable(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.field = None if field is None else quote_field(field)
        self.message = message

    @property
    def type(self) -> str:
        return self.TYPES.get(self.code, "Error")

    @property
    def reason(self) -> str:
        return self.REASONS.get(self.code, "Error")

    def as_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}
