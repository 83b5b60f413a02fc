"""What a real kube-apiserver checks of a CRD and of the objects it serves, for tests.

kmock accepts any CRD and any object. A real API server refuses a CRD whose schema is not
structural or whose defaults do not validate (CEL rules included), and on every create or
update it defaults, prunes and validates the object. This module reproduces those checks for
the parts of the schema language ap4k's CRD uses, so that a CRD the API server would refuse
fails a test here instead of `helm install` on a cluster.

Each function names the apiextensions-apiserver code (k8s.io/apiextensions-apiserver, under
pkg/) whose behaviour it stands for. Error texts follow the API server's wording where it
matters for a reader (the path, then what is wrong).

Not reproduced: the CEL type checker (cel-python does not type-check against the schema; the
field references of each rule are checked against the schema instead, see
`cel_reference_problems`), the CEL cost estimator (a conservative bound stands in for it, see
`cel_cost_problems`), ratcheting, conversion webhooks, OpenAPI `format` validation.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import jsonschema

Schema = dict[str, Any]

# The generic and extension fields of a schema node (pkg/apiserver/schema/structural.go).
GENERIC = ("type", "title", "description", "default", "nullable")
EXTENSIONS = (
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type",
    "x-kubernetes-map-type",
)
JUNCTORS = ("allOf", "anyOf", "oneOf")
# Rejected in v1 CRD schemas (pkg/apis/apiextensions/validation/validation.go,
# validateCustomResourceDefinitionOpenAPISchema).
FORBIDDEN_FIELDS = (
    "$ref", "$schema", "id", "definitions", "dependencies", "patternProperties",
    "additionalItems",
)
INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]
# The API server's bound on a request body; where a schema sets no maxItems/maxLength the CEL
# cost estimator assumes a value as large as this allows (pkg/apiserver/schema/cel/model).
MAX_REQUEST_BYTES = 3 * 1024 * 1024
# Per-rule limit of the static cost estimate (staging/src/k8s.io/apiserver/pkg/apis/cel:
# PerCallLimit is the runtime one; StaticEstimatedCostLimit applies at CRD creation).
STATIC_ESTIMATED_COST_LIMIT = 10_000_000


# --- Walking a schema -----------------------------------------------------------------------


def nodes(schema: Schema, path: str = "openAPIV3Schema") -> Iterator[tuple[str, Schema]]:
    """Every structural node (not those inside anyOf/allOf/oneOf/not), with its path."""
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.properties[{key}]")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}.items")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.additionalProperties")


# --- CRD creation: structural schema ----------------------------------------------------------


def structural_problems(schema: Schema) -> list[str]:
    """pkg/apiserver/schema/validation.go (ValidateStructural) and the forbidden fields of
    pkg/apis/apiextensions/validation: what makes the API server answer "must be structural"."""
    problems: list[str] = []
    _structural(schema, "root", "openAPIV3Schema", problems)
    return problems


def _structural(s: Schema, level: str, path: str, problems: list[str]) -> None:
    for name in FORBIDDEN_FIELDS:
        if name in s:
            problems.append(f"{path}.{name}: Forbidden")
    if s.get("uniqueItems") is True:
        problems.append(f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true "
                        "since the runtime complexity becomes quadratic")
    if "properties" in s and "additionalProperties" in s:
        problems.append(f"{path}.additionalProperties: Forbidden: additionalProperties and "
                        "properties are mutual exclusive")
    if s.get("type") == "array" and not isinstance(s.get("items"), dict):
        problems.append(f"{path}.items: Required value: must be specified")
    int_or_string = s.get("x-kubernetes-int-or-string") is True
    if int_or_string and s.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: must be "
                        "false if x-kubernetes-int-or-string is true")
    if not s.get("type") and not int_or_string and not s.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        where = {"root": "at the root", "item": "for specified array items",
                 "field": "for specified object fields"}[level]
        problems.append(f"{path}.type: Required value: must not be empty {where}")
    if level == "root" and s.get("type") not in (None, "object"):
        problems.append(f"{path}.type: Invalid value: must be object at the root")
    if level == "root" and "additionalProperties" in s:
        problems.append(f"{path}.additionalProperties: Forbidden: must not be used at the root")
    # IntOrString may carry its anyOf (or allOf[0].anyOf) of integer and string; every other
    # junctor holds value validations only.
    skip_any_of = int_or_string and s.get("anyOf") == INT_OR_STRING_ANY_OF
    for junctor in (*JUNCTORS, "not"):
        subs = s.get(junctor)
        if subs is None:
            continue
        for index, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            if junctor == "anyOf" and skip_any_of:
                continue
            _nested(sub, f"{path}.{junctor}[{index}]", problems)
    if "metadata" in s.get("properties", {}) and level == "root":
        metadata = dict(s["properties"]["metadata"])
        if metadata.get("type") != "object":
            problems.append(f"{path}.properties[metadata].type: Invalid value: must be object")
        props = metadata.pop("properties", {})
        metadata.pop("type", None)
        metadata.pop("default", None)  # checked with the defaults
        if set(props) - {"name", "generateName"} or metadata:
            problems.append(f"{path}.properties[metadata]: Forbidden: must not specify anything "
                            "other than name and generateName, but metadata is implicitly "
                            "specified")
    for key in ("kind", "apiVersion"):
        sub = s.get("properties", {}).get(key)
        if level == "root" and sub is not None and sub.get("type") != "string":
            problems.append(f"{path}.properties[{key}].type: Invalid value: must be string")
    for key, sub in s.get("properties", {}).items():
        _structural(sub, "field", f"{path}.properties[{key}]", problems)
    if isinstance(s.get("items"), dict):
        _structural(s["items"], "item", f"{path}.items", problems)
    if isinstance(s.get("additionalProperties"), dict):
        _structural(s["additionalProperties"], "field", f"{path}.additionalProperties", problems)
    _list_type(s, path, problems)


def _nested(v: Schema, path: str, problems: list[str]) -> None:
    """validateNestedValueValidation: inside a junctor only value validations may appear."""
    for name in (*GENERIC, *EXTENSIONS, "x-kubernetes-validations", "additionalProperties"):
        if name in v and v[name] not in (None, False, "", []):
            problems.append(f"{path}.{name}: Forbidden: must be empty to be structural")
    if "metadata" in v.get("properties", {}):
        problems.append(f"{path}.properties[metadata]: Forbidden: must not be specified in a "
                        "nested context")
    for key, sub in v.get("properties", {}).items():
        _nested(sub, f"{path}.properties[{key}]", problems)
    if isinstance(v.get("items"), dict):
        _nested(v["items"], f"{path}.items", problems)


def _list_type(s: Schema, path: str, problems: list[str]) -> None:
    """x-kubernetes-list-type: map needs object items whose keys are scalar fields that are
    required or defaulted (pkg/apis/apiextensions/validation, validateListTypeAndMapKeys)."""
    list_type = s.get("x-kubernetes-list-type")
    keys = s.get("x-kubernetes-list-map-keys")
    if keys and list_type != "map":
        problems.append(f"{path}.x-kubernetes-list-map-keys: Forbidden: only with list-type map")
    if list_type is None:
        return
    if s.get("type") != "array":
        problems.append(f"{path}.x-kubernetes-list-type: Invalid value: only for arrays")
        return
    items = s.get("items", {})
    if list_type == "map":
        if items.get("type") != "object":
            problems.append(f"{path}.items.type: Invalid value: must be object for list-type map")
        if not keys:
            problems.append(f"{path}.x-kubernetes-list-map-keys: Required value")
        for key in keys or []:
            field = items.get("properties", {}).get(key)
            if field is None:
                problems.append(f"{path}.x-kubernetes-list-map-keys: Invalid value: {key!r} is "
                                "not a property of the items")
            elif field.get("type") not in ("string", "integer", "number", "boolean"):
                problems.append(f"{path}.items.properties[{key}].type: must be a scalar type")
            elif key not in items.get("required", []) and "default" not in field:
                problems.append(f"{path}.items.properties[{key}]: Required value: all map keys "
                                "must be required or have a default value")
    elif list_type == "set" and items.get("type") not in ("string", "integer", "number",
                                                          "boolean"):
        problems.append(f"{path}.items.type: Invalid value: must be scalar for list-type set")


# --- CRD creation: defaults ----------------------------------------------------------------------


def default_problems(schema: Schema) -> list[str]:
    """pkg/apiserver/schema/defaulting/validation.go (ValidateDefaults): every `default` must
    be pruned (no unknown fields), valid against its own node's schema, and pass the CEL rules
    of that node and of every node under it, evaluated on the default *as written*: nested
    defaults are not applied to a default before it is validated. (A rule reading a key that
    only a nested default supplies is refused with "no such key".)"""
    problems: list[str] = []
    for path, node in nodes(schema):
        if "default" not in node:
            continue
        where = f"{path}.default"
        if path.endswith("properties[metadata]") or ".properties[metadata]." in path:
            problems.append(f"{where}: Forbidden: defaults are not allowed in metadata")
            continue
        value = node["default"]
        if prune(copy.deepcopy(value), node) != value:
            problems.append(f"{where}: Invalid value: must not have unknown fields")
        problems += [f"{where}: {p}" for p in schema_problems(node, value)]
        problems += [f"{where}: {p}" for p in cel_problems(node, value)]
    return problems


# --- Requests: defaulting, pruning, validation ----------------------------------------------------


def apply_defaults(schema: Schema, value: Any) -> Any:
    """pkg/apiserver/schema/defaulting/algorithm.go (Default): an absent field with a default
    gets a copy of it, and defaulting goes on *inside* what was just defaulted, so nested
    defaults do apply to real objects. A null in a non-nullable field with a default counts as
    absent (PruneNonNullableNullsWithoutDefaults keeps it for the default to replace)."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if "default" in sub and (
                key not in value or (value[key] is None and not sub.get("nullable"))
            ):
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def prune(value: Any, schema: Schema, root: bool = False) -> Any:
    """pkg/apiserver/schema/pruning/algorithm.go: fields the schema does not specify are
    dropped (unless x-kubernetes-preserve-unknown-fields); apiVersion, kind and metadata of a
    resource are left to ObjectMeta handling."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in list(value):
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                value[key] = prune(value[key], props[key])
            elif isinstance(extra, dict):
                value[key] = prune(value[key], extra)
            elif extra is not True:
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def schema_problems(schema: Schema, value: Any) -> list[str]:
    """The OpenAPI value validation (kube-openapi's validate, close to JSON Schema draft 4 with
    a boolean exclusiveMinimum); x-kubernetes-* extensions are the CEL part, checked apart."""
    validator = jsonschema.Draft4Validator(_go_patterns(copy.deepcopy(schema)))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<value>'}: Invalid value: "
        f"{error.message}"
        for error in validator.iter_errors(value)
    ]


def _go_patterns(schema: Any) -> Any:
    """The API server matches `pattern` with Go's RE2, where `$` is the end of the text;
    Python's `$` also matches before a final newline, so it becomes `\\Z` here."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            ends_with_anchor = isinstance(value, str) and value.endswith("$")
            if key == "pattern" and ends_with_anchor and not value.endswith("\\$"):
                schema[key] = value[:-1] + r"\Z"
            elif key not in ("default", "enum"):
                _go_patterns(value)
    elif isinstance(schema, list):
        for item in schema:
            _go_patterns(item)
    return schema


def admit(schema: Schema, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An object as a create or update request meets it: defaulted, then pruned, then
    validated (pkg/registry/customresource: the decoder defaults and prunes, the strategy
    validates with the OpenAPI schema and the CEL rules). Returns what would be stored, and
    the problems that would refuse it (none: stored)."""
    stored = prune(apply_defaults(schema, copy.deepcopy(obj)), schema, root=True)
    return stored, schema_problems(schema, stored) + cel_problems(schema, stored)


# --- CEL ---------------------------------------------------------------------------------------


def rules(schema: Schema) -> list[tuple[str, Schema, str]]:
    """(path, node, rule) of every x-kubernetes-validations rule of a structural node."""
    return [
        (path, node, rule["rule"])
        for path, node in nodes(schema)
        for rule in node.get("x-kubernetes-validations", [])
    ]


def _cel_value(schema: Schema, value: Any) -> Any:
    """JSON to CEL as the API server types it: `type: number` is a double even when written
    as an integer (pkg/apiserver/schema/cel/model: number → DoubleType)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: _cel_value(props.get(k, extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_cel_value(schema.get("items", {}), v) for v in value]
    return value


def cel_problems(schema: Schema, value: Any, path: str = "") -> list[str]:
    """pkg/apiserver/schema/cel/validation.go (Validator.Validate): each node's rules are
    evaluated with `self` bound to the value at that node, for every value present (each list
    item, each additionalProperties value); an evaluation error (such as "no such key")
    refuses the object just as a false result does."""
    import celpy  # cel-python: a CEL interpreter

    problems: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        try:
            result = program.evaluate({"self": celpy.json_to_cel(_cel_value(schema, value))})
        except celpy.CELEvalError as exc:
            result = exc
        if isinstance(result, celpy.CELEvalError):
            problems.append(f"{path or '<self>'}: Invalid value: {result.args[0]} evaluating "
                            f"rule: {rule.get('message', rule['rule'])}")
        elif result is not True and not (isinstance(result, celpy.celtypes.BoolType) and result):
            problems.append(f"{path or '<self>'}: Invalid value: "
                            f"{rule.get('message', 'failed rule: ' + rule['rule'])}")
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key, sub_value in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(extra, dict):
                sub = extra
            if sub is not None:
                problems += cel_problems(sub, sub_value, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += cel_problems(schema["items"], item, f"{path}[{index}]")
    return problems


# `self.a.b` chains in a rule, up to a method call or an operator.
_SELF_REFERENCE = re.compile(r"\bself((?:\.[A-Za-z_][A-Za-z0-9_]*)+)(\s*\()?")


def cel_reference_problems(schema: Schema) -> list[str]:
    """Stands in for the CEL type check at CRD creation (pkg/apiserver/schema/cel/compilation.go
    compiles each rule against the node's declared type): a rule naming a field the schema
    does not declare is refused with "undefined field". cel-python does not type-check, so the
    `self.x.y` chains of each rule are looked up in the schema here."""
    problems: list[str] = []
    for path, node, rule in rules(schema):
        for match in _SELF_REFERENCE.finditer(rule):
            names = match.group(1).lstrip(".").split(".")
            if match.group(2):  # the last name is a method: self.x.size()
                names = names[:-1]
            current = node
            if path == "openAPIV3Schema":  # the root sees apiVersion, kind, metadata.name
                current = {**node, "properties": {
                    **node.get("properties", {}),
                    "metadata": {"type": "object", "properties": {
                        "name": {"type": "string"}, "generateName": {"type": "string"}}},
                }}
            for name in names:
                props = current.get("properties", {})
                if name not in props:
                    problems.append(f"{path}.x-kubernetes-validations: Invalid value: compilation "
                                    f"failed: undefined field '{name}' in rule {rule!r}")
                    break
                current = props[name]
    return problems


def _cardinality(schema: Schema, path_nodes: list[Schema]) -> int:
    product = 1
    for node in path_nodes:
        if node.get("type") == "array":
            product *= node.get("maxItems", MAX_REQUEST_BYTES // 2)  # "[]," per empty item
        elif isinstance(node.get("additionalProperties"), dict):
            product *= node.get("maxProperties", MAX_REQUEST_BYTES // 6)
    return product


def cel_cost_problems(schema: Schema) -> list[str]:
    """Stands in for the static cost estimate at CRD creation (pkg/apiserver/schema/cel:
    a rule's estimated cost times the number of times it can run, the product of maxItems of
    the lists above it, must stay under StaticEstimatedCostLimit). cel-python estimates no
    cost, so this bounds it from above: a fixed 100 per rule plus, for each string field the
    rule reads, that string's maxLength (or the request size when unbounded) — string
    functions (size, matches, startsWith) are linear in the string's length."""
    problems: list[str] = []

    def visit(node: Schema, path: str, above: list[Schema]) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            cost = 100
            for match in _SELF_REFERENCE.finditer(rule["rule"]):
                leaf = node
                for name in match.group(1).lstrip(".").split("."):
                    leaf = leaf.get("properties", {}).get(name, {})
                if leaf.get("type") == "string" or not leaf:
                    cost += leaf.get("maxLength", MAX_REQUEST_BYTES)
            total = cost * _cardinality(schema, above)
            if total > STATIC_ESTIMATED_COST_LIMIT:
                problems.append(f"{path}.x-kubernetes-validations: Forbidden: estimated rule "
                                f"cost {total} exceeds budget {STATIC_ESTIMATED_COST_LIMIT}")
        for key, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.properties[{key}]", [*above, node])
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}.items", [*above, node])

    visit(schema, "openAPIV3Schema", [])
    return problems


def cel_placement_problems(schema: Schema) -> list[str]:
    """x-kubernetes-validations only where the schema is structural: not inside a junctor
    (checked by `structural_problems`), and not on a node whose value CEL cannot see (an
    untyped node without x-kubernetes-preserve-unknown-fields or int-or-string)."""
    return [
        f"{path}.x-kubernetes-validations: Forbidden: the node has no type CEL can bind"
        for path, node, _ in rules(schema)
        if not node.get("type") and not node.get("x-kubernetes-int-or-string")
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]


# --- The whole CRD -----------------------------------------------------------------------------


_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def crd_problems(crd: dict[str, Any]) -> list[str]:
    """Everything above for each version, plus the names and printer columns the API server
    checks (pkg/apis/apiextensions/validation: ValidateCustomResourceDefinition)."""
    spec = crd["spec"]
    names = spec["names"]
    problems: list[str] = []
    if crd["metadata"]["name"] != f"{names['plural']}.{spec['group']}":
        problems.append("metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group")
    for key in ("plural", "singular"):
        if not _DNS_1035.fullmatch(names.get(key, "")):
            problems.append(f"spec.names.{key}: Invalid value: must be a DNS-1035 label")
    for short in names.get("shortNames", []):
        if not _DNS_1035.fullmatch(short):
            problems.append(f"spec.names.shortNames: Invalid value: {short!r}")
    if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        problems.append("spec.versions: Invalid value: exactly one version must be storage")
    for index, version in enumerate(spec["versions"]):
        where = f"spec.versions[{index}]"
        schema = version["schema"]["openAPIV3Schema"]
        for finder in (structural_problems, default_problems, cel_reference_problems,
                       cel_cost_problems, cel_placement_problems):
            problems += [f"{where}.schema.{p}" for p in finder(schema)]
        for column in version.get("additionalPrinterColumns", []):
            if column["type"] not in ("integer", "number", "string", "boolean", "date"):
                problems.append(f"{where}.additionalPrinterColumns: Unsupported value: "
                                f"{column['type']!r}")
            if not column["jsonPath"].startswith("."):
                problems.append(f"{where}.additionalPrinterColumns: Invalid value: jsonPath "
                                "must start with '.'")
    return problems
