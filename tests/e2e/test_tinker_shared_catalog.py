"""Two lorafleet servers over one catalog: a checkpoint saved through one is loadable and
samplable through the other (tinker:// paths resolve through the catalog)."""

from __future__ import annotations

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_tinker_sdk_basic import BATCH

ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)


def test_checkpoint_moves_between_servers(paths, tmp_path):
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    shared = tmp_path / "catalog"
    shared.mkdir()
    engines = []
    for _ in range(2):
        base = load_base(TINY, paths)
        engines.append((base, Engine(base)))
    a = start_server(paths, [TINY], tmp_path / "a", engines={TINY: engines[0]}, catalog_dir=shared)
    b = start_server(paths, [TINY], tmp_path / "b", engines={TINY: engines[1]}, catalog_dir=shared)
    try:
        tc = tinker.ServiceClient(base_url=a.url).create_lora_training_client(
            base_model=TINY, rank=4, user_metadata={"k": "v"}).result()
        tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(ADAM).result()
        state = tc.save_state("s").result().path
        sampler = tc.save_weights_for_sampler("w").result().path
        tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(ADAM).result()
        expected = tc.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]

        on_b = tinker.ServiceClient(base_url=b.url)
        resumed = on_b.create_training_client_from_state_with_optimizer(state).result()
        resumed.forward_backward(BATCH, "cross_entropy").result()
        resumed.optim_step(ADAM).result()
        got = resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
        assert got == pytest.approx(expected, rel=1e-5)
        sc = on_b.create_sampling_client(model_path=sampler).result()
        assert sc.sample(types.ModelInput.from_ints([1, 2]), 1,
                         types.SamplingParams(max_tokens=2)).result().sequences
        info = tinker.RestClient(base_url=b.url).get_weights_info_by_tinker_path(state).result()
        assert info.base_model == TINY and info.lora_rank == 4
    finally:
        a.stop()
        b.stop()


def test_a_catalog_revision_without_a_tinker_row_is_adopted_by_its_path(server, service_client):
    """What a server before migration 0004 left: a revision with a tinker:// path, no Tinker row
    (its tinker.db was moved aside). The path loads, samples and answers weights_info, and is
    recorded as a checkpoint over the revision's own blobs (no copy)."""
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    path = tc.save_weights_for_sampler("legacy").result().path
    svc = server.service
    blobs = sorted(sha for sha, _ in svc.checkpoints.store.list_blobs())
    revision = svc.repo.checkpoint(path)["revision_id"]
    svc.repo.delete_checkpoint(path)  # as if the row had been in the old tinker.db
    assert svc.repo.checkpoint(path) is None

    info = tinker.RestClient(base_url=server.url).get_weights_info_by_tinker_path(path).result()
    assert info.base_model == TINY and info.lora_rank == 4
    row = svc.repo.checkpoint(path)
    assert row is not None and row["revision_id"] == revision and row["kind"] == "sampler"
    assert sorted(sha for sha, _ in svc.checkpoints.store.list_blobs()) == blobs  # no copy
    sc = service_client.create_sampling_client(model_path=path).result()
    assert sc.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result().sequences


def test_a_session_finished_through_another_server_frees_its_runs_here(server, service_client):
    """Another server on the same database ended the session (its row says so); this server's
    janitor pass unloads the run it holds, and the run answers 404 like any unloaded run."""
    import time

    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    svc = server.service
    runner = svc.runners[TINY]
    assert runner.knows_run(tc.model_id)
    session = svc.repo.run_by_id(tc.model_id)["session_id"]
    svc.repo.finish_session(session, "success")  # what the other server wrote
    svc.expire_sessions(timeout_s=3600)
    deadline = time.time() + 30
    while runner.knows_run(tc.model_id):
        assert time.time() < deadline, "the run stayed loaded"
        time.sleep(0.05)
    with pytest.raises(tinker.NotFoundError, match="not loaded"):
        tc.forward_backward(BATCH, "cross_entropy").result()
