"""Catalog commands: `adapters` (import, export, rename, ...), `alias`, `rollback`, `eval`,
`lineage`, `gc`, `fsck`, `keys`, `tenants`, `audit`.

`fsck` also checks the Tinker service's checkpoint rows against their folders on disk.

Settings come from the environment here, at the edge (`LORAFLEET_HOME`,
`LORAFLEET_DATABASE_URL`, `LORAFLEET_STORE_URL`); the local CLI acts as the admin principal.
Human-readable tables by default; `--json` prints one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from lorafleet.catalog.records import ADMIN
from lorafleet.catalog.service import Catalog
from lorafleet.config import paths_from_env
from lorafleet.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    adapters = sub.add_parser("adapters", help="import, list, show and delete adapters").add_subparsers(dest="action", required=True)
    p = _cmd(adapters, "import", _import, "publish a PEFT LoRA folder as a new revision")
    p.add_argument("peft_dir")
    p.add_argument("--name", required=True, help="owner/name (created if missing)")
    p.add_argument("--alias", action="append", default=[], help="move this alias to it (repeatable)")
    p.add_argument("--public", action="store_true", help="visible to every tenant (new policies)")
    p.add_argument("--base", help="the base model it was trained on (default: the folder's "
                                  "base_model_name_or_path, often a local path)")
    p = _cmd(adapters, "export", _export, "write a revision as a PEFT folder (PeftModel.from_pretrained loads it)")
    p.add_argument("ref", help="owner/name, owner/name:alias, owner/name@rev, tinker://...")
    p.add_argument("dir", help="folder to create (must be empty or missing)")
    p = _cmd(adapters, "rename", _rename, "give a policy a new owner/name (revisions and aliases stay)")
    p.add_argument("policy")
    p.add_argument("new_name")
    p = _cmd(adapters, "ls", _ls, "list policies")
    p.add_argument("--owner")
    p.add_argument("--base", help="base model name")
    p.add_argument("--meta", action="append", default=[], help="metadata KEY=VALUE filter")
    p.add_argument("--search", help="substring of the name")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--cursor")
    p = _cmd(adapters, "show", _show, "a policy, the revision a reference resolves to, its aliases")
    p.add_argument("ref")
    p = _cmd(adapters, "revisions", _revisions, "revisions of a policy, newest first")
    p.add_argument("policy")
    p.add_argument("--limit", type=int, default=50)
    p = _cmd(adapters, "visibility", _visibility, "make a policy public or private")
    p.add_argument("policy")
    p.add_argument("visibility", choices=["public", "private"])
    p = _cmd(adapters, "delete", _delete_policy, "soft-delete a policy (owner/name)")
    p.add_argument("policy")
    p = _cmd(adapters, "delete-revision", _delete_revision, "delete one revision (refused if aliased)")
    p.add_argument("ref")

    alias = sub.add_parser("alias", help="set, list and inspect aliases").add_subparsers(dest="action", required=True)
    p = _cmd(alias, "set", _alias_set, "point ALIAS of the policy at REF")
    p.add_argument("ref")
    p.add_argument("alias")
    p.add_argument("--require", help="gate, e.g. accuracy>=0.8 (an evaluation must pass it)")
    p.add_argument("--reason")
    p = _cmd(alias, "history", _alias_history, "every move of owner/name:ALIAS")
    p.add_argument("alias_ref")
    p = _cmd(alias, "ls", _alias_ls, "aliases of a policy")
    p.add_argument("policy")

    p = _cmd(sub, "rollback", _rollback, "move an alias back (to its previous target, or --to REF)")
    p.add_argument("alias_ref")
    p.add_argument("--to")
    p.add_argument("--reason")

    ev = sub.add_parser("eval", help="record, list and compare evaluations").add_subparsers(dest="action", required=True)
    p = _cmd(ev, "record", _eval_record, "record metrics of a revision")
    p.add_argument("ref")
    p.add_argument("--suite", required=True)
    p.add_argument("--metric", action="append", default=[], required=True, help="NAME=NUMBER (repeatable)")
    p = _cmd(ev, "ls", _eval_ls, "evaluations of a revision")
    p.add_argument("ref")
    p = _cmd(ev, "compare", _eval_compare, "metrics of two revisions side by side")
    p.add_argument("ref_a")
    p.add_argument("ref_b")

    p = _cmd(sub, "lineage", _lineage, "ancestors and descendants of a revision")
    p.add_argument("ref")
    p = _cmd(sub, "gc", _gc, "delete expired revisions and unreferenced blobs")
    p.add_argument("--grace-s", type=float, default=3600.0, help="keep unreferenced blobs younger than this")
    p = _cmd(sub, "fsck", _fsck, "verify every revision's and every Tinker checkpoint's blobs "
             "against their sha256")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the --state-dir of serve, checked for Tinker state of a server before "
                        "catalog migration 0004 (default: <lorafleet home>/tinker)")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    p = _cmd(keys, "create", _keys_create, "create an API key for a tenant (printed once)")
    p.add_argument("--tenant", required=True)
    for quota, what in (("runs", "training runs in open sessions"), ("queued", "Tinker requests pending"),
                        ("adapters", "catalog policies owned")):
        p.add_argument(f"--max-{quota}", type=int, default=None, metavar="N",
                       help=f"the tenant's quota: {what} (default: the server's)")
    p.add_argument("--label")
    p = _cmd(keys, "ls", _keys_ls, "list API keys (ids and prefixes, never secrets)")
    p.add_argument("--tenant", help="only this tenant's keys")
    p = _cmd(keys, "revoke", _keys_revoke, "revoke a key at once (idempotent)")
    p.add_argument("key", metavar="KEY_ID_OR_PREFIX", help="key_... or tml-... as `keys ls` shows it")

    tenants = sub.add_parser("tenants", help="list and delete tenants").add_subparsers(dest="action", required=True)
    _cmd(tenants, "ls", _tenants_ls, "list tenants")
    p = _cmd(tenants, "delete", _tenants_delete,
             "revoke every key of a tenant and mark it deleted (its data stays, for gc)")
    p.add_argument("tenant")

    p = _cmd(sub, "audit", _audit, "list the audit log (alias moves, rollbacks, deletions, keys), newest first")
    p.add_argument("--tenant", help="only events about this tenant's objects")
    p.add_argument("--limit", type=int, default=50)


def _cmd(sub: Any, name: str, fn: Callable[[Catalog, argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=lambda args: _run(fn, args))
    return p


def _run(fn: Callable[[Catalog, argparse.Namespace], Any], args: argparse.Namespace) -> int:
    paths = paths_from_env()
    cat = Catalog.open(paths.database_url, paths.store_url)
    try:
        result = fn(cat, args)
    finally:
        cat.close()
    if isinstance(result, int):
        return result
    data, table = result
    if args.json:
        print(json.dumps(_plain(data), indent=2, sort_keys=True))
    else:
        print(table)
    return 0


# ---- commands: each returns (json-able data, human text) -------------------------------


def _import(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    rev = cat.publish_peft_dir(ADMIN, a.peft_dir, a.name, public=a.public, aliases=a.alias, base_model=a.base)
    return rev, f"published {rev.policy} revision {rev.seq}: {rev.id} sha256 {rev.sha256[:12]}" + (
        f" (aliases: {', '.join(a.alias)})" if a.alias else "")


def _export(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    from lorafleet.catalog.validate import CONFIG_FILE, WEIGHTS_FILE

    rev = cat.resolve(a.ref, ADMIN)
    out = Path(a.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest(f"{out} exists and is not an empty folder")
    files = cat.read_files(ADMIN, rev.id)  # verified against the revision's sha256
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):  # not a state revision's optimizer file
            (tmp / name).write_bytes(files[name])
        os.replace(tmp, out)  # all files or none (a rename onto an empty folder is allowed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"revision": rev, "dir": str(out)}, f"wrote {rev.policy} revision {rev.seq} ({rev.id}) to {out}"


def _rename(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    p = cat.rename_policy(ADMIN, a.policy, a.new_name)
    return p, f"renamed {a.policy} to {p.full_name}"


def _ls(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    meta = dict(_kv(m, "--meta") for m in a.meta)
    page = cat.list_policies(ADMIN, owner=a.owner, base_model=a.base, metadata=meta,
                             query=a.search, limit=a.limit, cursor=a.cursor)
    rows = [[p.full_name, p.base_model, str(p.lora.rank), "public" if p.public else "private",
             p.created_at.strftime("%Y-%m-%d %H:%M")] for p in page.items]
    text = _table(["POLICY", "BASE", "RANK", "VISIBILITY", "CREATED"], rows)
    if page.next_cursor:
        text += f"\nmore: --cursor {page.next_cursor}"
    return {"items": page.items, "next_cursor": page.next_cursor}, text


def _show(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    rev = cat.resolve(a.ref, ADMIN)
    policy = cat.get_policy(ADMIN, rev.policy)
    aliases = cat.list_aliases(ADMIN, rev.policy)
    evals = cat.list_evaluations(ADMIN, rev.id)
    manifest = cat.manifest(ADMIN, rev.id)
    lines = [
        f"policy     {policy.full_name} ({'public' if policy.public else 'private'}), base {policy.base_model}",
        f"lora       rank {policy.lora.rank}, alpha {policy.lora.alpha:g}, targets {','.join(policy.lora.target_modules)}",
        f"revision   {rev.id} (#{rev.seq}, {rev.kind}, step {rev.step}), {rev.size_bytes} bytes",
        f"sha256     {rev.sha256}",
        f"parent     {rev.provenance.parent_revision_id or '-'}",
        f"created    {rev.created_at.isoformat()} by {rev.created_by}",
        "aliases    " + (", ".join(f"{x.name}->{x.revision_id}" for x in aliases) or "-"),
    ]
    lines += [f"file       {n} {b.size_bytes} bytes sha256 {b.sha256[:12]}" for n, b in manifest.files]
    lines += [f"eval       {e.suite}: " + ", ".join(f"{k}={v:g}" for k, v in e.metrics.items()) for e in evals]
    data = {"policy": policy, "revision": rev, "aliases": aliases, "evaluations": evals,
            "files": {n: dataclasses.asdict(b) for n, b in manifest.files}}
    return data, "\n".join(lines)


def _revisions(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    page = cat.list_revisions(ADMIN, a.policy, limit=a.limit)
    rows = [[str(r.seq), r.id, r.kind, str(r.step), r.sha256[:12], r.created_at.strftime("%Y-%m-%d %H:%M:%S")] for r in page.items]
    return page.items, _table(["#", "REVISION", "KIND", "STEP", "SHA256", "CREATED"], rows)


def _visibility(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    p = cat.set_public(ADMIN, a.policy, a.visibility == "public")
    return p, f"{p.full_name} is now {a.visibility}"


def _delete_policy(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    cat.delete_policy(ADMIN, a.policy)
    return {"deleted": a.policy}, f"deleted {a.policy}"


def _delete_revision(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    rev = cat.resolve(a.ref, ADMIN)
    cat.delete_revision(ADMIN, rev.id)
    return {"deleted": rev.id}, f"deleted revision {rev.id} of {rev.policy}"


def _alias_set(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    ev = cat.set_alias(ADMIN, a.ref, a.alias, require=a.require, reason=a.reason)
    return ev, f"{ev.policy}:{ev.alias} -> {ev.to_revision_id} (was {ev.from_revision_id or '-'})"


def _alias_history(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    events = cat.alias_history(ADMIN, a.alias_ref)
    rows = [[str(e.seq), e.at.strftime("%Y-%m-%d %H:%M:%S"), e.action, e.from_revision_id or "-",
             e.to_revision_id, e.actor, e.reason or ""] for e in events]
    return events, _table(["#", "AT", "ACTION", "FROM", "TO", "WHO", "WHY"], rows)


def _alias_ls(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    aliases = cat.list_aliases(ADMIN, a.policy)
    return aliases, _table(["ALIAS", "REVISION", "MOVES"], [[x.name, x.revision_id, str(x.version)] for x in aliases])


def _rollback(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    ev = cat.rollback(ADMIN, a.alias_ref, to=a.to, reason=a.reason)
    return ev, f"{ev.policy}:{ev.alias} rolled back {ev.from_revision_id} -> {ev.to_revision_id}"


def _eval_record(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    metrics = {}
    for m in a.metric:
        k, v = _kv(m, "--metric")
        try:
            metrics[k] = float(v)
        except ValueError:
            raise InvalidRequest(f"--metric {m!r}: {v!r} is not a number") from None
    ev = cat.record_evaluation(ADMIN, a.ref, a.suite, metrics)
    return ev, f"recorded {a.suite} for {ev.revision_id}: " + ", ".join(f"{k}={v:g}" for k, v in metrics.items())


def _eval_ls(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    evals = cat.list_evaluations(ADMIN, a.ref)
    rows = [[str(e.id), e.suite, ", ".join(f"{k}={v:g}" for k, v in e.metrics.items()),
             e.created_at.strftime("%Y-%m-%d %H:%M:%S")] for e in evals]
    return evals, _table(["ID", "SUITE", "METRICS", "AT"], rows)


def _eval_compare(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    cmp = cat.compare(ADMIN, a.ref_a, a.ref_b)
    fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    rows = [[d.suite, d.metric, fmt(d.a), fmt(d.b), fmt(d.delta)] for d in cmp.rows]
    return cmp, _table(["SUITE", "METRIC", cmp.a, cmp.b, "DELTA"], rows)


def _lineage(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    lin = cat.lineage(ADMIN, a.ref)
    rows = [["ancestor", r.policy, str(r.seq), r.id] for r in lin.ancestors]
    rows += [["this", lin.revision.policy, str(lin.revision.seq), lin.revision.id]]
    rows += [["descendant", r.policy, str(r.seq), r.id] for r in lin.descendants]
    return lin, _table(["RELATION", "POLICY", "#", "REVISION"], rows)


def _gc(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    r = cat.gc(grace_s=a.grace_s)
    return r, (f"deleted {r.expired_revisions_deleted} expired revisions ({r.expired_revisions_kept} kept: aliased), "
               f"{r.blobs_deleted} blobs ({r.bytes_freed} bytes), {r.tmp_files_deleted} temp files")


def _fsck(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str] | int:
    from lorafleet.api.tinker.state import check_state

    r = cat.check()
    t = check_state(cat, a.state_dir or paths_from_env().home / "tinker")
    ok = r.ok and t.ok
    text = f"{r.revisions_checked} revisions checked, {len(r.problems)} problems, {r.unreferenced_blobs} unreferenced blobs"
    lines = [*r.problems, text, *t.problems,
             f"{t.checkpoints_checked} Tinker checkpoints checked, {len(t.problems)} problems"]
    if a.json:
        print(json.dumps(_plain(r) | {"ok": ok, "tinker": _plain(t)}, indent=2))
    else:
        print("\n".join(lines))
    return 0 if ok else 1


def _keys_create(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    limits = {f"max_{q}": getattr(a, f"max_{q}") for q in ("runs", "queued", "adapters")}
    if any(v is not None for v in limits.values()):  # before the key: a bad value makes no key
        cat.create_tenant(a.tenant)
        cat.set_quotas(a.tenant, **{k: v for k, v in limits.items() if v is not None})
    key = cat.create_key(a.tenant, a.label)
    print("store this key now; it is not shown again", file=sys.stderr)
    return {"tenant": a.tenant, "key": key}, key


def _keys_ls(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    keys = cat.list_keys(a.tenant)
    rows = [[k.id, k.prefix or "-", k.tenant, k.label or "", _when(k.created_at), _when(k.revoked_at)]
            for k in keys]
    return keys, _table(["KEY ID", "PREFIX", "TENANT", "LABEL", "CREATED", "REVOKED"], rows)


def _keys_revoke(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    key, now = cat.revoke_key(a.key)
    state = "revoked" if now else f"already revoked at {_when(key.revoked_at)}"
    return key, f"{key.id} ({key.prefix or 'no prefix'}) of tenant {key.tenant}: {state}"


def _audit(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    events = list(cat.list_audit(ADMIN, tenant=a.tenant, limit=a.limit).items)
    rows = [[_when(e.at), e.actor, e.action, e.target, e.from_value or "-", e.to_value or "-", e.reason or ""]
            for e in events]
    return events, _table(["WHEN", "WHO", "ACTION", "TARGET", "FROM", "TO", "REASON"], rows)


def _tenants_ls(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    tenants = cat.list_tenants()
    rows = [[x.name, _when(x.created_at), str(x.active_keys), f"deleted {_when(x.deleted_at)}" if x.deleted_at else "active"]
            for x in tenants]
    return tenants, _table(["TENANT", "CREATED", "ACTIVE KEYS", "STATUS"], rows)


def _tenants_delete(cat: Catalog, a: argparse.Namespace) -> tuple[Any, str]:
    before = cat.get_tenant(a.tenant)
    tenant = cat.delete_tenant(a.tenant)
    if before.deleted_at is not None:
        return tenant, f"tenant {tenant.name} was already deleted at {_when(before.deleted_at)}"
    return tenant, (f"deleted tenant {tenant.name} ({before.active_keys} keys revoked); its policies "
                    "and Tinker state stay until an operator removes them")


# ---- formatting -------------------------------------------------------------------------


def _kv(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise InvalidRequest(f"{flag} {text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [list(header), *rows])


def _plain(x: Any) -> Any:
    """Records -> JSON-able values."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if hasattr(x, "full_name"):
            out["full_name"] = x.full_name
        if hasattr(x, "digest") and hasattr(x, "files"):
            out = {n: _plain(b) for n, b in x.files}
        return out
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, datetime):
        return x.isoformat()
    return x
