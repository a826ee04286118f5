"""REST queries of the Tinker API: capabilities, training runs, checkpoints, sessions.

A mixin of `TinkerService` (its state lives there); synchronous JSON answers shaped like the
SDK's pydantic types (`TrainingRun`, `Checkpoint`, `Cursor`, ...).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lorafleet.api.tinker.checkpoints import KIND_SEGMENT, parse_path


class RestQueries:
    """Listings and checkpoint management for one tenant at a time."""

    def capabilities(self) -> dict[str, Any]:
        """The SDK's fields per base, plus what the base is (architecture, size, LoRA targets, digest)."""
        from lorafleet.model.registry import describe_loaded

        return {"supported_models": [
            {"model_name": name, "max_context_length": r.base.info.max_context,
             "trainable": True, "sampleable": True}
            | {k: v for k, v in describe_loaded(r.base).items() if k != "name"}
            for name, r in self.runners.items()
        ]}

    def training_runs(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        rows, total = self.repo.runs(tenant, limit, offset)
        return {"training_runs": [self._run_json(r) for r in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    def training_run(self, tenant: str, model_id: str) -> dict[str, Any]:
        return self._run_json(self.run_row(tenant, model_id))

    def _run_json(self, row: dict[str, Any]) -> dict[str, Any]:
        ckpts = self.checkpoints.list(row["tenant"], row["model_id"])
        last = {k: next((c for c in reversed(ckpts) if c["kind"] == k), None)
                for k in ("training", "sampler")}
        return {
            "training_run_id": row["model_id"], "base_model": row["base_model"],
            "model_owner": row["tenant"], "is_lora": True, "corrupted": bool(row["corrupted"]),
            "lora_rank": row["lora"].get("rank"),
            "last_request_time": _iso(row["last_request"]),
            "last_checkpoint": last["training"] and checkpoint_json(last["training"]),
            "last_sampler_checkpoint": last["sampler"] and checkpoint_json(last["sampler"]),
            "user_metadata": row["user_metadata"] or None,
        }

    def list_checkpoints(self, tenant: str, model_id: str | None, limit: int = 1000,
                         offset: int = 0, kinds: set[str] | None = None) -> dict[str, Any]:
        if model_id is not None:
            self.run_row(tenant, model_id)
        rows = [r for r in self.checkpoints.list(tenant, model_id)
                if kinds is None or r["kind"] in kinds]
        page = rows[offset: offset + limit]
        return {"checkpoints": [checkpoint_json(r) for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)}}

    def delete_checkpoint(self, tenant: str, path: str) -> None:
        self.checkpoints.delete(tenant, path)
        if self.catalog is not None:
            self.catalog.delete(tenant, path)

    def checkpoint_path(self, model_id: str, checkpoint_id: str) -> str:
        return str(parse_path(f"tinker://{model_id}/{checkpoint_id}"))

    def weights_info(self, tenant: str, tinker_path: str) -> dict[str, Any]:
        row = self.find_checkpoint(tenant, parse_path(tinker_path))
        flags = (row.get("meta") or {}).get("lora_flags") or {}
        return {
            "base_model": (row.get("meta") or {}).get("base_model"), "is_lora": True,
            "lora_rank": flags.get("rank"), "train_unembed": bool(flags.get("train_unembed")),
            "train_mlp": flags.get("train_mlp"), "train_attn": flags.get("train_attn"),
            "optimizer_config": {"type": "adamw"},
        }

    def sessions(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        return {"sessions": self.repo.sessions(tenant, limit, offset)}

    def session(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.session_row(tenant, session_id)
        runs, samplers = self.repo.ids_of_session(session_id)
        return {"training_run_ids": runs, "sampler_ids": samplers,
                "user_metadata": {k: str(v) for k, v in (row["user_metadata"] or {}).items()} or None,
                "display_name": row["display_name"]}


def checkpoint_json(row: dict[str, Any]) -> dict[str, Any]:
    return {  # from the row's columns: a row older than the path checks still lists
        "checkpoint_id": f"{KIND_SEGMENT[row['kind']]}/{row['name']}", "checkpoint_type": row["kind"],
        "time": _iso(row["created"]), "tinker_path": row["tinker_path"],
        "size_bytes": row["size_bytes"], "public": bool(row["public"]),
        "user_metadata": row["user_metadata"],
        "expires_at": _iso(row["expires_at"]) if row["expires_at"] else None,
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()
