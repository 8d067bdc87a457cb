"""Schemathesis hooks for tests/server/test_openapi_fuzz.py (loaded by name
through SCHEMATHESIS_HOOKS)."""
import schemathesis


@schemathesis.hook
def filter_body(ctx, body):
    """No form part named "": TorchServe's frontend answers it with its own 500
    before any handler sees the request (the README's TorchServe behaviours),
    so it says nothing of this model."""
    return not (isinstance(body, dict) and "" in body)
