"""Checkers for docs drift: what the running product has that the docs do not say.

Each checker takes the product side (an OpenAPI schema, a Settings class, a /metrics scrape,
source files) and the doc text, and returns what is missing, so tests/test_docs_drift.py can
run it on the real docs and also on a doc or a product with one planted omission (a checker
that cannot fail would prove nothing). Every message says what fixes it.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"
SETTINGS_MD = ROOT / "docs" / "settings.md"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


# --- routes ------------------------------------------------------------------------------
def documented_routes(doc: str) -> set[tuple[str, str]]:
    """(METHOD, path) pairs written as `METHOD /path` anywhere in the doc."""
    return {(m, p) for m, p in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", doc)}


def undocumented_routes(openapi: dict, doc: str) -> list[str]:
    """Operations of the schema that the doc never names as `METHOD /path`."""
    documented = documented_routes(doc)
    missing = []
    for path, item in openapi["paths"].items():
        for method in item:
            if method in HTTP_METHODS and (method.upper(), path) not in documented:
                missing.append(f"{method.upper()} {path}")
    return sorted(missing)


# --- settings ----------------------------------------------------------------------------
def settings_problems(doc: str, settings_cls: type | None = None) -> list[str]:
    """Settings fields whose DAPO_* name and default the table does not list, fields nothing
    describes, and descriptions kept for fields that no longer exist."""
    from service.server import settings_doc

    problems = []
    for row in settings_doc.rows(settings_cls):
        if f"| `{row.env}` | `{settings_doc.cell(row.default)}` |" not in doc:
            problems.append(f"{row.env} (default {row.default}) is not in the settings table")
        if not row.what:
            problems.append(f"{row.env} has no description: give the field `Field(description=...)` in Settings")
    fields = set(settings_doc.fields_of(settings_cls))
    problems += [f"settings_doc.NOTES describes {name}, which Settings no longer has"
                 for name in sorted(set(settings_doc.NOTES) - fields)]
    return problems


# --- metrics -----------------------------------------------------------------------------
def metric_families(exposition: str) -> set[str]:
    """The family names a Prometheus text exposition declares (its `# TYPE` lines)."""
    names = set(re.findall(r"^# TYPE (\S+) \S+$", exposition, flags=re.M))
    # prometheus_client adds `<name>_created` (the series' start time) beside each counter and
    # histogram: part of that family, not one of its own
    return {n for n in names if not (n.endswith("_created") and names & {n[:-8], n[:-8] + "_total"})}


def documented_metrics(doc: str) -> set[str]:
    """Metric names in the first cell of the doc's `<!-- table: metrics -->` table."""
    marker = "<!-- table: metrics -->"
    if marker not in doc:
        return set()
    names = set()
    for line in doc.split(marker, 1)[1].strip().splitlines()[2:]:
        if not line.startswith("|"):
            break
        names |= set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", line.split("|")[1]))
    return names


def undocumented_metrics(exposition: str, doc: str) -> list[str]:
    return sorted(metric_families(exposition) - documented_metrics(doc))


# --- error codes -------------------------------------------------------------------------
# Calls that give an answer its `code`: the callee's name -> the code's positional index
# (a `code=` keyword counts as well).
CODE_ARGS = {"ApiError": 1, "envelope": 1, "ImageError": 3}


def documented_codes(doc: str) -> set[str]:
    """Codes in the rows `| <status> | `code` | ... |` of the doc's error table."""
    return set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", doc, flags=re.M))


def _strings(node: ast.AST, scopes: list[ast.AST], seen: set[str]) -> Iterator[str]:
    """Every string constant an expression can evaluate from, following plain names to their
    assignments in the enclosing function, then the module (`code = TABLE.get(s, "error")`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
        return
    if isinstance(node, ast.Name):
        if node.id in seen:
            return
        seen.add(node.id)
        for scope in scopes:
            values = [n.value for n in ast.walk(scope) if isinstance(n, (ast.Assign, ast.AnnAssign))
                      and n.value is not None and any(isinstance(t, ast.Name) and t.id == node.id
                                                      for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
            if values:
                for value in values:
                    yield from _strings(value, scopes, seen)
                return
        return
    for child in ast.iter_child_nodes(node):
        yield from _strings(child, scopes, seen)


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def code_literals(sources: Mapping[str, str]) -> dict[str, list[str]]:
    """{code: [file:line, ...]} of every code the sources can give an error answer: the code
    argument of ApiError / envelope / ImageError calls, and the default of a `code` parameter."""
    found: dict[str, list[str]] = {}
    for path, text in sources.items():
        tree = ast.parse(text)
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

        def scopes_of(node: ast.AST) -> list[ast.AST]:
            chain = []
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    chain.append(node)
            return chain + [tree]

        for node in ast.walk(tree):
            exprs: list[ast.AST] = []
            if isinstance(node, ast.Call) and _callee(node) in CODE_ARGS:
                index = CODE_ARGS[_callee(node)]  # type: ignore[index]
                if len(node.args) > index:
                    exprs.append(node.args[index])
                exprs += [k.value for k in node.keywords if k.arg == "code"]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                    + list(node.args.kw_defaults)
                exprs += [d for a, d in zip(args, defaults) if a.arg == "code" and d is not None]
            for expr in exprs:
                for code in _strings(expr, scopes_of(expr), set()):
                    found.setdefault(code, []).append(f"{path}:{getattr(expr, 'lineno', '?')}")
    return found


def service_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted((ROOT / "service").rglob("*.py"))}


def error_code_problems(literals: Mapping[str, list[str]], registry: frozenset[str], doc: str) -> list[str]:
    """Codes used but not registered, registered but never used, registered but not documented,
    documented but not registered."""
    documented = documented_codes(doc)
    problems = [f"{code} (at {', '.join(at)}) is not in service.server.errors.ERROR_CODES"
                for code, at in sorted(literals.items()) if code not in registry]
    problems += [f"{code} is in ERROR_CODES but nothing in service/ answers it" for code in sorted(registry - set(literals))]
    problems += [f"{code} is not in docs/api.md's error table (a row `| <status> | `{code}` | <cause> |`)"
                 for code in sorted(registry - documented)]
    problems += [f"{code} is in docs/api.md's error table but not in ERROR_CODES" for code in sorted(documented - registry)]
    return problems
