"""Input checks of the catalog's use cases: pure, raising InvalidRequest / Conflict /
IncompatibleAdapter with a message naming what is wrong."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from lorafleet.catalog.records import Evaluation, LoraConfig, Policy, RevisionKind
from lorafleet.catalog.refs import Gate, parse_tinker_path
from lorafleet.errors import Conflict, IncompatibleAdapter, InvalidRequest, NotFound
from lorafleet.lora.spec import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer_state.safetensors"  # required in kind=state revisions
MAX_PAGE = 1000


def lora_config(lora: LoraConfig | LoraSpec) -> LoraConfig:
    if isinstance(lora, LoraSpec):
        return LoraConfig(lora.rank, lora.alpha, lora.target_modules, lora.use_rslora)
    spec = LoraSpec(lora.rank, lora.alpha, tuple(lora.target_modules), lora.use_rslora)  # validates
    return LoraConfig(spec.rank, spec.alpha, spec.target_modules, spec.use_rslora)


def revision_kind(kind: RevisionKind | str) -> RevisionKind:
    try:
        return RevisionKind(kind)
    except ValueError:
        raise InvalidRequest(f"invalid revision kind {kind!r}: 'sampler' or 'state'") from None


def check_files(p: Policy, kind: RevisionKind, files: Mapping[str, bytes]) -> None:
    """Both PEFT files must be there, and the config must match the policy's LoRA shape."""
    need = {CONFIG_FILE, WEIGHTS_FILE} | ({OPTIMIZER_FILE} if kind is RevisionKind.STATE else set())
    missing = sorted(need - set(files))
    if missing:
        raise InvalidRequest(f"a {kind} revision needs files {sorted(need)}; missing {missing}")
    try:
        config = json.loads(files[CONFIG_FILE])
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise IncompatibleAdapter(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    spec = LoraSpec.from_peft_config(config)
    got = (spec.rank, spec.target_modules, spec.alpha, spec.use_rslora)
    want = (p.lora.rank, p.lora.target_modules, p.lora.alpha, p.lora.use_rslora)
    if got != want:
        raise IncompatibleAdapter(
            f"{CONFIG_FILE} (rank, targets, alpha, rslora) = {got} does not match policy "
            f"{p.full_name}: {want}"
        )


def run_path(p: Policy, tinker_path: str) -> str:
    """A revision may carry a tinker path only of the run its policy records: a tenant cannot
    claim another's paths. Answered like a missing run, so it never confirms one exists."""
    run = parse_tinker_path(tinker_path).model_id
    if p.tinker_run_id != run:
        raise NotFound(f"no training run {run!r} publishes into policy {p.full_name}")
    return tinker_path


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or len(k) > 128 or len(v) > 1024:
            raise InvalidRequest(f"metadata must map names (<=128 chars) to strings (<=1024): {k!r}")
        if "\x00" in k or "\x00" in v:
            raise InvalidRequest(f"metadata {k!r}: text may not contain NUL (\\x00) characters")
    return dict(metadata)


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidRequest(f"metric {k!r} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    if not out:
        raise InvalidRequest("an evaluation needs at least one metric")
    return out


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be in 1..{MAX_PAGE}, got {limit}")
    return limit


def int_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        value = int(cursor)
    except ValueError:
        raise InvalidRequest(f"invalid cursor {cursor!r}") from None
    if not 0 <= value < 1 << 63:  # a database integer: larger values overflow the driver
        raise InvalidRequest(f"invalid cursor {cursor!r}: out of range")
    return value


def check_gate(gate: Gate, rid: str, evals: list[Evaluation]) -> None:
    seen = [e.metrics[gate.metric] for e in evals if gate.metric in e.metrics]
    if not seen:
        raise Conflict(f"gate {gate}: revision {rid} has no evaluation with metric {gate.metric!r}")
    if not any(gate.passes(v) for v in seen):
        raise Conflict(f"gate {gate}: revision {rid} scored {seen} on {gate.metric!r}")
