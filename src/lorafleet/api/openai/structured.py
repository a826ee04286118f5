"""Structured output requests: OpenAI's `response_format` and vLLM's `guided_*` /
`structured_outputs` fields -> one engine `GrammarSpec` (engine/grammar.py)."""

from __future__ import annotations

import json
from typing import Any

from lorafleet.engine.grammar import GrammarSpec
from lorafleet.errors import InvalidRequest

# vLLM's structured_outputs keys -> the older guided_* field they replaced
_STRUCTURED_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                    "grammar": "guided_grammar", "json_object": None}
_UNSUPPORTED = ("whitespace_pattern", "structural_tag")


def grammar_spec(req) -> GrammarSpec | None:
    """The one constraint `req` asks for (None: free text); a 400 names what is wrong."""
    asked: list[tuple[str, GrammarSpec]] = []
    fmt = req.response_format
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            asked.append(("response_format", spec))
    for field in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(req, field)
        if value is not None:
            asked.append((field, _guided(field, value)))
    for field in ("guided_whitespace_pattern", "guided_decoding_backend", "structural_tag"):
        if getattr(req, field, None) is not None:
            raise InvalidRequest(f"{field} is not supported by this server (leave it unset)")
    so = req.structured_outputs
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequest("structured_outputs must be an object")
        bad = [k for k in so if k not in _STRUCTURED_KEYS and so[k] is not None]
        if bad:
            what = "not supported by this server" if all(k in _UNSUPPORTED for k in bad) else "unknown"
            raise InvalidRequest(f"structured_outputs: {', '.join(sorted(bad))}: {what}")
        for key, field in _STRUCTURED_KEYS.items():
            value = so.get(key)
            if key == "json_object":
                if value:
                    asked.append(("structured_outputs.json_object", _json_object()))
            elif value is not None:
                asked.append((f"structured_outputs.{key}", _guided(field, value)))  # type: ignore[arg-type]
    if len(asked) > 1:
        raise InvalidRequest(f"at most one structured output constraint per request, got "
                             f"{', '.join(name for name, _ in asked)}")
    if asked and req.stop:
        raise InvalidRequest(f"stop cannot be combined with {asked[0][0]}: a stop string would cut "
                             f"the structured output")
    return asked[0][1] if asked else None


def _json_object() -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps({"type": "object"}))


def _response_format(fmt: Any) -> GrammarSpec | None:
    if not isinstance(fmt, dict):
        raise InvalidRequest("response_format must be an object with a type")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_object()
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise InvalidRequest("response_format json_schema needs json_schema.schema (a JSON schema object)")
        return GrammarSpec("json_schema", json.dumps(js["schema"]), strict=bool(js.get("strict")))
    raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


def _guided(field: str, value: Any) -> GrammarSpec:
    if field == "guided_json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequest(f"{field} is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"{field} must be a JSON schema object")
        return GrammarSpec("json_schema", json.dumps(value), strict=False)
    if field == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest(f"{field} must be a non-empty list of non-empty strings")
        return GrammarSpec("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty string")
    return GrammarSpec("regex" if field == "guided_regex" else "grammar", value)
