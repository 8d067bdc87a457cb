"""Schemathesis hooks for tests/server/test_openapi_fuzz.py (loaded by name
through SCHEMATHESIS_HOOKS). filter_case applies in every phase (examples,
coverage, fuzzing); filter_body would leave the coverage phase's cases be."""
import schemathesis


@schemathesis.hook
def filter_case(ctx, case):
    """No form part named "": TorchServe's frontend answers it with its own
    500 before any handler sees the request (the README's TorchServe
    behaviours), so it says nothing of this model."""
    return not (isinstance(case.body, dict) and "" in case.body)
