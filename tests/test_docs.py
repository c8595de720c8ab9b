"""docs/api.md describes the API as implemented: its field tables equal the OpenAPI schema.

Each table is marked `<!-- table: NAME -->`; the response tables list every field as a dotted
path (`results[].mask.rle.*.size`: `[]` an array's items, `*` a map's values) with its JSON type
and whether it is always present. The schema side is flattened the same way from
`app.openapi()`, so a field added, removed, retyped or made optional on either side fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.server.app import create_app
from service.server.schemas import DETECT_FORM_SCHEMA
from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"


def doc_table(name: str) -> list[list[str]]:
    """The rows (cells, backticks stripped) of the table marked `<!-- table: name -->`."""
    text = API_MD.read_text()
    marker = f"<!-- table: {name} -->"
    assert marker in text, f"docs/api.md has no table marked {marker}"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines[2:]:  # header and separator first
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(Settings(), configure_logs=False).openapi()


def flatten(openapi: dict, ref: str) -> dict[str, tuple[str, bool]]:
    """{dotted path: (JSON type, always present)} of a component schema."""
    components = openapi["components"]["schemas"]
    out: dict[str, tuple[str, bool]] = {}

    def resolve(schema: dict) -> dict:
        return components[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    def visit(schema: dict, prefix: str) -> None:
        schema = resolve(schema)
        if schema.get("type") == "array":
            visit(schema["items"], prefix + "[]")
        required = set(schema.get("required", []))
        for name, sub in schema.get("properties", {}).items():
            add(sub, f"{prefix}.{name}" if prefix else name, name in required)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            add(extra, f"{prefix}.*", True)

    def add(schema: dict, path: str, always: bool) -> None:
        options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
        assert len(options) == 1, f"{path}: a union the doc format cannot express: {options}"
        inner = resolve(options[0])
        out[path] = (inner.get("type", "object"), always)
        visit(inner, path)

    visit({"$ref": ref}, "")
    return out


@pytest.mark.parametrize("table, component", [("DetectResponse", "DetectResponse"),
                                              ("ErrorResponse", "ErrorResponse")])
def test_documented_response_fields_match_the_schema(openapi, table, component):
    schema = flatten(openapi, f"#/components/schemas/{component}")
    documented = {row[0]: (row[1], row[2] == "yes") for row in doc_table(table)}
    missing = sorted(set(schema) - set(documented))
    extra = sorted(set(documented) - set(schema))
    assert not missing and not extra, f"undocumented: {missing}; documented but not in the API: {extra}"
    wrong = {p: (documented[p], schema[p]) for p in schema if documented[p] != schema[p]}
    assert not wrong, f"(type, always) in docs/api.md vs the schema: {wrong}"


def test_documented_query_parameters_and_headers_match(openapi):
    params = openapi["paths"]["/detect"]["post"]["parameters"]
    query = {p["name"] for p in params if p["in"] == "query"}
    headers = {p["name"].lower() for p in params if p["in"] == "header"}
    schemes = openapi["components"]["securitySchemes"]
    for requirement in openapi["paths"]["/detect"]["post"]["security"]:  # X-API-Key: a security scheme
        headers |= {schemes[name]["name"].lower() for name in requirement if schemes[name]["in"] == "header"}
    assert {row[0] for row in doc_table("query")} == query
    documented_headers = {row[0].lower() for row in doc_table("request headers")}
    assert headers <= documented_headers  # X-Request-ID is read by the middleware, not a parameter
    assert documented_headers - headers == {"x-request-id"}


def test_documented_form_fields_match(openapi):
    form = openapi["paths"]["/detect"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form == DETECT_FORM_SCHEMA
    rows = doc_table("form")
    assert {row[0] for row in rows} == set(form["properties"])
    assert {row[0] for row in rows if row[1] == "yes"} == set(form["required"])


def test_documented_error_codes_exist_in_the_code():
    """Every code in the errors table is one the service can send (appears in service/)."""
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    text = API_MD.read_text().split("### Errors", 1)[1].split("### Limits", 1)[0]
    codes = re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, flags=re.M)
    assert len(codes) >= 15
    for status, code in codes:
        assert f'"{code}"' in source, f"{status} {code} is documented but never sent"


def test_documented_limits_are_the_defaults():
    rows = [r for r in doc_table("limits") if r[0].startswith("DAPO_")]
    defaults = Settings()
    for name, value, _ in rows:
        assert int(value.split()[0]) == getattr(defaults, name.removeprefix("DAPO_").lower()), name
    assert len(rows) >= 6
