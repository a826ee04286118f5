"""Every supported architecture, as a tiny random model folder loaded through `load_base(FOLDER)`:
LoRA sites found from its modules, PEFT logit equality, fused training = separate runs,
sampled logprobs = forward, export / import round trip."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine import Engine, SampleRequest, SamplingParams
from lorafleet.engine.batch import row_operands
from lorafleet.lora.io import parse_peft_files, peft_files, peft_param_files, read_peft_dir, write_peft_dir
from lorafleet.lora.spec import ATTN_MODULES, LoraSpec
from lorafleet.model import smollm2
from lorafleet.model.registry import folder_digest, load_base
from lorafleet.train.types import Datum, FwdBwdRequest
from tests.helpers import assert_fused_equals_separate, random_adapter, random_datum
from tests.model.families import FAMILIES, save_family

TOKENS = torch.tensor([[1, 504, 2823, 314, 4544, 30, 2, 17, 905, 44]])
PROMPT = [1, 504, 2823, 314, 4544]
# the LoRA targets each family must offer (discovered from its modules)
EXPECTED = {
    "phi3": ("o_proj", "qkv_proj", "down_proj", "gate_up_proj"),
    "deepseek_v2": ("q_proj", "o_proj", "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                    "gate_proj", "up_proj", "down_proj"),
}
ROUTER = {"qwen2_moe", "qwen3_moe", "olmoe", "mixtral"}  # plain softmax routers: router LoRA and replay
# PEFT 0.21 rewrites `gate_proj`/`up_proj` targets on these types into its fused-expert form
# (v4 -> v5 conversion) even where they name dense or shared-expert Linears, so it cannot load an
# MLP adapter of a mixed dense/MoE stack; their PEFT check covers attention (MLA) only. Their
# experts run the same kernel as Qwen3-MoE / OLMoE / Mixtral, which PEFT checks in full.
# gpt-oss: PEFT's fused-expert form assumes the [gate; up] untransposed layout. The experts of
# both are checked against the adapter merged into the base weights instead.
PEFT_ATTENTION_ONLY = {"deepseek_v2", "deepseek_v3", "gpt_oss"}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def folders(tmp_path_factory, paths):
    tok = smollm2.tokenizer_dir(paths.models_dir)
    root = tmp_path_factory.mktemp("families")
    return {f: save_family(f, root / f, tok) for f in FAMILIES}


@pytest.fixture(scope="session")
def engines(folders, paths):
    cache: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in cache:
            cache[family] = Engine(load_base(str(folders[family]), paths))
        return cache[family]

    return get


def _logits(engine, handle, tokens=TOKENS):
    slots = [engine._live(handle).weights]
    ops = row_operands(slots, torch.arange(1), engine.base.dtype)
    with torch.no_grad(), engine.runtime.use(ops):
        return engine.base.model(input_ids=tokens).logits


def _no_router(engine) -> tuple[str, ...]:
    return tuple(m for m in engine.info.lora_modules if m != "gate")


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_found_from_the_modules(family, engines, folders):
    e = engines(family)
    info = e.info
    assert info.name == str(folders[family].resolve()) and info.arch == family
    assert e.base.digest == folder_digest(folders[family])
    want = EXPECTED.get(family, LLAMA_TARGETS) + (("gate",) if family in ROUTER else ())
    assert info.lora_modules == want
    assert info.is_moe == ("num_experts_per_tok" in FAMILIES[family])
    # every site's shape is the loaded module's
    for path, site in info.sites.items():
        module = e.base.model.get_submodule(path.rsplit(".", 1)[0] if site.experts else path)
        if site.experts:
            assert site.experts == 4
        else:
            assert tuple(module.weight.shape) == (site.out_features, site.in_features), path
    assert info.num_parameters == sum(p.numel() for p in e.base.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_on_every_target_gives_peft_logits(family, engines, folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    e = engines(family)
    targets = _no_router(e)
    if family in PEFT_ATTENTION_ONLY:
        targets = tuple(m for m in targets if m in ATTN_MODULES)
    spec = LoraSpec(rank=4, alpha=8, target_modules=targets)
    h = e.create_adapter(spec, weights=random_adapter(e.info, spec, seed=1, b_scale=0.2))
    files = (peft_param_files if e.info.is_moe else peft_files)(e.get_weights(h), e.info.name)
    (tmp_path / "a").mkdir()
    for name, data in files.items():
        (tmp_path / "a" / name).write_bytes(data)
    hf = AutoModelForCausalLM.from_pretrained(str(folders[family]), dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf(input_ids=TOKENS).logits
        theirs = PeftModel.from_pretrained(hf, str(tmp_path / "a"))(input_ids=TOKENS).logits
    ours = _logits(e, h)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter really does something
    e.remove_adapter(h)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_training_equals_separate_runs(family, engines):
    e = engines(family)
    targets = e.info.lora_modules
    specs = [LoraSpec(rank=4, alpha=8, target_modules=targets),
             LoraSpec(rank=2, alpha=4, target_modules=targets[1:3] + targets[-2:])]
    handles = [e.create_adapter(s, weights=random_adapter(e.info, s, seed=i)) for i, s in enumerate(specs)]
    reqs = [FwdBwdRequest(h, [random_datum(10 + i, 7), random_datum(20 + i, 5)]) for i, h in enumerate(handles)]
    _, fused_grads = assert_fused_equals_separate(e, handles, reqs, rtol=1e-3, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in fused_grads[0][1::2][:2])  # lora_B got gradients
    for h in handles:
        e.remove_adapter(h)


def _forward_logprobs(engine, handle, prompt, completion):
    seq = torch.tensor(prompt + completion)
    (res,) = engine.forward_backward([FwdBwdRequest(handle, [Datum(seq[:-1], {"target_tokens": seq[1:]})],
                                                    forward_only=True)])
    return res.outputs[0]["logprobs"][len(prompt) - 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_forward(family, engines):
    e = engines(family)
    spec = LoraSpec(rank=4, alpha=8, target_modules=_no_router(e))
    h = e.create_adapter(spec, weights=random_adapter(e.info, spec, seed=3, b_scale=0.3))
    reqs = [SampleRequest(h, PROMPT, 2, SamplingParams(max_tokens=6, seed=1, stop_token_ids=())),
            SampleRequest(h, PROMPT[:3], 1, SamplingParams(max_tokens=5, temperature=0, stop_token_ids=()))]
    for req, res in zip(reqs, e.sample(reqs)):
        for seq in res.sequences:
            want = _forward_logprobs(e, h, req.prompt, seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), want, rtol=1e-4, atol=1e-4)
    e.remove_adapter(h)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_import_round_trip(family, engines, tmp_path):
    e = engines(family)
    spec = LoraSpec(rank=3, alpha=6, target_modules=e.info.lora_modules)
    h = e.create_adapter(spec, weights=random_adapter(e.info, spec, seed=5))
    w = e.get_weights(h)
    write_peft_dir(w, e.info.name, tmp_path / "x")
    back = read_peft_dir(tmp_path / "x")
    assert back.spec == spec and back.base_model == e.info.name
    layouts = ("per_expert", "packed") if e.info.is_moe else ("per_expert",)
    for again in [back.weights, *(parse_peft_files(peft_files(w, e.info.name, layout=x)).weights for x in layouts)]:
        assert set(again.pairs) == set(w.pairs)
        for p, (a, b) in w.pairs.items():
            assert torch.equal(again.pairs[p][0], a) and torch.equal(again.pairs[p][1], b)
    h2 = e.create_adapter(spec, weights=back.weights)
    assert torch.equal(_logits(e, h), _logits(e, h2))
    e.remove_adapter(h)
    e.remove_adapter(h2)


def _merge_experts(hf, weights, spec) -> None:
    """Add scale * B[e] @ A[e] of every routed-expert LoRA into the fused base tensors of `hf`."""
    with torch.no_grad():
        for path, (a, b) in weights.pairs.items():
            if a.ndim != 3:
                continue
            experts = hf.get_submodule(path.rsplit(".", 1)[0])
            delta = spec.scale * b @ a  # [E, out, in]
            proj = path.rsplit(".", 1)[1]
            up = int(proj == "up_proj")
            if getattr(experts, "gate_up_proj_bias", None) is not None:  # gpt-oss: [E, H, 2I] interleaved
                if proj == "down_proj":
                    experts.down_proj += delta.transpose(1, 2)
                else:
                    experts.gate_up_proj[:, :, up::2] += delta.transpose(1, 2)
            elif proj == "down_proj":
                experts.down_proj += delta
            else:
                inter = delta.shape[1]
                experts.gate_up_proj[:, up * inter:(up + 1) * inter] += delta


@pytest.mark.parametrize("family", [f for f in FAMILIES if "num_experts_per_tok" in FAMILIES[f]])
def test_expert_lora_equals_the_adapter_merged_into_the_experts(family, engines, folders):
    from transformers import AutoModelForCausalLM

    e = engines(family)
    spec = LoraSpec(rank=4, alpha=8, target_modules=("gate_proj", "up_proj", "down_proj"))
    w = random_adapter(e.info, spec, seed=7, b_scale=0.2)
    # routed experts only (the dense / shared-expert MLPs of a mixed stack are plain Linears)
    w = type(w)(spec, {p: ab for p, ab in w.pairs.items() if ab[0].ndim == 3})
    hf = AutoModelForCausalLM.from_pretrained(str(folders[family]), dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf(input_ids=TOKENS).logits
    _merge_experts(hf, w, spec)
    with torch.no_grad():
        merged = hf(input_ids=TOKENS).logits
    ops = row_operands([w], torch.arange(1), e.base.dtype)
    with torch.no_grad(), e.runtime.use(ops):
        ours = e.base.model(input_ids=TOKENS).logits
    assert (ours - merged).abs().max() <= 1e-4
    assert (ours - base_logits).abs().max() > 1e-3
