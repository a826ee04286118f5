"""Tool calls: `tools` rendered through the base's chat template, calls parsed back from the text.

A base supports tools when its chat template renders the `tools` it is given and writes calls
in the Hermes / Qwen2.5 format, one per block:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice` "required" or a named function is enforced with a grammar (engine/grammar.py):
the completion is then exactly such blocks, with `arguments` valid for the function's
`parameters` schema. "auto" lets the model choose (calls are parsed if it wrote any); "none"
renders the tools but parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.grammar import JSON_OPTIONS, GrammarSpec
from lorafleet.errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_PROBE = {"type": "function", "function": {"name": "lorafleet_probe_tool", "description": "probe",
                                           "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for sampling and for its response."""

    tools: list[dict[str, Any]]  # as the template gets them
    parse: bool  # parse calls out of the completion ("none": no)
    grammar: GrammarSpec | None  # "required" / a named function: the calls are enforced


_SUPPORT: dict[tuple[int, str], bool] = {}  # (tokenizer, template) -> whether it supports tools


def template_supports_tools(tokenizer) -> bool:
    """The chat template renders the tools it is given and writes Hermes-style call blocks."""
    template = getattr(tokenizer, "chat_template", None)
    key = (id(tokenizer), str(template))
    if key not in _SUPPORT:
        _SUPPORT[key] = _supports(tokenizer, template)
    return _SUPPORT[key]


def _supports(tokenizer, template) -> bool:
    if not isinstance(template, str) or OPEN not in template:
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[_PROBE],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on tools does not support them
        return False
    return "lorafleet_probe_tool" in text


def plan(tokenizer, base: str, tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` for this base (400 where its template has no tool support)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice required / a named function needs tools")
        return None
    if not template_supports_tools(tokenizer):
        raise InvalidRequest(
            f"tools: the chat template of {base} has no tool support (it must render `tools` and "
            f"write calls as {OPEN}{{json}}{CLOSE}); leave tools unset for this base"
        )
    funcs = [t.function for t in tools]
    names = [f.name for f in funcs]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique")
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("auto", "none"):
        return ToolPlan(rendered, choice == "auto", None)
    if choice == "required":
        chosen = funcs
    else:  # {"type": "function", "function": {"name": ...}} (the wire model checked its shape)
        name = choice.function.name
        chosen = [f for f in funcs if f.name == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})")
    many = choice == "required" and parallel is not False
    return ToolPlan(rendered, True, _calls_grammar(chosen, many))


def _calls_grammar(funcs, many: bool) -> GrammarSpec:
    """Lark: one call block (or, with `many`, one or more) whose JSON is one of `funcs`' calls."""
    variants = [{"type": "object", "properties": {"name": {"const": f.name},
                                                  "arguments": f.parameters or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in funcs]
    schema = {"x-guidance": JSON_OPTIONS, **(variants[0] if len(variants) == 1 else {"anyOf": variants})}
    block = f'call: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}'
    lark = ('start: call ("\\n" call)*\n' if many else "start: call\n") + block
    return GrammarSpec("lark", lark)


def messages_for_template(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages as templates expect them: tool-call arguments as objects (vLLM does the
    same), tool results with their call id."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequest("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        raise InvalidRequest("tool_calls: function.arguments must be JSON") from None
                calls.append({**c.model_dump(exclude_none=True), "function": {"name": c.function.name,
                                                                              "arguments": args}})
            msg["tool_calls"] = calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def split_calls(text: str) -> tuple[str, list[dict[str, Any]], str]:
    """(before, calls, after) of a completion: every well-formed call block becomes a call;
    `before` is the text up to the first of them, `after` the text outside them after it.
    Malformed blocks stay text."""
    calls: list[dict[str, Any]] = []
    parts: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        parts.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args)}})
    if not calls:
        return text, [], ""
    return parts[0], calls, "".join(parts[1:]) + text[pos:]


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls): the text outside the call blocks (None if blank) and the calls."""
    before, calls, after = split_calls(text)
    content = (before + after).strip() if calls else text
    return (content or None), calls
