"""What a Kubernetes API server does with a CRD's ``openAPIV3Schema``, offline.

Read from apiextensions-apiserver and kube-openapi (v1.32), and written once here for the two
places that need it: the test API server (apiserver.py) admits CRDs and custom resources with
it, and tests/test_crds.py checks the project's CRDs with it.

* ``check_schema(schema, field)``: the rules a CRD version's schema must pass before the server
  accepts the CRD (``schema/validation.go`` ValidateStructural: types everywhere, metadata
  restricted to name/generateName, junctors with value validations only, the int-or-string
  patterns; ``defaulting/validation.go`` ValidateDefaults: every default valid for its own
  field and pruned; CEL rules that compile, name declared fields, and stay within the cost
  budget).
* ``admit(obj, schema)``: what happens to a custom resource on create and update, in the server's
  order: pruning (unknown fields, non-nullable nulls), defaulting, OpenAPI validation with the
  server's numeric semantics, then the CEL rules (``x-kubernetes-validations``), which run only
  when the schema validation found no type error.

Numbers follow the real server, which decodes JSON integers as int64 and anything else as
float64, then (kube-openapi's ``MaximumNativeType`` and friends) compares an integer value with
``int64(bound)``: a bound beyond the int64 range, such as float32's largest value, becomes
-9223372036854775808, so ``255 <= 3.4e38`` fails. An integer beyond int64 arrives as a float and
is "number", not "integer", past 2^53.

Approximated: the CEL cost estimate. The real server computes a worst-case cost per rule from
maxLength / maxItems / maxProperties and refuses a rule over its budget; here, a comprehension
(``all``, ``exists``, ``exists_one``, ``map``, ``filter``) over a list or map with no
maxItems / maxProperties is refused, which is where unbounded rules come from. CEL's static
type check is reduced to "every ``self.field`` is declared". No ``oldSelf`` (transition rules),
no ``messageExpression``, no ratcheting. Python's ``re`` stands in for Go's RE2.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from typing import Any

import cel

Obj = dict[str, Any]
Cause = tuple[str, str, str]  # (field, reason, detail), as a Status's details.causes

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
JSON_INTEGER_LIMIT = 2.0**53  # go-openapi's IsFloat64AJSONInteger: integral floats up to 2^53
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
# What a node under a junctor may not carry (ValidateStructural's "must be empty/undefined/false
# to be structural").
NOT_IN_JUNCTORS = (
    "type",
    "default",
    "title",
    "description",
    "nullable",
    "externalDocs",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
)
COMPREHENSION = re.compile(r"\b(self(?:\.\w+)*)\.(all|exists_one|exists|map|filter)\(")
SELF_FIELD = re.compile(r"\bself\.(\w+)\b(?!\s*\()")  # a field, not a method: self.all(
BLOCKING = "FieldValueTypeInvalid"  # a type error: the CEL rules are not run


# --------------------------------------------------------------------------------------------
# Values as the server decodes and compares them
# --------------------------------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(json_equal, a, b))
    return a == b


def decode_numbers(value: Any) -> Any:
    """Integers beyond int64 become floats, as the server's JSON decoder makes them."""
    if isinstance(value, dict):
        return {k: decode_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_numbers(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value if INT64_MIN <= value <= INT64_MAX else float(value)
    return value


def has_type(value: Any, expected: str) -> bool:
    if expected in ("integer", "number") and isinstance(value, bool):
        return False
    if expected == "integer":
        if isinstance(value, float):
            return value.is_integer() and abs(value) <= JSON_INTEGER_LIMIT
        return isinstance(value, int)
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "number": int | float}
    return expected not in kinds or isinstance(value, kinds[expected])


def _as_compared(value: Any, bound: Any) -> Any:
    """The bound kube-openapi compares ``value`` with: ``int64(bound)`` for an integer value
    (Go truncates toward zero; out of range or NaN gives MinInt64 on amd64)."""
    if isinstance(value, int) and isinstance(bound, float):
        if math.isnan(bound) or not INT64_MIN <= bound < 2.0**63:
            return INT64_MIN
        return int(bound)
    return bound


def _shown(value: Any) -> str:
    """A value as the server's field errors show it."""
    if isinstance(value, dict | list):
        return '"object"' if isinstance(value, dict) else '"array"'
    return json.dumps(value)


@functools.lru_cache(maxsize=512)
def _pattern(pattern: str) -> re.Pattern:
    return re.compile(pattern)


# --------------------------------------------------------------------------------------------
# Custom resources: pruning, defaulting, validation, CEL (the server's order)
# --------------------------------------------------------------------------------------------


def prune(value: Any, schema: Obj, path: str, unknown: list[str], root: bool = False) -> None:
    """Drop, in place, the fields the schema does not declare (listing them in ``unknown``), and
    nulls of fields that are not nullable."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
        embedded = root or schema.get("x-kubernetes-embedded-resource") is True
        for key in list(value):
            sub_path = f"{path}.{key}"
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if embedded and key in ("apiVersion", "kind", "metadata"):
                continue
            if sub is None and not keep:
                del value[key]
                unknown.append(sub_path.lstrip("."))
            elif sub is not None and value[key] is None and not sub.get("nullable"):
                del value[key]
            elif sub is not None:
                prune(value[key], sub, sub_path, unknown)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            prune(item, schema["items"], f"{path}[{i}]", unknown)


def apply_defaults(value: Any, schema: Obj) -> None:
    """Fill in the schema's ``default``s, in place; a default gets its own defaults too."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        for key in value.keys() - props.keys() if isinstance(extra, dict) else ():
            apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


def validate(value: Any, schema: Obj, path: str, causes: list[Cause]) -> None:
    """Check a value against the OpenAPI v3 subset CRDs use; append (field, reason, detail)."""
    field = path or "<root>"
    body = f"{path} in body" if path else "in body"  # how kube-openapi names the value

    def fail(detail: str, shown: str | None = None) -> None:
        reason = BLOCKING if shown else "FieldValueInvalid"
        causes.append((field, reason, f"Invalid value: {shown or _shown(value)}: {detail}"))

    expected = schema.get("type")
    if value is None:
        if expected and not schema.get("nullable"):
            fail(f'{body} must be of type {expected}: "null"', shown='"null"')
        return
    if schema.get("x-kubernetes-int-or-string") and isinstance(value, int | str):
        expected = None
    if expected and not has_type(value, expected):
        got = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value))
        got = got or "number"
        fail(f'{body} must be of type {expected}: "{got}"', shown=f'"{got}"')
        return
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        supported = ", ".join(json.dumps(e) for e in schema["enum"])
        detail = f"Unsupported value: {_shown(value)}: supported values: {supported}"
        causes.append((field, "FieldValueNotSupported", detail))
    if has_type(value, "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        strict_low, strict_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if low is not None:
            low = _as_compared(value, low)
            if value <= low if strict_low else value < low:
                or_equal = "or equal to " * (not strict_low)
                fail(f"{body} should be greater than {or_equal}{low}")
        if high is not None:
            high = _as_compared(value, high)
            if value >= high if strict_high else value > high:
                or_equal = "or equal to " * (not strict_high)
                fail(f"{body} should be less than {or_equal}{high}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            fail(f"{body} should be at least {schema['minLength']} chars long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            fail(f"{body} should be at most {schema['maxLength']} chars long")
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            fail(f"{body} should match '{schema['pattern']}'")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            fail(f"{body} should have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            fail(f"{body} should have at most {schema['maxItems']} items")
        for i, item in enumerate(value if isinstance(schema.get("items"), dict) else ()):
            validate(item, schema["items"], f"{path}[{i}]", causes)
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            fail(f"{body} should have at least {schema['minProperties']} properties")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            fail(f"{body} should have at most {schema['maxProperties']} properties")
        for name in schema.get("required") or []:
            if name not in value:
                causes.append(
                    (f"{path}.{name}".lstrip("."), "FieldValueRequired", "Required value")
                )
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None and (path or key != "metadata"):  # metadata is checked apart
                validate(item, sub, f"{path}.{key}".lstrip("."), causes)

    def passes(sub: Obj) -> bool:
        errors: list = []
        validate(value, sub, path, errors)
        return not errors

    for sub in schema.get("allOf") or []:
        validate(value, sub, path, causes)
    if schema.get("oneOf") and sum(map(passes, schema["oneOf"])) != 1:
        fail(f"{body} must validate one and only one schema (oneOf)")
    if schema.get("anyOf") and not any(map(passes, schema["anyOf"])):
        fail(f"{body} must validate at least one schema (anyOf)")
    if isinstance(schema.get("not"), dict) and passes(schema["not"]):
        fail(f"{body} must not validate the schema (not)")


@functools.lru_cache(maxsize=256)
def _program(rule: str) -> cel.Program:
    return cel.compile(rule)


def cel_value(value: Any, schema: Obj) -> Any:
    """A value as CEL sees it: a ``number`` field is a double even when written as 255."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return {
            k: cel_value(v, props.get(k, extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [cel_value(v, items) for v in value]
    if schema.get("type") == "number" and has_type(value, "number"):
        return float(value)
    return value


def validate_rules(value: Any, schema: Obj, path: str, causes: list[Cause]) -> None:
    """Evaluate every ``x-kubernetes-validations`` rule on the fields present; append failures."""
    field = path or "<root>"
    for rule in schema.get("x-kubernetes-validations") or []:
        try:
            ok = _program(rule["rule"]).execute({"self": cel_value(value, schema)})
        except Exception as exc:  # a runtime error (no such key, overflow) fails the rule
            ok, message = False, f"{rule['rule']}: {exc}"
        else:
            message = rule.get("message") or f"failed rule: {rule['rule']}"
        if ok is not True:
            causes.append(
                (field, "FieldValueInvalid", f"Invalid value: {_shown(value)}: {message}")
            )
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None and (path or key != "metadata"):
                validate_rules(item, sub, f"{path}.{key}".lstrip("."), causes)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            validate_rules(item, schema["items"], f"{path}[{i}]", causes)


def admit(obj: Obj, schema: Obj) -> tuple[list[Cause], list[str]]:
    """Prune, default and validate a custom resource in place, as the server stores it.
    Returns the validation errors and the unknown fields that were pruned."""
    unknown: list[str] = []
    prune(obj, schema, "", unknown, root=True)
    apply_defaults(obj, schema)
    causes: list[Cause] = []
    validate(obj, schema, "", causes)
    if not any(reason == BLOCKING for _, reason, _ in causes):
        validate_rules(obj, schema, "", causes)
    return causes, unknown


# --------------------------------------------------------------------------------------------
# CRDs: is a version's schema one the server accepts?
# --------------------------------------------------------------------------------------------


def _forbidden(field: str, detail: str) -> Cause:
    return (field, "FieldValueForbidden", f"Forbidden: {detail}")


def _required(field: str, detail: str) -> Cause:
    return (field, "FieldValueRequired", f"Required value: {detail}")


def _invalid(field: str, value: Any, detail: str) -> Cause:
    return (field, "FieldValueInvalid", f"Invalid value: {_shown(value)}: {detail}")


def _is_int_or_string(node: Obj) -> bool:
    any_of = node.get("anyOf")
    first_all_of = (node.get("allOf") or [{}])[0].get("anyOf")
    return any_of == INT_OR_STRING or first_all_of == INT_OR_STRING


def _check_junctor(node: Any, field: str, causes: list[Cause]) -> None:
    """Inside allOf/anyOf/oneOf/not: value validations only, and never metadata."""
    if not isinstance(node, dict):
        return
    causes += [
        _forbidden(f"{field}.{key}", "must be empty to be structural")
        for key in node
        if key in NOT_IN_JUNCTORS
    ]
    if "metadata" in (node.get("properties") or {}):
        causes.append(
            _forbidden(f"{field}.properties[metadata]", "must not be specified in a nested context")
        )
    for name, sub in (node.get("properties") or {}).items():
        _check_junctor(sub, f"{field}.properties[{name}]", causes)
    _check_junctor(node.get("items"), f"{field}.items", causes)
    for key in JUNCTORS:
        subs = node.get(key) or []
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            _check_junctor(sub, f"{field}.{key}[{i}]", causes)


def _check_structure(node: Obj, field: str, level: str, causes: list[Cause]) -> None:
    """ValidateStructural for one node and everything below it."""
    kind = node.get("type")
    if kind == "array" and "items" not in node:
        causes.append(_required(f"{field}.items", "must be specified"))
    if isinstance(node.get("items"), dict):
        _check_structure(node["items"], f"{field}.items", "item", causes)
    for name, sub in (node.get("properties") or {}).items():
        _check_structure(sub, f"{field}.properties[{name}]", "field", causes)
    extra = node.get("additionalProperties")
    if extra is not None and level == "root":
        causes.append(_forbidden(f"{field}.additionalProperties", "must not be used at the root"))
    if isinstance(extra, dict):
        _check_structure(extra, f"{field}.additionalProperties", "field", causes)
    if node.get("properties") and extra not in (None, False):
        causes.append(
            _forbidden(
                f"{field}.additionalProperties",
                "additionalProperties and properties are mutual exclusive",
            )
        )
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if int_or_string and node.get("x-kubernetes-preserve-unknown-fields"):
        causes.append(
            _invalid(
                f"{field}.x-kubernetes-preserve-unknown-fields",
                True,
                "must be false if x-kubernetes-int-or-string is true",
            )
        )
    skip_any_of = _is_int_or_string(node)
    for key in JUNCTORS:
        subs = node.get(key) or []
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            if key == "anyOf" and skip_any_of and node.get("anyOf") == INT_OR_STRING:
                continue
            if key == "allOf" and i == 0 and skip_any_of and "anyOf" in sub:
                sub = {k: v for k, v in sub.items() if k != "anyOf"}
            suffix = f"[{i}]" if key != "not" else ""
            _check_junctor(sub, f"{field}.{key}{suffix}", causes)
    if not kind and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
        where = {
            "root": "at the root",
            "item": "for specified array items",
            "field": "for specified object fields",
        }[level]
        causes.append(_required(f"{field}.type", f"must not be empty {where}"))
    if level == "root" and kind and kind != "object":
        causes.append(_invalid(f"{field}.type", kind, "must be object at the root"))
    if "pattern" in node:
        try:
            re.compile(node["pattern"])
        except re.error as exc:
            causes.append(
                _invalid(
                    f"{field}.pattern",
                    node["pattern"],
                    f"must be a valid regular expression, but isn't: {exc}",
                )
            )
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items") or {}
        for key in node.get("x-kubernetes-list-map-keys") or []:
            sub = (item.get("properties") or {}).get(key)
            if sub is None:
                causes.append(
                    _invalid(
                        f"{field}.x-kubernetes-list-map-keys",
                        key,
                        "entries must all be names of item properties",
                    )
                )
            elif key not in (item.get("required") or []) and "default" not in sub:
                causes.append(
                    _required(
                        f"{field}.items.properties[{key}]",
                        "this property is in x-kubernetes-list-map-keys, so it must have "
                        "a default or be a required property",
                    )
                )


def _check_metadata(root: Obj, field: str, causes: list[Cause]) -> None:
    """metadata at the root may say it is an object and restrict name / generateName; nothing
    else (validateStructuralMetadataInvariants: a description is already too much)."""
    meta = (root.get("properties") or {}).get("metadata")
    if meta is None:
        return
    where = f"{field}.properties[metadata]"
    if meta.get("type", "object") != "object":
        causes.append(_invalid(f"{where}.type", meta.get("type"), "must be object"))
    rest = {k: v for k, v in meta.items() if k not in ("type", "properties")}
    props = set(meta.get("properties") or {})
    if rest or not props <= {"name", "generateName"}:
        causes.append(
            _forbidden(
                where,
                "must not specify anything other than name and generateName, but metadata is "
                "implicitly specified",
            )
        )


def _check_defaults(node: Obj, field: str, causes: list[Cause]) -> None:
    """ValidateDefaults: a default must be pruned and valid for its own field's schema."""
    if "default" in node:
        default = decode_numbers(copy.deepcopy(node["default"]))
        unknown: list[str] = []
        pruned = copy.deepcopy(default)
        prune(pruned, node, "", unknown)
        if unknown or not json_equal(pruned, default):
            causes.append(_invalid(f"{field}.default", default, "must not have unknown fields"))
        errors: list[Cause] = []
        validate(default, node, "", errors)
        if not any(reason == BLOCKING for _, reason, _ in errors):
            validate_rules(default, node, "", errors)
        causes += [
            (f"{field}.default" + ("" if at == "<root>" else f".{at}"), reason, detail)
            for at, reason, detail in errors
        ]
    if isinstance(node.get("items"), dict):
        _check_defaults(node["items"], f"{field}.items", causes)
    for name, sub in (node.get("properties") or {}).items():
        if field.endswith("openAPIV3Schema") and name == "metadata":
            continue  # checked by _check_metadata
        _check_defaults(sub, f"{field}.properties[{name}]", causes)


def _resolve(root: Obj, expression: str) -> Obj | None:
    """The schema node ``self.a.b`` names, from the node the rule sits on."""
    node: Obj | None = root
    for name in expression.split(".")[1:]:
        node = ((node or {}).get("properties") or {}).get(name)
    return node


def _check_rules(node: Obj, field: str, causes: list[Cause]) -> None:
    for i, rule in enumerate(node.get("x-kubernetes-validations") or []):
        where = f"{field}.x-kubernetes-validations[{i}].rule"
        text = rule.get("rule", "")
        try:
            _program(text)
        except ValueError as exc:
            causes.append(_invalid(where, text, f"compilation failed: {exc}"))
            continue
        declared = node.get("properties") or {}
        a_map = isinstance(node.get("additionalProperties"), dict)
        for name in SELF_FIELD.findall(text):
            if name not in declared and not a_map:
                causes.append(
                    _invalid(where, text, f"compilation failed: undefined field '{name}'")
                )
        for target, _ in COMPREHENSION.findall(text):
            collection = _resolve(node, target)
            bounded = collection is not None and (
                "maxItems" in collection or "maxProperties" in collection
            )
            if not bounded:
                causes.append(
                    _forbidden(
                        where,
                        f"estimated rule cost exceeds budget: {target} has no maxItems or "
                        "maxProperties (unbounded comprehension)",
                    )
                )
    if isinstance(node.get("items"), dict):
        _check_rules(node["items"], f"{field}.items", causes)
    if isinstance(node.get("additionalProperties"), dict):
        _check_rules(node["additionalProperties"], f"{field}.additionalProperties", causes)
    for name, sub in (node.get("properties") or {}).items():
        _check_rules(sub, f"{field}.properties[{name}]", causes)


def check_schema(schema: Obj, field: str = "openAPIV3Schema") -> list[Cause]:
    """Why the API server would refuse a CRD version with this schema (empty: it accepts it)."""
    causes: list[Cause] = []
    _check_structure(schema, field, "root", causes)
    _check_metadata(schema, field, causes)
    _check_defaults(schema, field, causes)
    _check_rules(schema, field, causes)
    return causes
