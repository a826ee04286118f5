"""GET /admin/v1/engines: one record per engine, for operators (docs/scale-out.md).

`id`, `base`, `pid`, `node`, `alive`, `queue_depth`, `resident` (adapter keys in its slots),
`runs` (training runs placed there), `restarts` (deaths seen). With Ray engines
(`serve --engines N`), one per actor; in-process, one per base (pid: this process). Admin only
(the admin key, or any key with `--auth none`): it names adapters and runs of every tenant.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from lorafleet.api.auth import require_admin
from lorafleet.catalog.records import Principal

router = APIRouter(prefix="/admin/v1", tags=["operations"])


@router.get("/engines")
def engines(request: Request, _: Annotated[Principal, Depends(require_admin)]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, runner in sorted(request.app.state.tinker.runners.items()):
        if hasattr(runner, "engines"):  # a fleet of Ray engine actors (lorafleet/fleet/)
            out.extend(runner.engines())
            continue
        resident = sorted(map(str, runner.residency.keys()[0]))
        health = runner.health(float("inf"))
        out.append({"id": f"{name}#local", "base": name, "pid": os.getpid(), "node": socket.gethostname(),
                    "alive": health["alive"], "queue_depth": len(runner.samples) + len(runner.decode.rows),
                    "resident": resident, "runs": sorted(runner.runs), "restarts": 0})
    return out
