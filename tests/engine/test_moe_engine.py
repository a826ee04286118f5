"""Expert LoRA in the engine: fused training on every loss, mixed-adapter sampling, routing replay."""

import pytest
import torch

from lorafleet.engine import SampleRequest, SamplingParams
from lorafleet.errors import IncompatibleAdapter, InvalidRequest
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.train.types import AdamParams, Datum, FwdBwdRequest
from tests.helpers import assert_fused_equals_separate, random_adapter, random_datum

EXPERTS = ("gate_proj", "up_proj", "down_proj")
SPECS = [
    LoraSpec(rank=4, alpha=8, target_modules=(*EXPERTS, "gate", "q_proj", "o_proj")),
    LoraSpec(rank=2, alpha=8, target_modules=("up_proj", "down_proj", "v_proj")),
    LoraSpec(rank=8, alpha=4, target_modules=("gate_proj", "gate"), use_rslora=True),
]
PROMPT = [1, 504, 2823, 314, 4544]


@pytest.fixture(scope="module")
def moe_engine(paths):
    """One tiny-moe engine for the module (tests add their own adapters)."""
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    return Engine(load_base("lorafleet/tiny-moe", paths))


@pytest.fixture(scope="module")
def top1_engine(paths):
    """A 2-layer Qwen3-MoE with a top-1 router: the output depends on the router only via the choice."""
    from lorafleet.engine import Engine
    from lorafleet.model.registry import _tiny_moe_config, load_base_from_config

    cfg = _tiny_moe_config() | {"num_hidden_layers": 2, "num_experts_per_tok": 1}
    return Engine(load_base_from_config("test/tiny-moe-top1", cfg, paths))


@pytest.mark.parametrize("loss", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"])
def test_fused_expert_lora_gradients_equal_separate_runs(moe_engine, loss):
    e = moe_engine
    handles = [e.create_adapter(s, weights=random_adapter(e.info, s, seed=i, b_scale=0.2)) for i, s in enumerate(SPECS)]
    reqs = [FwdBwdRequest(h, [random_datum(10 * i + j, 5 + 2 * j + i, loss) for j in range(2)], loss) for i, h in enumerate(handles)]
    _, fused_grads = assert_fused_equals_separate(e, handles, reqs, rtol=1e-3, atol=1e-5)
    # every expert-LoRA tensor that saw a token got a gradient (experts hit, router, attention)
    live = e._live(handles[0]).weights.pairs
    assert live["model.layers.0.mlp.experts.down_proj"][1].ndim == 3
    assert fused_grads[0][0].abs().sum() > 0
    for h in handles:
        e.remove_adapter(h)


def test_fused_batches_with_replayed_and_fresh_routes_equal_separate_runs(moe_engine):
    e = moe_engine
    handles = [e.create_adapter(s, weights=random_adapter(e.info, s, seed=20 + i, b_scale=0.2)) for i, s in enumerate(SPECS[:2])]
    g = torch.Generator().manual_seed(5)

    def routes(n):  # distinct expert ids per token, as a router would choose
        return torch.stack([torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(n)]) for _ in range(4)])

    data = [random_datum(40 + j, 6 + j, "ppo") for j in range(3)]
    data[0] = Datum(data[0].tokens, data[0].loss_inputs, routes=routes(6))
    data[2] = Datum(data[2].tokens, data[2].loss_inputs, routes=routes(8))
    reqs = [FwdBwdRequest(handles[0], data[:2], "ppo"), FwdBwdRequest(handles[1], data[1:], "ppo")]
    fused, _ = assert_fused_equals_separate(e, handles, reqs, rtol=1e-3, atol=1e-5)
    (fresh,) = e.forward_backward([FwdBwdRequest(handles[0], data[:1], "ppo", forward_only=True, replay_routes=False)])
    assert (fresh.outputs[0]["logprobs"] - fused[0].outputs[0]["logprobs"]).abs().max() > 1e-3  # replay mattered
    for h in handles:
        e.remove_adapter(h)


def test_expert_lora_trains_and_loss_falls(moe_engine):
    e = moe_engine
    h = e.create_adapter(LoraSpec(rank=4, alpha=32, target_modules=(*EXPERTS, "gate")), seed=0)
    data = [Datum(d.tokens, {"target_tokens": d.loss_inputs["target_tokens"]}) for d in (random_datum(s, 12, "cross_entropy") for s in range(3))]
    (first,) = e.forward_backward([FwdBwdRequest(h, data)])
    for _ in range(6):
        e.optim_step(h, AdamParams(learning_rate=1e-2))
        e.forward_backward([FwdBwdRequest(h, data)])
    e.discard_grads(h)
    (after,) = e.forward_backward([FwdBwdRequest(h, data, forward_only=True)])
    assert after.metrics["loss:sum"] < first.metrics["loss:sum"] * 0.9
    w = e.get_weights(h).pairs
    assert w["model.layers.1.mlp.experts.gate_proj"][1].abs().max() > 0  # the experts' B moved from 0
    assert w["model.layers.1.mlp.gate"][1].abs().max() > 0  # and the router's
    e.remove_adapter(h)


def _forward_logprobs(engine, handle, prompt, completion, routes=None, replay=True):
    seq = torch.tensor(prompt + completion)
    datum = Datum(seq[:-1], {"target_tokens": seq[1:]}, routes=routes)
    (res,) = engine.forward_backward([FwdBwdRequest(handle, [datum], forward_only=True, replay_routes=replay)])
    return res.outputs[0]["logprobs"][len(prompt) - 1:]


def test_mixed_adapter_sampling_logprobs_equal_forward(moe_engine):
    e = moe_engine
    a, b = (e.create_adapter(s, weights=random_adapter(e.info, s, seed=i, b_scale=0.5)) for i, s in enumerate(SPECS[:2]))
    zero = e.create_adapter(LoraSpec(rank=1, target_modules=("q_proj",)), seed=0)  # B = 0: the base
    reqs = [
        SampleRequest(a, PROMPT, 2, SamplingParams(max_tokens=7, seed=1), record_routes=True),
        SampleRequest(None, PROMPT[:3], 1, SamplingParams(max_tokens=5, temperature=0.7, seed=2)),
        SampleRequest(b, PROMPT[1:], 1, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=()), record_routes=True),
    ]
    results = e.sample(reqs)
    for req, res in zip(reqs, results):
        for seq in res.sequences:
            handle = req.adapter if req.adapter is not None else zero
            want = _forward_logprobs(e, handle, req.prompt, seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), want, rtol=1e-4, atol=1e-4)
            if req.record_routes:
                n = len(req.prompt) + len(seq.tokens) - 1
                assert seq.routes.shape == (e.info.num_layers, n, e.info.experts_per_token)
                torch.testing.assert_close(  # replaying the sampler's own routes changes nothing
                    _forward_logprobs(e, handle, req.prompt, seq.tokens, seq.routes), want, rtol=1e-5, atol=1e-5)
            else:
                assert seq.routes is None
    (alone,) = e.sample([SampleRequest(b, PROMPT[1:], 1, reqs[2].params)])
    assert alone.sequences[0].tokens == results[2].sequences[0].tokens  # rows do not leak into each other
    for h in (a, b, zero):
        e.remove_adapter(h)


def test_routing_replay_keeps_sampling_logprobs_after_the_router_changed(top1_engine):
    """R3: sample with router LoRA v1, then change the router LoRA. With a top-1 router the
    routing weight is 1 whatever the router says, so replaying the recorded experts must give
    back the sampling logprobs exactly, while routing afresh picks other experts and does not."""
    e = top1_engine
    spec = LoraSpec(rank=4, alpha=8, target_modules=(*EXPERTS, "gate", "q_proj"))
    v1 = random_adapter(e.info, spec, seed=3, b_scale=0.5)
    h = e.create_adapter(spec, weights=v1)
    (res,) = e.sample([SampleRequest(h, PROMPT, 2, SamplingParams(max_tokens=10, seed=7, stop_token_ids=()), record_routes=True)])
    g = torch.Generator().manual_seed(99)
    v2 = LoraWeights(spec, {p: (a, torch.randn(b.shape, generator=g) * 3.0 if p.endswith(".mlp.gate") else b)
                            for p, (a, b) in v1.pairs.items()})
    e.set_weights(h, v2)
    for seq in res.sequences:
        sampled = torch.tensor(seq.logprobs)
        replayed = _forward_logprobs(e, h, PROMPT, seq.tokens, seq.routes)
        fresh = _forward_logprobs(e, h, PROMPT, seq.tokens, seq.routes, replay=False)
        torch.testing.assert_close(replayed, sampled, rtol=1e-5, atol=1e-5)
        assert (fresh - sampled).abs().max() > 1e-2  # without replay the ratio compares other experts
    e.remove_adapter(h)


def test_bad_routes_and_expert_shapes_are_refused(moe_engine, tiny_engine):
    e = moe_engine
    h = e.create_adapter(SPECS[1], seed=0)
    toks = torch.tensor([1, 2, 3])
    bad = [
        (torch.zeros(4, 2, 2, dtype=torch.int64), "shape \\(4, 3, 2\\)"),
        (torch.zeros(4, 3, 2), "integer expert ids"),
        (torch.full((4, 3, 2), 16), "expert ids in \\[0, 16\\)"),
    ]
    for routes, msg in bad:
        with pytest.raises(InvalidRequest, match=msg):
            e.forward_backward([FwdBwdRequest(h, [Datum(toks, {"target_tokens": toks}, routes=routes)])])
    assert not e.has_grads(h)
    th = tiny_engine.create_adapter(LoraSpec(rank=2), seed=0)
    with pytest.raises(InvalidRequest, match="not a mixture of experts"):
        tiny_engine.forward_backward([FwdBwdRequest(th, [Datum(toks, {"target_tokens": toks}, routes=torch.zeros(2, 3, 2, dtype=torch.int64))])])
    with pytest.raises(InvalidRequest, match="not a mixture of experts"):
        tiny_engine.sample([SampleRequest(None, PROMPT, 1, record_routes=True)])
    spec = LoraSpec(rank=2, target_modules=("up_proj",))
    w = random_adapter(e.info, spec, seed=1)
    short = LoraWeights(spec, {p: (a[:15], b[:15]) for p, (a, b) in w.pairs.items()})
    with pytest.raises(IncompatibleAdapter, match="has 15 experts but lorafleet/tiny-moe has 16"):
        e.create_adapter(spec, weights=short)
    with pytest.raises(IncompatibleAdapter, match="do not exist on lorafleet/tiny-llama"):
        tiny_engine.create_adapter(LoraSpec(rank=2, target_modules=("gate",)), seed=0)
    e.remove_adapter(h)


@pytest.mark.parametrize("layout", ["per_expert", "packed"])
def test_trained_moe_adapter_exports_and_reloads_identically(moe_engine, tmp_path, layout):
    from lorafleet.lora.io import read_peft_dir, write_peft_dir

    e = moe_engine
    spec = LoraSpec(rank=2, alpha=16.0, target_modules=("q_proj", *EXPERTS, "gate"))
    h = e.create_adapter(spec, seed=1)
    data = [random_datum(s, 9, "cross_entropy") for s in range(2)]
    for _ in range(2):
        e.forward_backward([FwdBwdRequest(h, data)])
        e.optim_step(h, AdamParams(learning_rate=1e-2))
    write_peft_dir(e.get_weights(h), e.info.name, tmp_path / layout, layout=layout)
    back = read_peft_dir(tmp_path / layout)
    h2 = e.create_adapter(back.spec, weights=back.weights)
    trained, loaded = e.get_weights(h).pairs, e.get_weights(h2).pairs
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[p][i], loaded[p][i]) for p in trained for i in (0, 1))
    # tensors given in the engine's key order keep it, so positional optimizer state resumes
    e.set_tensors(h2, e.get_tensors(h))
    assert list(e.get_weights(h2).pairs) == list(trained)
    e.load_optimizer_state(h2, e.optimizer_state(h))
    p = SamplingParams(max_tokens=6, seed=3)
    first, second = e.sample([SampleRequest(h, PROMPT, 1, p), SampleRequest(h2, PROMPT, 1, p)])
    assert first.sequences[0].tokens == second.sequences[0].tokens
    for handle in (h, h2):
        e.remove_adapter(handle)


def test_scheduler_decoding_equals_the_reference_on_moe(moe_engine):
    """Expert LoRA from the slot buffers, chunked prefill and recorded routes through the
    continuous-batching scheduler: the same tokens, logprobs and routes as `engine.sample`."""
    from dataclasses import replace

    from lorafleet.engine.decode import Budgets
    from lorafleet.engine.jobs import Job, Sample, WorkKind
    from lorafleet.engine.scheduler import Scheduler
    from tests.engine.test_scheduler import FakeSink

    e = moe_engine
    ws = [random_adapter(e.info, s, seed=i, b_scale=0.5) for i, s in enumerate(SPECS[:2])]
    reqs = [SampleRequest(None, PROMPT * 3, 2, SamplingParams(max_tokens=7, seed=1), record_routes=True),
            SampleRequest(None, PROMPT[1:], 1, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=()),
                          record_routes=True)]
    handles = [e.create_adapter(w.spec, weights=w) for w in ws]
    want = e.sample([replace(r, adapter=h) for r, h in zip(reqs, handles)])
    for h in handles:
        e.remove_adapter(h)
    sched = Scheduler(e, e.base, budgets=Budgets(max_num_batched_tokens=5))
    sink = FakeSink()
    for i, w in enumerate(ws):
        sched.residency.add_host(f"m{i}", w)
    sched.start()
    try:
        jobs = []
        for i, r in enumerate(reqs):
            jobs.append(Job(WorkKind.SAMPLE, Sample([r], sched.residency.acquire(f"m{i}")), sink))
            sched.submit(jobs[-1])
        got = [sink.wait(j)[0] for j in jobs]
    finally:
        sched.stop()
    for g, w in zip(got, want):
        for a, b in zip(g.sequences, w.sequences):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)
            assert torch.equal(a.routes, b.routes)
