"""The engine scheduler with a fake sink (no HTTP, no SQLite): training order and fusion,
poisoned windows, micro-batches, continuous batching (joins, leaves, chunked prefill,
preemption, seeds, cancellation), and training interleaved with decoding."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorafleet.engine import Engine
from lorafleet.engine.decode import Budgets
from lorafleet.engine.jobs import (
    CreateRun,
    ForwardBackward,
    Job,
    OptimStep,
    Sample,
    Save,
    Snapshot,
    WorkKind,
)
from lorafleet.engine.scheduler import Scheduler
from lorafleet.engine.types import SampleRequest, SamplingParams
from lorafleet.errors import Cancelled, InvalidRequest, NoCapacity
from lorafleet.lora.spec import LoraSpec
from lorafleet.model import load_base
from lorafleet.train.types import AdamParams, Datum
from tests.helpers import random_adapter

OUT_OF_VOCAB = 10**6


class FakeSink:
    """Records outcomes; `wait(job)` blocks on an event, never on a sleep."""

    def __init__(self) -> None:
        self.outcomes: dict[int, object] = {}
        self.tokens: dict[int, list[tuple[int, int, int]]] = {}
        self.order: list[int] = []
        self.first_token: dict[int, float] = {}
        self._events: dict[int, threading.Event] = {}
        self._alive: list[Job] = []
        self._lock = threading.Lock()

    def _event(self, job: Job) -> threading.Event:
        with self._lock:
            self._alive.append(job)  # keyed by id(): a freed job's id could be reused
            return self._events.setdefault(id(job), threading.Event())

    def done(self, job, result) -> None:
        self._finish(job, result)

    def failed(self, job, error) -> None:
        self._finish(job, error)

    def _finish(self, job, outcome) -> None:
        self.outcomes[id(job)] = outcome
        self.order.append(id(job))
        self._event(job).set()

    def on_token(self, job, request, sample, token, logprob, top=None) -> None:
        self.first_token.setdefault(id(job), time.monotonic())
        self.tokens.setdefault(id(job), []).append((request, sample, token))

    def wait(self, job, timeout=60.0):
        assert self._event(job).wait(timeout), f"{job.kind} never finished"
        return self.outcomes[id(job)]


class RecordingEngine(Engine):
    """The real engine on tiny-llama, recording what the scheduler asks and able to pause."""

    def __init__(self, base):
        super().__init__(base)
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a forward_backward has started
        self.discarded: list[int] = []

    def forward_backward(self, reqs):
        self.entered.set()
        self.gate.wait()
        self.calls.append(("fb", [(r.adapter, int(r.data[0].tokens[0]), len(r.data)) for r in reqs]))
        return super().forward_backward(reqs)

    def optim_step(self, h, hp):
        self.calls.append(("optim", h))
        return super().optim_step(h, hp)

    def discard_grads(self, h):
        self.discarded.append(h)
        super().discard_grads(h)


@pytest.fixture()
def rig(paths):
    engine = RecordingEngine(load_base("lorafleet/tiny-llama", paths))
    sched = Scheduler(engine, engine.base, gap_timeout_s=0.3,
                      budgets=Budgets(max_num_batched_tokens=64))
    sched.start()
    yield sched, engine, FakeSink()
    sched.stop()


def fwdbwd(first_token=1, n=1):
    data = [Datum(torch.tensor([first_token, 2, 3]), {"target_tokens": torch.tensor([2, 3, 4]),
                                                      "weights": torch.ones(3)}) for _ in range(n)]
    return ForwardBackward(data, fingerprint=f"fp{first_token}")


def submit(sched, sink, kind, run, seq, payload):
    job = Job(kind, payload, sink, run_id=run, seq_id=seq, tag=f"{run}{seq}")
    sched.submit(job)
    return job


def create(sched, sink, run, rank=2):
    job = Job(WorkKind.CREATE_RUN, CreateRun(LoraSpec(rank=rank), seed=0), sink, run_id=run)
    sched.submit(job)
    sink.wait(job)


def ok(outcome):
    assert not isinstance(outcome, Exception), outcome
    return outcome


# ---- training --------------------------------------------------------------------------------


def test_ordered_per_run_and_fused_across_runs(rig):
    sched, engine, sink = rig
    for run in "abc":
        create(sched, sink, run)
    engine.gate.clear()  # the compute thread blocks inside c's call while everything queues up
    blocker = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "c", 1, fwdbwd(31))
    while not sched.training.current:
        time.sleep(0.01)
    jobs = [blocker, submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 3, fwdbwd(13)),
            submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 2, fwdbwd(12)),
            submit(sched, sink, WorkKind.FORWARD_BACKWARD, "b", 1, fwdbwd(21)),
            submit(sched, sink, WorkKind.OPTIM_STEP, "a", 4, OptimStep(AdamParams()))]
    submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(11))
    engine.gate.set()
    for job in jobs:
        ok(sink.wait(job))
    fb = [c for c in engine.calls if c[0] == "fb"]
    flat = [tok for _, reqs in fb for _, tok, _ in reqs]
    assert [t for t in flat if t in (11, 12, 13)] == [11, 12, 13]  # a's chunks in seq order
    assert any(len({h for h, _, _ in reqs}) == 2 for _, reqs in fb)  # a and b fused in one call
    assert engine.calls[-1][0] == "optim"


def test_reused_seq_id_is_refused(rig):
    sched, _, sink = rig
    create(sched, sink, "a")
    ok(sink.wait(submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd())))
    with pytest.raises(InvalidRequest, match="already used"):
        submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd())


def test_failed_chunk_discards_grads_and_poisons_optim_step(rig):
    sched, engine, sink = rig
    create(sched, sink, "a")
    good = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(5))
    bad = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 2, fwdbwd(OUT_OF_VOCAB))
    opt = submit(sched, sink, WorkKind.OPTIM_STEP, "a", 3, OptimStep(AdamParams()))
    ok(sink.wait(good))
    assert isinstance(sink.wait(bad), InvalidRequest)
    assert isinstance(sink.wait(opt), InvalidRequest)
    assert engine.discarded  # partial gradients dropped
    assert ("optim", sched.runs["a"].handle) not in engine.calls


def test_gap_is_skipped_after_timeout(rig):
    sched, _, sink = rig
    create(sched, sink, "a")
    job = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 2, fwdbwd())  # seq 1 never comes
    assert id(job) not in sink.outcomes
    ok(sink.wait(job, timeout=5))


def test_a_bad_request_in_a_fused_batch_leaves_other_runs_gradients_alone(rig):
    sched, engine, sink = rig
    create(sched, sink, "a")
    create(sched, sink, "b")
    ok(sink.wait(submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(5))))
    engine.gate.clear()
    blocker = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 2, fwdbwd(6))
    while not sched.training.current:
        time.sleep(0.01)
    fused = [submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 3, fwdbwd(7)),
             submit(sched, sink, WorkKind.FORWARD_BACKWARD, "b", 1, fwdbwd(OUT_OF_VOCAB))]
    engine.gate.set()
    ok(sink.wait(blocker))
    ok(sink.wait(fused[0]))
    assert isinstance(sink.wait(fused[1]), InvalidRequest)
    a = sched.runs["a"].handle
    assert a not in engine.discarded and engine.has_grads(a)
    ok(sink.wait(submit(sched, sink, WorkKind.OPTIM_STEP, "a", 4, OptimStep(AdamParams()))))


def test_fused_batches_are_capped_by_logit_memory(paths):
    base = load_base("lorafleet/tiny-llama", paths)
    sched = Scheduler(Engine(base), base, max_fused_logit_bytes=4 * base.info.vocab_size * 4 * 3)
    assert sched.max_fused_tokens == 4  # two 3-token chunks no longer fit one batch


def test_micro_batches_give_the_gradient_of_the_whole_batch(paths):
    """A fused batch of 8 datums in micro-batches of 6 tokens (2 datums each): same result."""
    engine = RecordingEngine(load_base("lorafleet/tiny-llama", paths))
    sched = Scheduler(engine, engine.base, micro_batch_tokens=6)
    sched.start()
    sink = FakeSink()
    try:
        create(sched, sink, "a")
        job = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(7, n=8))
        res = ok(sink.wait(job))
        snap = ok(sink.wait(submit(sched, sink, WorkKind.SAVE, "a", 2, Save())))
    finally:
        sched.stop()
    assert [reqs[0][2] for kind, reqs in engine.calls if kind == "fb"] == [2, 2, 2, 2]
    assert len(res.outputs) == 8
    ref = Engine(load_base("lorafleet/tiny-llama", paths))
    h = ref.create_adapter(LoraSpec(rank=2), seed=0)
    from lorafleet.train.types import FwdBwdRequest

    (want,) = ref.forward_backward([FwdBwdRequest(h, fwdbwd(7, n=8).data)])
    assert res.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    assert isinstance(snap, Snapshot) and snap.state.step == 0


# ---- sampling --------------------------------------------------------------------------------


def lease(sched, key, seed, spec=LoraSpec(rank=4)):
    weights = random_adapter(sched.engine.info, spec, seed=seed, b_scale=0.5)
    sched.residency.add_host(key, weights)
    return sched.residency.acquire(key)


def sample(sched, sink, requests, key=None, seed=0):
    job = Job(WorkKind.SAMPLE, Sample(requests, None if key is None else lease(sched, key, seed)), sink)
    sched.submit(job)
    return job


def test_continuous_decode_equals_the_whole_batch_reference(rig):
    """Rows joining and leaving every step, chunked prefill (budget 64 tokens), n samples,
    mixed adapters: the same tokens and logprobs as the reference `generate` path."""
    sched, engine, sink = rig
    p0 = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=())
    p1 = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    reqs = [(SampleRequest(None, [1, 2, 3, 4, 5], 2, p0), "x"),
            (SampleRequest(None, list(range(10, 150)), 1, p1), "y"),  # prefilled in 3 chunks
            (SampleRequest(None, [7, 8], 1, p0, prompt_logprobs=True), None)]
    jobs = [sample(sched, sink, [r], key, seed=i) for i, (r, key) in enumerate(reqs)]
    got = [ok(sink.wait(j))[0] for j in jobs]
    handles = [None if key is None else engine.create_adapter(
        LoraSpec(rank=4), weights=random_adapter(engine.info, LoraSpec(rank=4), seed=i, b_scale=0.5))
        for i, (_, key) in enumerate(reqs)]
    from dataclasses import replace

    want = engine.sample([replace(r, adapter=h) for (r, _), h in zip(reqs, handles)])
    for g, w in zip(got, want):
        assert [s.tokens for s in g.sequences] == [s.tokens for s in w.sequences]
        for a, b in zip(g.sequences, w.sequences):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got[2].prompt_logprobs[1:]), torch.tensor(want[2].prompt_logprobs[1:]),
                               rtol=1e-4, atol=1e-4)
    assert sched.stats["prefill_chunks"] >= 5


def test_seeded_tokens_do_not_depend_on_the_batch(rig):
    sched, _, sink = rig
    req = SampleRequest(None, [1, 504, 2823], 2, SamplingParams(max_tokens=16, seed=7, stop_token_ids=()))
    alone = ok(sink.wait(sample(sched, sink, [req], "k", seed=1)))[0]
    others = [sample(sched, sink, [SampleRequest(None, list(range(5, 5 + 9 * i)), 1,
                                                 SamplingParams(max_tokens=30, seed=i))], f"o{i}", seed=i)
              for i in range(1, 4)]
    crowded = ok(sink.wait(sample(sched, sink, [req], "k", seed=1)))[0]
    for j in others:
        ok(sink.wait(j))
    assert [s.tokens for s in crowded.sequences] == [s.tokens for s in alone.sequences]


def test_kv_budget_preempts_and_recomputes_without_changing_tokens(paths):
    engine = Engine(load_base("lorafleet/tiny-llama", paths))
    reqs = [SampleRequest(None, list(range(3, 3 + 10 * (i + 1))), 1,
                          SamplingParams(max_tokens=24, seed=i, temperature=0.9)) for i in range(4)]
    want = engine.sample(reqs)
    sched = Scheduler(engine, engine.base, budgets=Budgets(kv_cache_bytes=60_000))
    sched.start()
    sink = FakeSink()
    try:
        jobs = [sample(sched, sink, [r]) for r in reqs]
        got = [ok(sink.wait(j))[0] for j in jobs]
    finally:
        sched.stop()
    assert [g.sequences[0].tokens for g in got] == [w.sequences[0].tokens for w in want]
    assert sched.stats["preempted"] >= 1


def test_per_row_penalties_survive_joins_leaves_and_preemption(paths):
    """Rows with their own penalties, biases, min_tokens and top-k logprobs, preempted and
    recomputed under a small KV budget: the continuous decoder (history kept incrementally
    through joins, leaves and recomputes) gives the reference's tokens and top logprobs."""
    engine = Engine(load_base("lorafleet/tiny-llama", paths))
    settings = [dict(temperature=0.9), dict(frequency_penalty=0.8, top_logprobs=3),
                dict(repetition_penalty=1.5, logit_bias=((5, 4.0),)), dict(min_tokens=20, min_p=0.05, temperature=0.9),
                dict(presence_penalty=2.0, frequency_penalty=2.0)]  # the newest rows are preempted
    # greedy, on prompts that repeat: the tiny model loops, so a penalty changes its tokens
    reqs = [SampleRequest(None, [3, 4, 5, 6, 7] * 2 * (i + 1), 1,
                          SamplingParams(**{"max_tokens": 24, "seed": i, "temperature": 0.0, **kw}))
            for i, kw in enumerate(settings)]
    want = engine.sample(reqs)
    sched = Scheduler(engine, engine.base, budgets=Budgets(kv_cache_bytes=60_000))
    sched.start()
    sink = FakeSink()
    try:
        jobs = [sample(sched, sink, [r]) for r in reqs]
        got = [ok(sink.wait(j))[0] for j in jobs]
    finally:
        sched.stop()
    assert sched.stats["preempted"] >= 1
    for g, w in zip(got, want):
        assert g.sequences[0].tokens == w.sequences[0].tokens
    assert len(got[3].sequences[0].tokens) >= 20
    plain = engine.sample([SampleRequest(None, r.prompt, 1, SamplingParams(max_tokens=24, temperature=0.0))
                           for r in reqs[1:3] + reqs[4:]])
    assert all(p.sequences[0].tokens != g.sequences[0].tokens for p, g in zip(plain, got[1:3] + got[4:]))
    tops_g, tops_w = got[1].sequences[0].top_logprobs, want[1].sequences[0].top_logprobs
    assert len(tops_g) == len(got[1].sequences[0].tokens) and [[t for t, _ in x] for x in tops_g] == \
        [[t for t, _ in x] for x in tops_w]
    assert got[0].sequences[0].top_logprobs is None


def test_a_short_request_finishes_while_a_long_one_decodes(rig):
    sched, _, sink = rig
    long = sample(sched, sink, [SampleRequest(None, [1, 2, 3], 1,
                                              SamplingParams(max_tokens=1500, stop_token_ids=()))])
    while id(long) not in sink.tokens:  # the long one is decoding
        time.sleep(0.005)
    t0 = time.monotonic()
    short = sample(sched, sink, [SampleRequest(None, [4, 5, 6], 1,
                                               SamplingParams(max_tokens=4, stop_token_ids=()))])
    ok(sink.wait(short))
    short_s = time.monotonic() - t0
    assert id(long) not in sink.outcomes  # it finished first, while the long one still ran
    assert short_s < 5.0, short_s  # a few decode steps, not the 1500 of the long one
    long.cancel()
    assert isinstance(sink.wait(long), Cancelled)


def test_a_cancelled_job_frees_its_rows_at_the_next_step(rig):
    sched, _, sink = rig
    long = sample(sched, sink, [SampleRequest(None, [1, 2, 3], 4,
                                              SamplingParams(max_tokens=1500, stop_token_ids=()))])
    while len(sink.tokens.get(id(long), [])) < 8:
        time.sleep(0.005)
    long.cancel()
    assert isinstance(sink.wait(long), Cancelled)
    assert not sched.decode.rows
    after = ok(sink.wait(sample(sched, sink, [SampleRequest(None, [4], 1, SamplingParams(max_tokens=3))])))
    assert len(after[0].sequences[0].tokens) <= 3


def test_stop_strings_are_checked_incrementally(smol_engine):
    sched = Scheduler(smol_engine, smol_engine.base)
    sched.start()
    sink = FakeSink()
    prompt = smol_engine.base.tokenizer.encode("Count: one, two, three, four,")
    try:
        free = ok(sink.wait(sample(sched, sink, [SampleRequest(None, prompt, 1, SamplingParams(
            max_tokens=12, temperature=0, stop_token_ids=()))])))[0].sequences[0]
        text = smol_engine.base.tokenizer.decode(free.tokens)
        stop = text.strip()[:3]
        got = ok(sink.wait(sample(sched, sink, [SampleRequest(None, prompt, 1, SamplingParams(
            max_tokens=12, temperature=0, stop_token_ids=(), stop_strings=(stop,)))])))[0].sequences[0]
    finally:
        sched.stop()
    assert got.stop_reason == "stop" and stop in smol_engine.base.tokenizer.decode(got.tokens)
    assert stop not in smol_engine.base.tokenizer.decode(got.tokens[:-1])
    assert got.tokens == free.tokens[: len(got.tokens)]


# ---- training interleaved with decoding -----------------------------------------------------


def test_training_and_decoding_both_progress_under_load_of_the_other(paths):
    """A stream of long samples keeps decoding while a big fused batch trains in micro-batches:
    tokens arrive between micro-batches, and training finishes while sampling still runs."""
    engine = RecordingEngine(load_base("lorafleet/tiny-llama", paths))
    sched = Scheduler(engine, engine.base, micro_batch_tokens=3)
    sched.start()
    sink = FakeSink()
    try:
        create(sched, sink, "a")
        decoding = sample(sched, sink, [SampleRequest(None, [1, 2, 3], 2,
                                                      SamplingParams(max_tokens=1500, stop_token_ids=()))])
        while id(decoding) not in sink.tokens:
            time.sleep(0.005)
        before = len(sink.tokens[id(decoding)])
        train = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(9, n=40))
        ok(sink.wait(train))
        during = len(sink.tokens[id(decoding)]) - before
        assert id(decoding) not in sink.outcomes  # training finished under sustained decoding
        micro = sched.stats["micro_batches"]
        assert micro == 40
        assert during >= micro  # at least one decode step (2 rows) per micro-batch
        decoding.cancel()
        sink.wait(decoding)
    finally:
        sched.stop()


def test_sampling_runs_while_a_training_micro_batch_is_in_progress(rig):
    """The two lanes: with the training lane held inside a forward_backward, a sample job is
    admitted, decoded and answered (one thread for both would wait for the micro-batch), and
    the training job completes once released, with its run's gradient."""
    sched, engine, sink = rig
    create(sched, sink, "a")
    engine.gate.clear()
    try:
        train = submit(sched, sink, WorkKind.FORWARD_BACKWARD, "a", 1, fwdbwd(5, n=2))
        assert engine.entered.wait(30)
        params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=())
        job = sample(sched, sink, [SampleRequest(None, [1, 2, 3], 1, params)])
        out = ok(sink.wait(job, timeout=30))
        assert len(out[0].sequences[0].tokens) == 8 and id(train) not in sink.outcomes
        # the held training lane is pending and not progressing; the decode lane may still be
        # finishing the step that answered the sample (busy) for a moment
        deadline = time.monotonic() + 10
        while (health := sched.health(stall_s=0.0))["stalled_lanes"] != ["engine-train-lorafleet/tiny-llama"] \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health["stalled_lanes"] == ["engine-train-lorafleet/tiny-llama"] and not health["ok"]
    finally:
        engine.gate.set()
    ok(sink.wait(train))
    assert engine.has_grads(sched.runs["a"].handle)
    assert sched.health(stall_s=60.0)["ok"]


def test_the_engine_imports_nothing_from_the_api():
    import ast
    from pathlib import Path

    import lorafleet.engine

    for path in Path(lorafleet.engine.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("lorafleet.api") for n in names), f"{path.name} imports {names}"


def test_submit_all_queues_a_mixed_batch_together_or_not_at_all(rig):
    """9 adapters' jobs queued at once decode as one batch: one prefill forward for their
    same-length prompts, about max_tokens decode steps (not 9 x), and each row's tokens are its
    adapter's alone; a queue without room for all of them takes none (NoCapacity)."""
    sched, _, sink = rig
    params = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=())
    jobs = [Job(WorkKind.SAMPLE, Sample([SampleRequest(None, [1, 2, 3 + i], 1, params)],
                                        lease(sched, f"m{i}", seed=i)), sink) for i in range(9)]
    steps, chunks = sched.stats["steps"], sched.stats["prefill_chunks"]
    sched.submit_all(jobs)
    outs = [ok(sink.wait(j))[0] for j in jobs]
    assert all(len(o.sequences[0].tokens) == 6 for o in outs)
    assert sched.stats["steps"] - steps <= 6 + 1
    assert sched.stats["prefill_chunks"] - chunks == 1  # 9 same-length prompts: one forward
    alone = []  # each row went through its own adapter (jobs kept alive: the sink keys by id)
    for i, job in enumerate(jobs):
        alone.append(sample(sched, sink, [job.payload.requests[0]], f"m{i}", seed=i))
        ok(sink.wait(alone[-1]))
    assert [ok(sink.wait(j))[0].sequences[0].tokens for j in alone] == [o.sequences[0].tokens for o in outs]
    sched.max_sample_queue = 2
    more = [Job(WorkKind.SAMPLE, Sample([SampleRequest(None, [1, 2], 1, params)]), sink) for _ in range(3)]
    with pytest.raises(NoCapacity, match="room for 2 more requests, not 3"):
        sched.submit_all(more)
    assert len(sched.samples) == 0
