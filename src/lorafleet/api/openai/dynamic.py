"""vLLM's dynamic LoRA use cases: `load_lora_adapter` imports a PEFT folder on the server's
disk into the catalog and pins it; `unload_lora_adapter` unpins and evicts it.

`lora_path` names a folder on the server machine, so it is confined: loading from paths is off
unless `serve --lora-root DIR` names the folders it may read (like vLLM, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`). The folder and every file read from it must resolve
(symbolic links followed) inside one root; anything else is a 403 that names the roots. The
folder then passes the same checks as `lorafleet adapters import` (PEFT config, shapes against
the base, canonical re-serialization) and becomes a new revision of its policy.

Names: a `lora_name` without an owner (`sql-lora`, as vLLM clients name adapters) is the
caller's own policy `<tenant>/sql-lora`, which `model="sql-lora"` then resolves to (see
service.own_ref); such a policy is created with metadata `vllm.lora_name`, so `/v1/models`
lists it under the name the client loaded. An `owner/name` is used as is (the caller must own
it). Unloading never deletes a revision: the catalog keeps it, the slot and host copies go.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lorafleet.api.openai.service import OpenAIService, own_ref
from lorafleet.catalog.records import Principal
from lorafleet.catalog.refs import parse_policy_name
from lorafleet.errors import IncompatibleAdapter, InvalidRequest, NotFound, PathNotAllowed

LORA_NAME_KEY = "vllm.lora_name"  # policy metadata: the bare name a client loaded it as
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MAX_ADAPTER_BYTES = 4 << 30


@dataclass(frozen=True, slots=True)
class Loaded:
    policy: str  # owner/name
    revision_id: str
    base: str


def confine(lora_path: str, roots: tuple[Path, ...]) -> Path:
    """The resolved folder `lora_path` names, refused unless it and the PEFT files in it lie
    inside one of `roots` (links followed)."""
    if not roots:
        raise PathNotAllowed("loading adapters from server paths is off: start the server with "
                             "`lorafleet serve --lora-root DIR` to allow folders under DIR")
    if not lora_path or "\x00" in lora_path:
        raise InvalidRequest("lora_path must be a non-empty path")
    path = Path(lora_path)
    if not path.is_absolute():
        raise InvalidRequest(f"lora_path {lora_path!r} must be an absolute path")
    allowed = [r.resolve() for r in roots]
    real = path.resolve()
    root = next((r for r in allowed if real == r or real.is_relative_to(r)), None)
    if root is None:
        raise PathNotAllowed(f"lora_path {lora_path!r} is outside the folders this server may read "
                             f"({', '.join(map(str, allowed))}; serve --lora-root)")
    if not real.is_dir():
        raise NotFound(f"No adapter found at {lora_path!r}: not a folder")
    for name in PEFT_FILES:
        f = real / name
        if not f.exists() and not f.is_symlink():
            continue
        target = f.resolve()
        if not target.is_relative_to(root):
            raise PathNotAllowed(f"{lora_path}/{name} links outside {root}")
        if not target.is_file():
            raise InvalidRequest(f"{lora_path}/{name} is not a regular file")
        if target.stat().st_size > MAX_ADAPTER_BYTES:
            raise InvalidRequest(f"{lora_path}/{name} is larger than {MAX_ADAPTER_BYTES} bytes")
    return real


class DynamicLoras:
    """The adapters loaded through the vLLM routes: (tenant, policy) -> the pinned revision."""

    def __init__(self, svc: OpenAIService, roots: tuple[Path, ...]) -> None:
        self.svc = svc
        self.roots = tuple(roots)
        self._loaded: dict[tuple[str, str], Loaded] = {}
        self._lock = threading.Lock()

    def policy_name(self, lora_name: str, who: Principal) -> str:
        if not lora_name or lora_name.strip() != lora_name:
            raise InvalidRequest("lora_name must be a non-empty name without surrounding spaces")
        name = own_ref(lora_name, who)
        owner, _ = parse_policy_name(name)  # a malformed name is a 400 naming the rule
        if not who.can_write(owner):  # the same answer whether or not it exists
            raise InvalidRequest(f"tenant {who.tenant!r} cannot load adapters as {owner!r}: use a "
                                 f"bare name or {who.tenant}/<name>")
        return name

    def load(self, who: Principal, lora_name: str, lora_path: str, *, inplace: bool = False,
             base_model: str | None = None) -> Loaded:
        """Blocking (a worker thread): import the folder as a new revision and pin it."""
        from lorafleet.catalog.peft import load_peft_dir
        from lorafleet.model.registry import base_digest

        name = self.policy_name(lora_name, who)
        key = (who.tenant, name)
        with self._lock:
            if key in self._loaded and not inplace:
                raise InvalidRequest(f"The lora adapter '{lora_name}' has already been loaded "
                                     "(load_inplace: true replaces it)")
        folder = confine(lora_path, self.roots)
        if base_model is not None and base_model not in self.svc.runners:
            raise NotFound(f"base_model_name {base_model!r} is not served here "
                           f"(serving: {sorted(self.svc.runners)})")
        adapter = load_peft_dir(folder, base_model)
        if adapter.base_model not in self.svc.runners:
            raise IncompatibleAdapter(f"{lora_path} is an adapter for {adapter.base_model}, which this "
                                      f"server does not serve (serving: {sorted(self.svc.runners)})")
        catalog = self.svc.catalog
        try:
            policy = catalog.get_policy(who, name)
        except NotFound:
            bare = {LORA_NAME_KEY: lora_name} if "/" not in lora_name else {}
            policy = catalog.create_policy(who, name, adapter.base_model, adapter.spec, metadata=bare,
                                           base_digest=base_digest(adapter.base_model))
        if policy.base_model != adapter.base_model:
            raise IncompatibleAdapter(f"{lora_path} is an adapter for {adapter.base_model}; {name} is "
                                      f"on {policy.base_model}")
        rev = catalog.publish(who, name, adapter.files, reason="load_lora_adapter")
        self.svc.pin(rev.id, who)  # loads it now: a bad adapter fails here, not at first use
        loaded = Loaded(name, rev.id, adapter.base_model)
        with self._lock:
            old = self._loaded.get(key)
            self._loaded[key] = loaded
        if old is not None:
            self._drop(old, who)
        return loaded

    def unload(self, who: Principal, lora_name: str) -> Loaded:
        """Unpin and evict what `load` pinned under this name; the revision stays."""
        name = own_ref(lora_name or "", who)
        with self._lock:
            loaded = self._loaded.pop((who.tenant, name), None)
        if loaded is None:
            raise NotFound(f"The lora adapter '{lora_name}' cannot be found.")
        self._drop(loaded, who)
        return loaded

    def _drop(self, loaded: Loaded, who: Principal) -> None:
        residency = self.svc.runners[loaded.base].residency
        residency.unpin(loaded.revision_id)
        residency.evict(loaded.revision_id)
