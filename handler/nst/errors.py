"""The one exception type that crosses from the core to the edge."""
from __future__ import annotations


class RequestError(Exception):
    """A client error: `code` is the HTTP status, `field` the request field at fault."""

    TYPES = {
        400: "BadRequest",
        403: "Forbidden",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
        422: "InvalidParameter",
        503: "ServiceUnavailable",
        504: "GatewayTimeout",
        507: "InsufficientStorage",
    }

    def __init__(self, code: int, field: str | None, message: str):
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message

    @property
    def type(self) -> str:
        return self.TYPES.get(self.code, "Error")

    def as_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}
