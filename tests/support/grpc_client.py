"""A small gRPC client for TorchServe's inference API, for the tests.

The stubs are generated, not vendored: the protos come out of the installed
TorchServe wheel's frontend jar (`ts/frontend/model-server.jar` holds
`proto/inference.proto`, `proto/management.proto` and the google/... imports),
are compiled with grpc_tools.protoc into `build/grpc/<key>/` (ignored by git;
the key changes with the jar and the protoc version, so an upgrade recompiles)
and imported from there. So the client speaks exactly the protocol of the
TorchServe that the tests run.

Every call carries a deadline: a worker that hangs shows up as a
DEADLINE_EXCEEDED error, never as a test that hangs.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Iterator

import grpc

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "grpc"
PROTOS = ("inference.proto", "management.proto")
MODEL = "style_transfer"
DEFAULT_DEADLINE_S = 60.0


def jar_path() -> Path:
    import ts

    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"TorchServe's frontend jar is not at {jar}")
    return jar


def _cache_key(jar: Path) -> str:
    """Changes with the jar, grpcio-tools (its bundled protoc) and protobuf."""
    h = hashlib.sha256(jar.read_bytes())
    for dist in ("grpcio-tools", "protobuf"):
        h.update(f"{dist}=={version(dist)};".encode())
    return h.hexdigest()[:16]


def compile_protos(cache: Path = CACHE) -> Path:
    """Extract the protos from the jar and compile them (once per jar and protoc);
    returns the directory that holds the generated `*_pb2*.py` modules."""
    from grpc_tools import protoc

    jar = jar_path()
    out = cache / _cache_key(jar)
    if (out / "inference_pb2_grpc.py").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compile-", dir=cache))
    try:
        src, gen = work / "src", work / "gen"
        gen.mkdir()
        with zipfile.ZipFile(jar) as z:
            for name in z.namelist():
                # proto/*.proto are TorchServe's, google/... their imports; the
                # well-known google/protobuf ones come with grpcio-tools instead,
                # matching the protobuf runtime that imports them.
                if name.endswith(".proto") and name.startswith(("proto/", "google/")) \
                        and not name.startswith("google/protobuf/"):
                    z.extract(name, src)
        # Beyond the well-known types, TorchServe's protos import google/rpc/status.proto.
        targets = [str(src / "proto" / p) for p in PROTOS] + [str(src / "google" / "rpc" / "status.proto")]
        bundled = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{src / 'proto'}",
            f"-I{src}",
            f"-I{bundled}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            *targets,
        ])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on the protos from {jar}")
        try:
            os.replace(gen, out)  # atomic: a concurrent run sees all of it or none
        except OSError:
            if not (out / "inference_pb2_grpc.py").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_modules() -> tuple[ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc), generated from the installed TorchServe."""
    out = str(compile_protos())
    if out not in sys.path:
        # `google` is a namespace package, so the generated google/rpc joins
        # the protobuf package's google/protobuf.
        sys.path.insert(0, out)
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


class InferenceClient:
    """`Predictions` / `StreamPredictions` against one TorchServe gRPC inference port."""

    def __init__(self, target: str, model: str = MODEL, deadline_s: float = DEFAULT_DEADLINE_S):
        self.pb2, pb2_grpc = load_modules()
        self.model = model
        self.deadline_s = deadline_s
        self.channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def metadata(key: str | None) -> list[tuple[str, str]]:
        return [] if key is None else [("authorization", f"Bearer {key}")]

    def request(self, fields: dict[str, bytes]):
        return self.pb2.PredictionsRequest(model_name=self.model, input=fields)

    def predict(self, fields: dict[str, bytes], key: str | None, deadline_s: float | None = None):
        """One unary call: the `PredictionResponse`, or the `grpc.RpcError` it
        failed with (DEADLINE_EXCEEDED when nothing came back in time)."""
        try:
            return self.stub.Predictions(
                self.request(fields), metadata=self.metadata(key), timeout=deadline_s or self.deadline_s
            )
        except grpc.RpcError as e:
            return e

    def predict_raw(self, body: bytes, key: str | None, deadline_s: float | None = None):
        """`Predictions` with a request body serialized by hand, for requests a
        proto3 library refuses to build (invalid UTF-8 in a string field)."""
        call = self.channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=lambda b: b,
            response_deserializer=self.pb2.PredictionResponse.FromString,
        )
        try:
            return call(body, metadata=self.metadata(key), timeout=deadline_s or self.deadline_s)
        except grpc.RpcError as e:
            return e

    def stream_predict(
        self, fields: dict[str, bytes], key: str | None, deadline_s: float | None = None
    ) -> Iterator:
        """`StreamPredictions`: yields each `PredictionResponse`; a failure
        (DEADLINE_EXCEEDED included, the deadline covering the whole stream)
        is yielded as the `grpc.RpcError`, last."""
        call = self.stub.StreamPredictions(
            self.request(fields), metadata=self.metadata(key), timeout=deadline_s or self.deadline_s
        )
        try:
            yield from call
        except grpc.RpcError as e:
            yield e


    def stream_predict2(
        self, requests: list, key: str | None, deadline_s: float | None = None
    ) -> list:
        """`StreamPredictions2` (bidirectional): sends `requests` (built with
        `request()`, `sequence_id` set as needed), then every response, a
        failure last as its `grpc.RpcError`."""
        call = self.stub.StreamPredictions2(
            iter(requests), metadata=self.metadata(key), timeout=deadline_s or self.deadline_s
        )
        results = []
        try:
            results.extend(call)
        except grpc.RpcError as e:
            results.append(e)
        return results


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def raw_request(model: str, fields: dict[bytes, bytes]) -> bytes:
    """A `PredictionsRequest` in protobuf wire format, map keys as raw bytes
    (proto3 requires UTF-8 there; a hostile client need not comply)."""
    def field(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
        return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload

    body = field(1, model.encode())
    for key, value in fields.items():
        body += field(3, field(1, key) + field(2, value))  # map entry: key = 1, value = 2
    return body
