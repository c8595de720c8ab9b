"""The settings reference (docs/settings.md), generated from `Settings` so it cannot drift.

    python -m service.server.settings_doc --write     # regenerate docs/settings.md
    python -m service.server.settings_doc --check     # exit 1 when docs/settings.md is stale

Every field of `service.server.settings.Settings` becomes one row: its `DAPO_*` name, its
default as the environment would spell it, and what it does. What it does is the field's
`description` when it has one, else the comment written beside or above the field in
settings.py (that file's comments are the one place the knobs are explained, so they are read
rather than copied). The `# --- section ---` comments of the class become the table's sections.
tests/test_docs_drift.py fails when the file differs from what this module writes now.
"""
from __future__ import annotations

import argparse
import ast
import enum
import inspect
import json
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from service.server.settings import Settings

DOC = Path("docs/settings.md")
COMMAND = "python -m service.server.settings_doc --write"
HEADER = f"""# Settings

Every knob of `dapo serve` is a `DAPO_*` environment variable (or a line of an `.env` file
beside `docker-compose.yml`). This page is **generated** from `service/server/settings.py`
by `{COMMAND}`; `tests/test_docs_drift.py` fails when it is out of date.
Lists take a comma-separated string (`DAPO_PROVIDERS=CUDA,CPU`) or a JSON list; an empty
value of an optional path or URL means unset. How the knobs fit together: [Operations](operations.md).
"""

# What a field does when settings.py says it neither in a `description=` nor in a comment. A new
# setting belongs in settings.py with `Field(description=...)`; this table only covers fields
# written before the docs were generated, and the drift test refuses entries for fields that
# no longer exist.
NOTES: dict[str, str] = {
    "artifact": "the artifact folder to serve (a relative path is taken from the working directory)",
    "trt_cache_dir": "where TensorRT keeps built engines (one folder per graph sha256); mount a volume, "
                     "or every new container rebuilds them",
    "warmup": "run a batch at size 1 and at the maximum batch size before reporting ready "
              "(first-call costs paid before traffic)",
    "max_batch_size": "images per model call",
    "max_queue_delay_ms": "how long the oldest waiting image may wait for company",
    "retry_after_s": "the `Retry-After` seconds of every 503",
    "max_body_bytes": "the whole request body, checked while it streams (413 `payload_too_large`)",
    "max_files": "images per /detect request (413 `too_many_files`); at most `DAPO_MAX_QUEUE_SIZE`",
    "max_pixels": "pixels per image, checked from its header before decoding (413 `image_too_large`)",
    "max_side": "width or height of an image, checked from its header (413 `image_too_large`)",
    "mqtt_username": "MQTT user name",
    "mqtt_password": "MQTT password (prefer `DAPO_MQTT_PASSWORD_FILE`)",
    "mqtt_password_file": "a file holding the MQTT password",
    "mqtt_key_file": "mqtts: the client certificate's private key",
    "mqtt_keepalive_s": "MQTT keep-alive interval",
    "mqtt_reconnect_max_s": "longest wait between two reconnect attempts to the broker",
    "mqtt_rate_per_s": "results published per second at most",
    "webhook_secret_file": "a file holding the webhook HMAC key",
    "webhook_timeout_s": "one POST's timeout",
    "webhook_queue_size": "results waiting; beyond it the oldest is dropped",
    "webhook_rate_per_s": "results posted per second at most",
    "sink_backoff_max_s": "longest retry delay of a sink",
    "samples_policy": "rules per product (`*` for the others), JSON or the path of a JSON file: "
                      "`{\"disc\": [{\"kind\": \"near_threshold\", \"band\": 0.05, \"cap\": 500}]}`; "
                      "kinds `every_nth`, `near_threshold`, `anomalous`, `all`",
    "samples_queue_size": "samples waiting for the writer thread; beyond it they are dropped and counted",
    "api_keys": "keys a caller may send in `X-API-Key` (comma list); none = auth off",
    "api_keys_file": "a file of keys, one per line (`#` comments)",
    "admin_keys_file": "a file of admin keys, one per line",
    "idempotency_ttl_s": "how long a stored answer is replayed for a repeated `Idempotency-Key`",
    "idempotency_max_entries": "stored answers kept at most (oldest evicted first)",
    "host": "the address `dapo serve` binds (0.0.0.0 in the container images)",
    "port": "the port `dapo serve` listens on",
}


@dataclass(frozen=True)
class Row:
    section: str
    env: str
    default: str
    what: str


def env_name(field: str) -> str:
    """The environment variable of a field (Settings' env_prefix + the upper-cased name)."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def render_default(value: Any) -> str:
    """A default as one would write it in the environment."""
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple, dict)):
        if not value:
            return "empty"
        return json.dumps(jsonable(value))
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    return str(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fields_of(settings_cls: type | None = None) -> dict[str, Any]:
    return (settings_cls or Settings).model_fields


def source_notes(settings_cls: type | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """From the class's source (and its bases'): {field: its comment} and {field: its section}."""
    comments: dict[str, str] = {}
    sections: dict[str, str] = {}
    for cls in reversed((settings_cls or Settings).__mro__):
        if cls is Settings or (isinstance(cls, type) and issubclass(cls, Settings)):
            c, s = class_notes(cls)
            comments.update(c)
            sections.update(s)
    return comments, sections


def class_notes(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """The comments beside or above each field of one class body, and the `# --- x ---` section
    each field sits in."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    lines = source.splitlines()
    node_cls = ast.parse(source).body[0]
    assert isinstance(node_cls, ast.ClassDef)
    comments: dict[str, str] = {}
    sections: dict[str, str] = {}
    section = "general"
    previous_end = node_cls.lineno
    for node in node_cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = node.end_lineno or node.lineno
            continue
        above: list[str] = []
        for raw in lines[previous_end:node.lineno - 1]:  # comment lines between the previous statement and this field
            text = raw.strip()
            if text.startswith("# ---"):
                section = text.strip("# -").strip()
                above = []
            elif text.startswith("#"):
                above.append(text.lstrip("#").strip())
            elif not text:
                above = []
        last = lines[(node.end_lineno or node.lineno) - 1]
        inline = last.split("  # ", 1)[1].strip() if "  # " in last else ""
        comments[node.target.id] = " ".join(part for part in (" ".join(above), inline) if part)
        sections[node.target.id] = section
        previous_end = node.end_lineno or node.lineno
    return comments, sections


def bounds(field: Any) -> str:
    """'1..256', '>= 0', '> 0' from the field's constraints."""
    lo = hi = None
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(m, attr, None) is not None:
                lo = (sign, getattr(m, attr))
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                hi = (sign, getattr(m, attr))
    if lo and hi and lo[0] == ">=" and hi[0] == "<=":
        return f"{lo[1]}..{hi[1]}"
    return ", ".join(f"{b[0]} {b[1]}" for b in (lo, hi) if b)


def choices(field: Any) -> str:
    """'`a` / `b`' for a Literal field."""
    if typing.get_origin(field.annotation) is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(field.annotation))
    return ""


def rows(settings_cls: type | None = None) -> list[Row]:
    """One row per field of `settings_cls` (default: Settings), in declaration order."""
    comments, sections = source_notes(settings_cls)
    out = []
    for name, field in fields_of(settings_cls).items():
        what = field.description or comments.get(name) or NOTES.get(name, "")
        extra = "; ".join(x for x in (choices(field), bounds(field)) if x)
        if extra:
            what = f"{what} ({extra})" if what else extra
        out.append(Row(sections.get(name, "general"), env_name(name), render_default(field.get_default(
            call_default_factory=True)), what))
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(settings_cls: type | None = None) -> str:
    """docs/settings.md as it must be now."""
    parts = [HEADER]
    by_section: dict[str, list[Row]] = {}
    for row in rows(settings_cls):
        by_section.setdefault(row.section, []).append(row)
    for section, section_rows in by_section.items():
        parts.append(f"\n## {section[:1].upper()}{section[1:]}\n\n<!-- table: settings -->\n"
                     "| setting | default | what it does |\n|---|---|---|\n")
        parts.append("".join(f"| `{r.env}` | `{cell(r.default)}` | {cell(r.what)} |\n" for r in section_rows))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC}")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {DOC} is not current")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(fields_of())} settings)")
    elif args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
