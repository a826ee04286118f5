"""Value checks shared by every API (/api/v1, /v1, /catalog/v1), applied once at the edge.

- Numbers must be finite: a NaN or infinite hyper-parameter silently turns a run's weights
  non-finite, and a stored NaN is invalid JSON that clients cannot decode.
- Strings must not contain NUL (\\x00): PostgreSQL refuses it in text (a 500 deep in the
  database layer), so it is refused here with a 400 on every backend.

`Checked` is the base of the pydantic request models (typed floats reject NaN/inf, and any
untyped JSON inside them is walked); `check_json` walks a parsed JSON document;
`refuse_nul_params` is a router dependency for path and query parameters.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, model_validator

from lorafleet.errors import InvalidRequest


def check_json(value: Any, where: str = "body") -> None:
    """Refuse non-finite numbers and strings with NUL anywhere in a parsed JSON value."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            check_text(v, at)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise InvalidRequest(f"{at}: {v} is not a finite number")
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str):
                    check_text(k, f"{at} key {k[:40]!r}")
                stack.append((item, f"{at}.{k}"))
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))


def check_text(s: str, where: str) -> str:
    if "\x00" in s:
        raise InvalidRequest(f"{where}: text may not contain NUL (\\x00) characters")
    return s


def finite(x: float, where: str) -> float:
    if not math.isfinite(x):
        raise InvalidRequest(f"{where}: {x} is not a finite number")
    return x


class Checked(BaseModel):
    """Base of request models: floats must be finite, no string anywhere may hold NUL."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _checked_values(cls, data: Any) -> Any:
        check_json(data, cls.__name__)  # an InvalidRequest is a ValueError: pydantic reports it
        return data


async def refuse_nul_params(request: Request) -> None:
    """Router dependency: path and query parameters must not contain NUL."""
    for k, v in request.path_params.items():
        if isinstance(v, str):
            check_text(v, f"path parameter {k}")
    for k, v in request.query_params.multi_items():
        check_text(k, "query parameter name")
        check_text(v, f"query parameter {k}")
