"""The audit log: alias moves, rollbacks, deletions, key creation/revocation and tenant deletion,
each written in the same transaction as the change, append-only, tenant-scoped (both backends)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from lorafleet.catalog import ADMIN, Principal
from lorafleet.errors import Conflict, NotFound
from tests.catalog.conftest import BASE, SPEC, adapter_files

ALICE, BOB = Principal("alice"), Principal("bob")


def _log(catalog, who=ADMIN, **kw):
    return [(e.actor, e.tenant, e.action, e.target, e.from_value, e.to_value)
            for e in reversed(catalog.list_audit(who, **kw).items)]


def test_every_audited_change_is_recorded(catalog):
    key = catalog.create_key("alice", "ci")
    catalog.create_policy(ALICE, "alice/chat", BASE, SPEC)
    r1 = catalog.publish(ALICE, "alice/chat", adapter_files(b"one"))
    r2 = catalog.publish(ALICE, "alice/chat", adapter_files(b"two"))
    r3 = catalog.publish(ALICE, "alice/chat", adapter_files(b"three"))
    catalog.set_alias(ALICE, r1.id, "prod", reason="first")
    catalog.set_alias(ALICE, r2.id, "prod")
    catalog.rollback(ALICE, "alice/chat:prod", reason="bad")
    catalog.delete_revision(ALICE, r3.id)
    kid = catalog.list_keys("alice")[0].id
    catalog.revoke_key(kid)
    catalog.revoke_key(kid)  # idempotent: no second event
    catalog.delete_policy(ALICE, "alice/chat")
    catalog.delete_tenant("alice")
    catalog.delete_tenant("alice")
    assert _log(catalog) == [
        ("local", "alice", "key.create", kid, None, key[:12]),
        ("alice", "alice", "alias.set", "alice/chat:prod", None, r1.id),
        ("alice", "alice", "alias.set", "alice/chat:prod", r1.id, r2.id),
        ("alice", "alice", "alias.rollback", "alice/chat:prod", r2.id, r1.id),
        ("alice", "alice", "revision.delete", f"alice/chat@{r3.id}", r3.sha256, None),
        ("local", "alice", "key.revoke", kid, key[:12], None),
        ("alice", "alice", "policy.delete", "alice/chat", None, None),
        ("local", "alice", "tenant.delete", "alice", None, None),
    ]
    events = catalog.list_audit(ADMIN).items
    assert events[0].reason == "0 keys revoked" and {e.reason for e in events} >= {"first", "bad", "ci"}


def test_refused_changes_leave_no_event(catalog):
    catalog.create_policy(ALICE, "alice/chat", BASE, SPEC)
    r1 = catalog.publish(ALICE, "alice/chat", adapter_files(b"one"))
    catalog.set_alias(ALICE, r1.id, "prod")
    with pytest.raises(Conflict):  # an alias points at it
        catalog.delete_revision(ALICE, r1.id)
    with pytest.raises(Conflict):  # nothing earlier to roll back to
        catalog.rollback(ALICE, "alice/chat:prod")
    with pytest.raises(NotFound):
        catalog.delete_policy(BOB, "alice/chat")
    assert [a for _, _, a, *_ in _log(catalog)] == ["alias.set"]


def test_tenants_see_only_their_own_events(catalog):
    catalog.create_key("alice")
    catalog.create_key("bob")
    catalog.create_policy(BOB, "bob/p", BASE, SPEC)
    catalog.delete_policy(BOB, "bob/p")
    assert {e.tenant for e in catalog.list_audit(ALICE).items} == {"alice"}
    assert [e.action for e in catalog.list_audit(BOB).items] == ["policy.delete", "key.create"]
    assert catalog.list_audit(BOB, tenant="bob").items == catalog.list_audit(BOB).items
    with pytest.raises(NotFound):
        catalog.list_audit(BOB, tenant="alice")
    assert {e.tenant for e in catalog.list_audit(ADMIN, tenant="alice").items} == {"alice"}
    # paging, newest first
    first = catalog.list_audit(ADMIN, limit=2)
    rest = catalog.list_audit(ADMIN, limit=2, cursor=first.next_cursor)
    assert [e.id for e in first.items + rest.items] == sorted((e.id for e in first.items + rest.items), reverse=True)
    assert len(first.items + rest.items) == 3


def test_audit_rows_are_append_only(catalog):
    catalog.create_key("alice")
    for stmt in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="forbidden"), catalog.db.write() as conn:
            conn.execute(text(stmt))
    assert len(catalog.list_audit(ADMIN).items) == 1
