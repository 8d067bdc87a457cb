"""The TorchServe handler without a server: a fake Context that stores what
the handler sets, the way ts/context.py's Context + RequestProcessor do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from style_transfer_handler import StyleTransferHandler

SERIALIZED = "vgg19_features.pth"

# One row's request headers as the handler sees them over HTTP (a request
# with fields content and style) and over gRPC (the same fields, no headers),
# as TorchServe 0.12.0 delivered them to a probe handler. Content-Type only
# where a test gives one (FakeContext's content_type): the handler reads it
# only for a row whose one field is `body`, a JSON body or a form's field.
HTTP_HEADERS = {
    "content": {"content-type": "image/png"}, "style": {"content-type": "image/jpeg"},
    "Host": "127.0.0.1:8080", "Content-Length": "1234",
    "Authorization": "Bearer k", "explain": "False", "url_path": "",
}
GRPC_HEADERS = {"content": {"content-type": ""}, "style": {"content-type": ""}}


class FakeContext:
    """Per-index response status and headers, like ts.context.Context backed by
    one RequestProcessor per row (status defaults to 200, headers to {})."""

    def __init__(self, model_dir: Path, *, limits: dict | None = None, rows: int = 1, gpu_id=None,
                 response_timeout: int = 600, grpc: bool = False, content_type: str | None = None):
        self.model_name = "style_transfer"
        self.manifest = {"model": {"modelName": "style_transfer", "serializedFile": SERIALIZED, "handler": "style_transfer_handler.py"}}
        self.system_properties = {
            "model_dir": str(model_dir),
            "gpu_id": gpu_id,
            "batch_size": rows,
            "server_name": "MMS",
            "server_version": "test",
            "limit_max_image_pixels": True,
        }
        self.model_yaml_config = {"minWorkers": 1, "responseTimeout": response_timeout}
        if limits is not None:
            self.model_yaml_config["limits"] = limits
        self.request_ids = {i: f"r{i}" for i in range(rows)}
        # What TorchServe 0.12.0's ts/service.py puts in each row's RequestProcessor:
        # the fields as {name: {"content-type": ...}}, then the request's
        # headers as strings (an HTTP request's, url_path and explain included;
        # a gRPC call's: none).
        self._request_headers = GRPC_HEADERS if grpc else HTTP_HEADERS
        if content_type is not None:
            self._request_headers = {**self._request_headers, "Content-Type": content_type}
        self._status: dict[int, tuple[int, str | None]] = {}
        self._headers: dict[int, dict[str, str]] = {}

    def get_request_id(self, idx: int = 0):
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str):
        return self._request_headers.get(key)

    def get_all_request_header(self, idx: int) -> dict:
        return dict(self._request_headers)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self._status[idx] = (code, phrase)

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        return self._status.get(idx, (200, None))

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._headers.setdefault(idx, {})[key] = value

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self._headers.get(idx, {})

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    # what a test reads
    def status(self, idx: int = 0) -> int:
        return self.get_response_status(idx)[0]

    def status_was_set(self, idx: int = 0) -> bool:
        return idx in self._status


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, vgg_state) -> Path:
    d = tmp_path_factory.mktemp("model_dir")
    torch.save(vgg_state, d / SERIALIZED)
    (d / "vgg19_features.json").write_text(json.dumps({"kind": "random"}))
    return d


@pytest.fixture(scope="session")
def make_handler(model_dir):
    """Initialize a handler from `model_dir` with the given `limits:` config."""

    def make(limits: dict | None = None, rows: int = 1) -> StyleTransferHandler:
        handler = StyleTransferHandler()
        handler.initialize(FakeContext(model_dir, limits=limits, rows=rows))
        return handler

    return make


@pytest.fixture(scope="session")
def handler(make_handler) -> StyleTransferHandler:
    return make_handler({"progress_every": 1})


@pytest.fixture
def make_context(model_dir):
    def make(rows: int = 1, **kwargs) -> FakeContext:
        return FakeContext(model_dir, rows=rows, **kwargs)

    return make
