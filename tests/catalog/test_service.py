"""Catalog use cases on SQLite and PostgreSQL, against real files in a local store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from lorafleet.catalog import ADMIN, Principal, Provenance
from lorafleet.catalog.records import RevisionKind
from lorafleet.catalog.service import OPTIMIZER_FILE
from lorafleet.errors import Conflict, Corrupt, Expired, IncompatibleAdapter, InvalidRequest, NotFound
from lorafleet.lora.spec import LoraSpec
from tests.catalog.conftest import BASE, SPEC, adapter_files

ALICE, BOB = Principal("alice"), Principal("bob")


def test_publish_resolve_every_form(catalog):
    catalog.create_policy(ALICE, "alice/chat", BASE, SPEC, tinker_run_id="s1:train:0")
    r1 = catalog.publish(ALICE, "alice/chat", adapter_files(b"one"), step=10, aliases=["prod"],
                         tinker_path="tinker://s1:train:0/sampler_weights/000010")
    r2 = catalog.publish(ALICE, "alice/chat", adapter_files(b"two"), step=20)
    assert (r1.seq, r2.seq) == (1, 2)
    assert catalog.resolve("alice/chat", ALICE).id == r2.id
    assert catalog.resolve("alice/chat:latest", ALICE).id == r2.id
    assert catalog.resolve("alice/chat:prod", ALICE).id == r1.id
    assert catalog.resolve(f"alice/chat@{r1.id}", ALICE).id == r1.id
    assert catalog.resolve(f"alice/chat@{r1.id[:-6]}", ALICE).id == r1.id
    assert catalog.resolve(f"alice/chat@{r2.sha256[:8]}", ALICE).id == r2.id
    assert catalog.resolve(f"alice/chat@sha256:{r2.sha256}", ALICE).id == r2.id
    assert catalog.resolve(r1.id, ALICE).id == r1.id
    assert catalog.resolve("tinker://s1:train:0/sampler_weights/000010", ALICE).id == r1.id
    assert catalog.resolve("mint://s1:train:0/sampler_weights/000010", ALICE).id == r1.id
    assert catalog.read_files(ALICE, "alice/chat:prod")["adapter_model.safetensors"] == b"one"


def test_explicit_latest_alias_wins(catalog, policy):
    r1 = catalog.publish(ALICE, "alice/chat", adapter_files(b"one"))
    catalog.publish(ALICE, "alice/chat", adapter_files(b"two"))
    catalog.set_alias(ALICE, r1.id, "latest")
    assert catalog.resolve("alice/chat", ALICE).id == r1.id


def test_same_bytes_stored_once(catalog, policy, store_dir):
    a = catalog.publish(ALICE, "alice/chat", adapter_files(b"same"))
    b = catalog.publish(ALICE, "alice/chat", adapter_files(b"same"))
    assert a.sha256 == b.sha256 and a.id != b.id
    assert len(list(catalog.store.list_blobs())) == 2  # config + weights, once each
    assert catalog.resolve(f"alice/chat@{a.sha256[:10]}", ALICE).id == b.id  # newest of equals


def test_corrupted_or_truncated_blob_is_refused(catalog, policy):
    rev = catalog.publish(ALICE, "alice/chat", adapter_files(b"x" * 1000))
    sha = catalog.manifest(ALICE, rev.id).as_dict()["adapter_model.safetensors"].sha256
    path = catalog.store.path(sha)
    path.write_bytes(b"x" * 999)
    with pytest.raises(Corrupt, match="999 bytes"):
        catalog.read_files(ALICE, rev.id)
    path.write_bytes(b"y" * 1000)
    with pytest.raises(Corrupt, match="does not match"):
        catalog.read_files(ALICE, rev.id)
    assert not catalog.check().ok
    path.unlink()
    with pytest.raises(NotFound, match="missing"):
        catalog.read_files(ALICE, rev.id)


def test_bad_references_and_names(catalog, policy):
    for bad in ["", "alice", "alice/", "/chat", "alice/chat:Prod", "alice/chat:", "a/b/c",
                "alice/chat@xyz", "alice/chat@12", "tinker://run/checkpoints/x", "tinker://r/weights",
                "al ice/chat", "alice/chat:prod@rev"]:
        with pytest.raises(InvalidRequest):
            catalog.resolve(bad, ALICE)
    with pytest.raises(NotFound):
        catalog.resolve("alice/nope", ALICE)
    with pytest.raises(NotFound):
        catalog.resolve("alice/chat", ALICE)  # no revision yet
    with pytest.raises(NotFound):
        catalog.resolve("alice/chat:prod", ALICE)
    with pytest.raises(NotFound):
        catalog.resolve("rev_01m8mc186c8kx9bawk8w4radtk", ALICE)
    with pytest.raises(NotFound):
        catalog.resolve("tinker://nope:train:0/weights/1", ALICE)
    rev = catalog.publish(ALICE, "alice/chat", adapter_files(b"z"))
    for bad_alias in ["Prod", "-x", "a" * 65, "with space", "ünï"]:
        with pytest.raises(InvalidRequest, match="invalid alias"):
            catalog.set_alias(ALICE, rev.id, bad_alias)
    with pytest.raises(InvalidRequest):
        catalog.create_policy(ADMIN, "bad name/x", BASE, SPEC)
    with pytest.raises(Conflict):
        catalog.create_policy(ADMIN, "alice/chat", BASE, SPEC)


def test_publish_refuses_inconsistent_files(catalog, policy):
    with pytest.raises(InvalidRequest, match="missing"):
        catalog.publish(ALICE, "alice/chat", {"adapter_config.json": b"{}"})
    with pytest.raises(IncompatibleAdapter, match="not valid JSON"):
        catalog.publish(ALICE, "alice/chat", {"adapter_config.json": b"{", "adapter_model.safetensors": b""})
    other = adapter_files(b"w", spec=LoraSpec(rank=16, target_modules=("q_proj", "v_proj")))
    with pytest.raises(IncompatibleAdapter, match="does not match policy"):
        catalog.publish(ALICE, "alice/chat", other)
    with pytest.raises(InvalidRequest, match=OPTIMIZER_FILE):
        catalog.publish(ALICE, "alice/chat", adapter_files(b"w"), kind="state")
    with pytest.raises(InvalidRequest, match="kind"):
        catalog.publish(ALICE, "alice/chat", adapter_files(b"w"), kind="weird")
    state = catalog.publish(ALICE, "alice/chat", {**adapter_files(b"w"), OPTIMIZER_FILE: b"adam"}, kind="state")
    assert state.kind == "state" and set(catalog.read_files(ALICE, state.id)) >= {OPTIMIZER_FILE}
    with pytest.raises(InvalidRequest, match="file name"):
        catalog.publish(ALICE, "alice/chat", {**adapter_files(b"w"), "../evil": b"x"})
    assert catalog.check().ok


def test_tenancy_hides_private_policies(catalog):
    catalog.create_policy(ADMIN, "alice/secret", BASE, SPEC)
    catalog.create_policy(ADMIN, "alice/open", BASE, SPEC, public=True)
    for name in ("alice/secret", "alice/open"):
        catalog.publish(ALICE, name, adapter_files(name.encode()), aliases=["prod"])
    secret = catalog.resolve("alice/secret", ALICE)
    for ref in ("alice/secret", "alice/secret:prod", secret.id, f"alice/secret@{secret.sha256[:8]}"):
        with pytest.raises(NotFound) as err:
            catalog.resolve(ref, BOB)
        assert "secret" not in str(err.value) or "no revision" in str(err.value)
    with pytest.raises(NotFound):
        catalog.get_policy(BOB, "alice/secret")
    assert catalog.resolve("alice/open:prod", BOB)  # public: readable
    with pytest.raises(NotFound):  # ...but not writable
        catalog.publish(BOB, "alice/open", adapter_files(b"bob"))
    with pytest.raises(NotFound):
        catalog.set_alias(BOB, "alice/open", "prod")
    with pytest.raises(InvalidRequest):
        catalog.create_policy(BOB, "alice/mine", BASE, SPEC)
    names = {p.full_name for p in catalog.list_policies(BOB).items}
    assert names == {"alice/open"}
    with pytest.raises(NotFound):
        catalog.set_public(BOB, "alice/secret", True)
    assert catalog.set_public(ALICE, "alice/secret", True).public
    assert catalog.resolve("alice/secret:prod", BOB).id == secret.id
    catalog.set_public(ALICE, "alice/secret", False)
    with pytest.raises(NotFound):
        catalog.resolve("alice/secret:prod", BOB)
    assert {p.full_name for p in catalog.list_policies(ALICE).items} == {"alice/open", "alice/secret"}


def test_api_keys(catalog):
    key = catalog.create_key("carol")
    assert key.startswith("tml-") and len(key) > 40
    assert catalog.principal_for_key(key) == Principal("carol")
    from lorafleet.errors import Unauthorized

    with pytest.raises(Unauthorized):
        catalog.principal_for_key(key + "x")
    with catalog.db.read() as conn:  # only the hash is stored
        stored = conn.execute(text("SELECT key_hash FROM api_keys")).scalars().all()
    assert key not in stored



def test_revoked_keys_and_deleted_tenants_stop_authenticating(catalog):
    from lorafleet.errors import Unauthorized

    k1, k2 = catalog.create_key("dora", "ci"), catalog.create_key("dora")
    erin = catalog.create_key("erin")
    keys = catalog.list_keys("dora")
    assert [(k.tenant, k.label, k.prefix, k.revoked_at) for k in keys] == [
        ("dora", "ci", k1[:12], None), ("dora", None, k2[:12], None)]
    assert all(k.id.startswith("key_") and k.id[4:] not in (k1, k2) for k in keys)

    revoked, now = catalog.revoke_key(keys[0].id)
    assert now and revoked.revoked_at is not None
    with pytest.raises(Unauthorized):
        catalog.principal_for_key(k1)
    assert catalog.principal_for_key(k2) == Principal("dora")
    again, now = catalog.revoke_key(k1[:12])  # by its shown prefix: idempotent
    assert not now and again.revoked_at == revoked.revoked_at
    with pytest.raises(NotFound, match="no API key"):
        catalog.revoke_key("key_" + "0" * 16)
    with pytest.raises(InvalidRequest, match="too short"):
        catalog.revoke_key("tml-")

    with pytest.raises(InvalidRequest, match="built-in"):
        catalog.delete_tenant("local")
    with pytest.raises(NotFound):
        catalog.delete_tenant("nobody")
    gone = catalog.delete_tenant("dora")
    assert gone.deleted_at is not None and gone.active_keys == 0
    assert catalog.delete_tenant("dora").deleted_at == gone.deleted_at  # idempotent
    with pytest.raises(Unauthorized):
        catalog.principal_for_key(k2)
    assert all(k.revoked_at is not None for k in catalog.list_keys("dora"))
    assert catalog.principal_for_key(erin) == Principal("erin")
    with pytest.raises(Conflict, match="never reused"):
        catalog.create_key("dora")
    assert {t.name: t.deleted_at is not None for t in catalog.list_tenants()} == {
        "dora": True, "erin": False, "local": False}


def test_deleted_tenant_is_refused_even_with_a_live_key_row(catalog):
    """Authentication checks the tenant itself, not only that its keys were revoked."""
    from lorafleet.errors import Unauthorized

    key = catalog.create_key("fred")
    with catalog.db.write() as conn:
        conn.execute(text("UPDATE tenants SET deleted_at = created_at WHERE name = 'fred'"))
    with pytest.raises(Unauthorized):
        catalog.principal_for_key(key)

def test_list_search_paginate(catalog):
    for i in range(7):
        catalog.create_policy(ADMIN, f"team{i % 2}/p{i}", BASE if i < 5 else "lorafleet/tiny-moe",
                              SPEC, metadata={"task": "math" if i % 3 == 0 else "chat"})
    page1 = catalog.list_policies(ADMIN, limit=3)
    page2 = catalog.list_policies(ADMIN, limit=3, cursor=page1.next_cursor)
    page3 = catalog.list_policies(ADMIN, limit=3, cursor=page2.next_cursor)
    names = [p.name for pg in (page1, page2, page3) for p in pg.items]
    assert names == [f"p{i}" for i in range(7)] and page3.next_cursor is None
    assert {p.name for p in catalog.list_policies(ADMIN, owner="team1").items} == {"p1", "p3", "p5"}
    assert {p.name for p in catalog.list_policies(ADMIN, base_model="lorafleet/tiny-moe").items} == {"p5", "p6"}
    assert {p.name for p in catalog.list_policies(ADMIN, metadata={"task": "math"}).items} == {"p0", "p3", "p6"}
    assert {p.name for p in catalog.list_policies(ADMIN, query="p1").items} == {"p1"}
    with pytest.raises(InvalidRequest):
        catalog.list_policies(ADMIN, limit=0)


def test_alias_gate_history_rollback(catalog, policy):
    r = [catalog.publish(ALICE, "alice/chat", adapter_files(bytes([i]))) for i in range(4)]
    catalog.set_alias(ALICE, r[0].id, "prod")
    with pytest.raises(Conflict, match="no evaluation"):
        catalog.set_alias(ALICE, r[1].id, "prod", require="accuracy>=0.8")
    catalog.record_evaluation(ALICE, r[1].id, "gsm8k", {"accuracy": 0.7})
    with pytest.raises(Conflict, match="scored"):
        catalog.set_alias(ALICE, r[1].id, "prod", require="accuracy>=0.8")
    catalog.record_evaluation(ALICE, r[1].id, "gsm8k", {"accuracy": 0.85})
    catalog.set_alias(ALICE, r[1].id, "prod", require="accuracy>=0.8", reason="better")
    catalog.set_alias(ALICE, r[2].id, "prod")
    assert catalog.rollback(ALICE, "alice/chat:prod").to_revision_id == r[1].id
    assert catalog.rollback(ALICE, "alice/chat:prod").to_revision_id == r[0].id
    with pytest.raises(Conflict, match="no earlier target"):
        catalog.rollback(ALICE, "alice/chat:prod")
    ev = catalog.rollback(ALICE, "alice/chat:prod", to=r[3].id, reason="hotfix")
    assert ev.from_revision_id == r[0].id and catalog.resolve("alice/chat:prod", ALICE).id == r[3].id
    hist = catalog.alias_history(ALICE, "alice/chat:prod")
    assert [e.seq for e in hist] == [1, 2, 3, 4, 5, 6]
    assert [e.to_revision_id for e in hist] == [r[0].id, r[1].id, r[2].id, r[1].id, r[0].id, r[3].id]
    assert all(h.from_revision_id == p.to_revision_id for p, h in zip(hist, hist[1:]))
    assert hist[1].reason == "better" and hist[-1].action == "rollback"
    with pytest.raises(InvalidRequest):
        catalog.set_alias(ALICE, r[0].id, "prod", require="accuracy≥0.8")
    other = catalog.create_policy(ADMIN, "alice/other", BASE, SPEC)
    o = catalog.publish(ALICE, other.full_name, adapter_files(b"o"))
    with pytest.raises(InvalidRequest, match="not of"):
        catalog.rollback(ALICE, "alice/chat:prod", to=o.id)
    with pytest.raises(NotFound):
        catalog.alias_history(ALICE, "alice/chat:nope")


def test_history_is_append_only_and_revisions_immutable_in_the_database(catalog, policy):
    rev = catalog.publish(ALICE, "alice/chat", adapter_files(b"a"), aliases=["prod"])
    for sql in ["UPDATE revisions SET step = 5", "UPDATE revision_files SET size_bytes = 0",
                "UPDATE alias_events SET reason = 'x'", "DELETE FROM alias_events",
                f"DELETE FROM revisions WHERE id = '{rev.id}'"]:
        with pytest.raises(Exception):
            with catalog.db.write() as conn:
                conn.execute(text(sql))
    assert catalog.resolve("alice/chat:prod", ALICE).step is None


def test_evaluations_and_compare(catalog, policy):
    a = catalog.publish(ALICE, "alice/chat", adapter_files(b"a"))
    b = catalog.publish(ALICE, "alice/chat", adapter_files(b"b"))
    catalog.record_evaluation(ALICE, a.id, "gsm8k", {"accuracy": 0.5, "loss": 1.0}, {"n": 100})
    catalog.record_evaluation(ALICE, b.id, "gsm8k", {"accuracy": 0.75})
    catalog.record_evaluation(ALICE, b.id, "ifeval", {"score": 3})
    evs = catalog.list_evaluations(ALICE, a.id)
    assert evs[0].metrics == {"accuracy": 0.5, "loss": 1.0} and evs[0].details == {"n": 100}
    cmp = {(d.suite, d.metric): d for d in catalog.compare(ALICE, a.id, b.id).rows}
    assert cmp[("gsm8k", "accuracy")].delta == pytest.approx(0.25)
    assert cmp[("gsm8k", "loss")].b is None and cmp[("ifeval", "score")].a is None
    for bad in ({}, {"x": "high"}, {"x": float("nan")}):
        with pytest.raises(InvalidRequest):
            catalog.record_evaluation(ALICE, a.id, "s", bad)


def test_lineage_across_branches(catalog, policy):
    r1 = catalog.publish(ALICE, "alice/chat", adapter_files(b"1"))
    r2 = catalog.publish(ALICE, "alice/chat", adapter_files(b"2"), provenance=Provenance(
        parent_revision_id=r1.id, loss_fn="cross_entropy", optimizer_config={"lr": 1e-4},
        data_digest="ab" * 32, code_version="abc123"))
    catalog.create_policy(ADMIN, "alice/branch", BASE, SPEC, parent=f"alice/chat@{r2.id}")
    b1 = catalog.publish(ALICE, "alice/branch", adapter_files(b"b1"))
    b2 = catalog.publish(ALICE, "alice/branch", adapter_files(b"b2"), provenance=Provenance(parent_revision_id=b1.id))
    r3 = catalog.publish(ALICE, "alice/chat", adapter_files(b"3"), provenance=Provenance(parent_revision_id=r2.id))
    assert b1.provenance.parent_revision_id == r2.id  # first revision of a branch
    lin = catalog.lineage(ALICE, b2.id)
    assert [r.id for r in lin.ancestors] == [b1.id, r2.id, r1.id] and lin.descendants == ()
    down = catalog.lineage(ALICE, r1.id)
    assert [r.id for r in down.descendants] == [r2.id] + sorted([b1.id, r3.id]) + [b2.id]
    assert r2.provenance.optimizer_config == {"lr": 1e-4}
    assert catalog.resolve(r2.id, ALICE).provenance.loss_fn == "cross_entropy"


def test_delete_and_gc(catalog, policy):
    keep = catalog.publish(ALICE, "alice/chat", adapter_files(b"keep"), aliases=["prod"])
    gone = catalog.publish(ALICE, "alice/chat", adapter_files(b"gone"))
    past = datetime.now(UTC) - timedelta(seconds=1)
    exp = catalog.publish(ALICE, "alice/chat", adapter_files(b"expired"), expires_at=past)
    exp_aliased = catalog.publish(ALICE, "alice/chat", adapter_files(b"exp2"), expires_at=past, aliases=["old"])
    with pytest.raises(Expired):
        catalog.resolve(exp.id, ALICE)
    with pytest.raises(Expired):
        catalog.resolve("alice/chat:old", ALICE)
    assert catalog.resolve("alice/chat", ALICE).id == gone.id  # latest skips expired
    with pytest.raises(Conflict, match="alias"):
        catalog.delete_revision(ALICE, keep.id)
    catalog.delete_revision(ALICE, gone.id)
    with pytest.raises(NotFound):
        catalog.resolve(gone.id, ALICE)
    catalog.store.put(b"orphan from a crashed publish")
    report = catalog.gc(grace_s=0)
    assert (report.expired_revisions_deleted, report.expired_revisions_kept) == (1, 1)
    assert report.blobs_deleted == 3  # gone, expired, orphan (configs are shared)
    assert catalog.check().ok and catalog.check().unreferenced_blobs == 0
    assert catalog.read_files(ALICE, "alice/chat:prod")["adapter_model.safetensors"] == b"keep"
    assert catalog.resolve(exp_aliased.id, ADMIN) if False else True
    catalog.delete_policy(ALICE, "alice/chat")
    with pytest.raises(NotFound):
        catalog.resolve("alice/chat:prod", ALICE)
    assert catalog.list_policies(ADMIN).items == ()


def test_gc_keeps_young_unreferenced_blobs(catalog):
    catalog.store.put(b"in-flight publish")
    assert catalog.gc(grace_s=3600).blobs_deleted == 0


def test_tinker_paths_and_runs(catalog):
    pol = catalog.create_policy(ADMIN, "alice/run", BASE, SPEC, tinker_run_id="sess1:train:0")
    assert catalog.policy_for_run(ALICE, "sess1:train:0").id == pol.id
    with pytest.raises(NotFound):
        catalog.policy_for_run(BOB, "sess1:train:0")
    path = "tinker://sess1:train:0/weights/step-5"
    st = catalog.publish(ALICE, "alice/run", {**adapter_files(b"s"), OPTIMIZER_FILE: b"o"}, kind="state", tinker_path=path)
    assert catalog.resolve(path, ALICE).id == st.id
    with pytest.raises(Conflict, match="tinker path"):
        catalog.publish(ALICE, "alice/run", adapter_files(b"t"), tinker_path=path)
    with pytest.raises(Conflict):
        catalog.create_policy(ADMIN, "alice/run2", BASE, SPEC, tinker_run_id="sess1:train:0")


def test_revisions_listing(catalog, policy):
    revs = [catalog.publish(ALICE, "alice/chat", adapter_files(bytes([i]))) for i in range(5)]
    p1 = catalog.list_revisions(ALICE, "alice/chat", limit=3)
    p2 = catalog.list_revisions(ALICE, "alice/chat", limit=3, cursor=p1.next_cursor)
    assert [r.id for r in p1.items + p2.items] == [r.id for r in reversed(revs)]
    assert p2.next_cursor is None


def test_bulk_insert_rows_resolve_like_published_ones(catalog):
    """The bulk path (COPY on PostgreSQL) stores the same columns, JSON included."""
    from lorafleet.catalog import repo
    from lorafleet.catalog.refs import new_id

    now = datetime.now(UTC)
    pid, rid = new_id("pol"), new_id("rev")
    with catalog.db.write() as conn:
        repo.ensure_tenant(conn, "bulk", now)
        repo.bulk_insert(conn, "policies", [dict(
            id=pid, owner="bulk", name="p", base_model=BASE, base_digest=None, lora_rank=4,
            lora_alpha=8.0, target_modules="q_proj,v_proj", use_rslora=False, parent_revision_id=None,
            public=False, created_at=now, deleted_at=None, tinker_run_id="bulk:train:0")])
        repo.bulk_insert(conn, "revisions", [dict(
            id=rid, policy_id=pid, seq=1, kind="sampler", sha256="ab" * 32, size_bytes=3,
            store_url="x", step=5, parent_revision_id=None, loss_fn="ppo", loss_config={"clip": 0.2},
            optimizer_config=None, data_digest=None, code_version="v1", created_by="bulk",
            created_at=now, expires_at=None, tinker_path="tinker://bulk:train:0/weights/1")])
    rev = catalog.resolve("tinker://bulk:train:0/weights/1", ADMIN)
    assert rev.id == rid and rev.provenance.loss_config == {"clip": 0.2} and rev.step == 5
    assert catalog.resolve("bulk/p", ADMIN).id == rid


def _run_policy(catalog, name: str, run: str):
    return catalog.create_policy(ADMIN, name, BASE, SPEC, tinker_run_id=run)


def test_a_tinker_path_belongs_to_the_policy_of_its_run(catalog, policy):
    """Issue 10 H1: bob cannot publish under alice's run, nor shadow her paths."""
    _run_policy(catalog, "alice/run", "a:train:0")
    bob_run = _run_policy(catalog, "bob/run", "b:train:0")
    errors = {}
    for path in ("tinker://a:train:0/weights/x", "tinker://nobody:train:0/weights/x"):
        with pytest.raises(NotFound) as e:
            catalog.publish(BOB, "bob/run", adapter_files(b"bob"), tinker_path=path)
        errors[path] = str(e.value).replace(path.split("/")[2], "RUN")
    assert len(set(errors.values())) == 1  # another tenant's run reads like a missing one
    with pytest.raises(NotFound):  # own run, but not the run of this policy
        catalog.publish(ALICE, "alice/chat", adapter_files(b"a"), tinker_path="tinker://a:train:0/weights/x")
    mine = catalog.publish(ALICE, "alice/run", adapter_files(b"a"), tinker_path="tinker://a:train:0/weights/x")
    assert catalog.resolve("tinker://a:train:0/weights/x", ALICE).id == mine.id

    # a revision stored before this check, in bob's policy under alice's run, never resolves
    from lorafleet.store.manifest import Manifest

    files = adapter_files(b"shadow")
    for data in files.values():
        catalog.store.put(data)
    catalog._commit_revision(BOB, bob_run, Manifest.for_bytes(files), RevisionKind.SAMPLER, None,
                             Provenance(), None, "tinker://a:train:0/weights/y", None, (), None)
    for who in (ALICE, BOB, ADMIN):
        with pytest.raises(NotFound):
            catalog.resolve("tinker://a:train:0/weights/y", who)


@pytest.mark.parametrize("bad", ["tinker://../weights/..", "tinker://../weights/escaped",
                                 "tinker://a:train:0/weights/..", "tinker://a:train:0/weights/.",
                                 "tinker://a:train:0/weights/x\n", "tinker://./weights/x",
                                 "tinker://a:train:0/weights/a\x00", " tinker://a:train:0/weights/x"])
def test_unsafe_tinker_paths_are_refused(catalog, bad):
    """Issue 10 C1: dot segments, NUL, whitespace are malformed where a path is accepted."""
    _run_policy(catalog, "alice/run", "a:train:0")
    with pytest.raises(InvalidRequest):
        catalog.publish(ALICE, "alice/run", adapter_files(b"a"), tinker_path=bad)
    with pytest.raises(InvalidRequest):
        catalog.resolve(bad, ALICE)
    with pytest.raises(InvalidRequest):
        catalog.create_policy(ADMIN, "alice/run2", BASE, SPEC, tinker_run_id="..")


def test_names_ending_in_a_newline_are_refused(catalog, policy):
    """`$` matched before a final newline: `prod\\n` was listed but never resolved."""
    rev = catalog.publish(ALICE, "alice/chat", adapter_files(b"a"))
    with pytest.raises(InvalidRequest, match="invalid alias"):
        catalog.set_alias(ALICE, rev.id, "prod\n")
    assert catalog.list_aliases(ALICE, "alice/chat") == []
    for ref in ("alice/chat\n", "alice/chat:latest\n", f"{rev.id}\n", f"alice/chat@{rev.sha256[:8]}\n"):
        with pytest.raises(InvalidRequest):
            catalog.resolve(ref, ALICE)
    with pytest.raises(InvalidRequest):
        catalog.create_policy(ALICE, "alice/other\n", BASE, SPEC)
    with pytest.raises(InvalidRequest):
        catalog.create_tenant("carol\n")
    with pytest.raises(InvalidRequest):
        catalog.publish(ALICE, "alice/chat", {**adapter_files(b"b"), "notes.txt\n": b"x"})


def test_rename_keeps_revisions_aliases_and_tinker_paths(catalog):
    catalog.create_policy(ADMIN, "alice/taken", BASE, SPEC)
    policy = _run_policy(catalog, "alice/chat", "s9:train:0")
    rev = catalog.publish(ALICE, "alice/chat", adapter_files(b"one"), aliases=["prod"],
                          tinker_path="tinker://s9:train:0/sampler_weights/a")
    renamed = catalog.rename_policy(ALICE, "alice/chat", "alice/support")
    assert renamed.id == policy.id and renamed.full_name == "alice/support"
    assert catalog.resolve("alice/support:prod", ALICE).id == rev.id
    assert catalog.resolve("tinker://s9:train:0/sampler_weights/a", ALICE).policy == "alice/support"
    with pytest.raises(NotFound):
        catalog.resolve("alice/chat", ALICE)
    with pytest.raises(Conflict, match="alice/taken"):
        catalog.rename_policy(ALICE, "alice/support", "alice/taken")
    with pytest.raises(InvalidRequest, match="bob"):
        catalog.rename_policy(ALICE, "alice/support", "bob/support")
    with pytest.raises(NotFound):
        catalog.rename_policy(BOB, "alice/support", "alice/other")
    assert catalog.get_policy(ALICE, "alice/support").id == policy.id  # nothing half-done
