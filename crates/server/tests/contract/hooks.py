"""Schemathesis hooks of the /v1 contract test (crates/server/tests/contract.rs).

A sandbox may ask to live one second (`timeout_s`, `lifecycle.*_s` have a minimum of 1), and
the server honours it: the sandbox is gone a second later. The fuzzer draws such values, and
on a loaded machine its next call on the sandbox it just created comes after that second, so
`ensure_resource_availability` reports a resource lost that the client itself asked to lose.
This hook gives the lifetimes the fuzzer sends a floor of five minutes; every other value, and
every value that breaks the schema (negative cases), is sent as drawn. Short lifetimes have
tests of their own (crates/server/tests/durable.rs, crates/core/src/sandbox_tests.rs).
"""

import schemathesis

FLOOR_S = 300

# The fields that end a sandbox after so many seconds.
LIFETIMES = ("timeout_s",)
LIFECYCLE = ("idle_timeout_s", "max_lifetime_s", "delete_after_s", "hibernate_after_s")


def _floor(obj, keys):
    for key in keys:
        value = obj.get(key)
        # Only schema-valid short lifetimes: `bool` is an `int` in Python, and 0 or a negative
        # value is a negative case the server must refuse as drawn.
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < FLOOR_S:
            obj[key] = FLOOR_S


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    path = case.operation.path
    if case.method.upper() != "POST" or not isinstance(case.body, dict):
        return
    if path == "/v1/sandboxes" or path.endswith("/timeout"):
        _floor(case.body, LIFETIMES)
        lifecycle = case.body.get("lifecycle")
        if isinstance(lifecycle, dict):
            _floor(lifecycle, LIFECYCLE)
