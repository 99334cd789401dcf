"""schemathesis checks for kiln-vmm, loaded with SCHEMATHESIS_HOOKS=kiln_checks. Two of
schemathesis's own checks hold kiln-vmm to something Firecracker itself does not do; these
replace them with what Firecracker's server does, and check all the rest as strictly:

- `kiln_content_type` for `content_type_conformance`: with swagger 2.0's global `produces`,
  schemathesis wants a Content-Type even on a 204, which has no content (RFC 9110: no body, no
  Content-Length). Here a 204 must have no body, and every other answer must say
  `application/json` and be JSON.
- `kiln_response_schema` for `response_schema_conformance`: `GET /vm/config` answers `null` for
  what is not configured (`"vsock": null`), as Firecracker's server does, where its swagger has
  no `null`s. Here that answer is validated against the swagger's FullVmConfiguration with only
  that allowed: any property an object does not require may be `null`. Every other answer goes
  to schemathesis's own check unchanged.

It also serializes `ast.parse`: Hypothesis parses source files to describe its strategies, from
every worker thread at once, and CPython 3.11's AST constructor keeps its recursion depth in
state shared by all threads, so two parses at once fail with "AST constructor recursion depth
mismatch" (seen here as a schemathesis "Runtime Error" on one operation).
"""

import ast
import copy
import json
import os
import re
import threading

import jsonschema_rs
import schemathesis
import yaml
from schemathesis.specs.openapi.checks import response_schema_conformance


_PARSE = ast.parse
_PARSE_LOCK = threading.Lock()


def _parse_one_at_a_time(*args, **kwargs):
    with _PARSE_LOCK:
        return _PARSE(*args, **kwargs)


ast.parse = _parse_one_at_a_time


def _nullable(schema):
    """Lets each property that `schema` (and any schema inside it) does not require be null."""
    if not isinstance(schema, dict):
        return
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    for name, prop in list(properties.items()):
        _nullable(prop)
        if name not in required:
            properties[name] = {"anyOf": [{"type": "null"}, prop]}
    _nullable(schema.get("items"))
    if isinstance(schema.get("additionalProperties"), dict):
        _nullable(schema["additionalProperties"])


class _SwaggerLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans only: under YAML 1.1 the swagger's
    `enum: [Error, Warning, Info, Debug, Trace, Off]` (the logger's level) would hold `False`
    instead of the string "Off", and a logger set to Off would fail the check."""


_SwaggerLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SwaggerLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _vm_config_validator():
    with open(os.environ["KILN_FIRECRACKER_SWAGGER"]) as f:
        swagger = yaml.load(f, Loader=_SwaggerLoader)
    definitions = copy.deepcopy(swagger["definitions"])
    for definition in definitions.values():
        _nullable(definition)
    return jsonschema_rs.Draft4Validator(
        {"definitions": definitions, "allOf": [{"$ref": "#/definitions/FullVmConfiguration"}]}
    )


VM_CONFIG = _vm_config_validator()


def _header(response, name):
    values = response.headers.get(name, [])
    return values[0] if values else None


@schemathesis.check
def kiln_content_type(ctx, response, case):
    """A 204 has no body; any other answer is `application/json` and parses as JSON."""
    if response.status_code == 204:
        if response.content:
            raise AssertionError(f"a 204 answer with a {len(response.content)}-byte body")
        if _header(response, "content-length") is not None:
            raise AssertionError("a 204 answer with a Content-Length (RFC 9110 forbids it)")
        return None
    content_type = _header(response, "content-type")
    if content_type is None or content_type.split(";")[0].strip() != "application/json":
        raise AssertionError(f"a {response.status_code} answer of type {content_type!r}, not JSON")
    try:
        json.loads(response.content)
    except ValueError as e:
        raise AssertionError(f"a {response.status_code} answer that is not JSON: {e}") from None
    return None


@schemathesis.check
def kiln_response_schema(ctx, response, case):
    """schemathesis's response schema check, with Firecracker's `null`s in GET /vm/config."""
    op = case.operation
    if op.method.upper() == "GET" and op.path == "/vm/config" and response.status_code == 200:
        errors = [
            f"{'/'.join(map(str, e.instance_path))}: {e.message}"
            for e in VM_CONFIG.iter_errors(json.loads(response.content))
        ]
        if errors:
            raise AssertionError("GET /vm/config breaks FullVmConfiguration: " + "; ".join(errors))
        return None
    return response_schema_conformance(ctx, response, case)
