"""vLLM's runtime LoRA routes (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): register and drop adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from lorafleet.errors import IncompatibleAdapter, Unavailable


class VllmClient:
    """`load_adapter` / `unload_adapter` against the server whose base URL `url()` gives
    (it raises Unavailable while vLLM restarts)."""

    def __init__(self, url: Callable[[], str], timeout_s: float = 120.0) -> None:
        self.url = url
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))

    def load_adapter(self, name: str, folder: Path) -> None:
        """Register a PEFT folder as `name` (loading one already loaded is a no-op)."""
        r = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if r.status_code == 200 or (r.status_code == 400 and "already been loaded" in r.text):
            return
        raise IncompatibleAdapter(f"vLLM refused adapter {name}: {_message(r)}")

    def unload_adapter(self, name: str) -> None:
        """Drop `name` (one vLLM does not know, e.g. after a restart, is a no-op)."""
        r = self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if r.status_code not in (200, 404):
            raise RuntimeError(f"vLLM could not unload {name}: {_message(r)}")

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return self._http.post(self.url() + path, json=body)
        except httpx.TransportError as e:
            raise Unavailable(f"the vLLM sampler is unreachable ({type(e).__name__}); retry shortly", 5.0) from e


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return f"{r.status_code} {r.text[:300]}"


__all__ = ["VllmClient"]
