"""MoE adapter files: per-expert and packed layouts, lossless conversion, PEFT interop, bad files."""

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet.engine.batch import row_operands
from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora import packed
from lorafleet.lora.io import WEIGHTS_NAME, parse_peft_files, peft_files, read_peft_dir, safetensors_metadata
from lorafleet.lora.spec import LoraSpec
from tests.helpers import fresh_hf_model, random_adapter

EXPERTS = ("gate_proj", "up_proj", "down_proj")
SPEC = LoraSpec(rank=3, alpha=6.0, target_modules=("q_proj", "v_proj", *EXPERTS, "gate"))
TOKENS = torch.tensor([[1, 504, 2823, 314, 4544, 30, 2, 17, 905, 44]])
BASE = "lorafleet/tiny-moe"


@pytest.fixture(scope="module")
def moe(paths):
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    return Engine(load_base(BASE, paths))


@pytest.fixture(scope="module")
def adapter(moe):
    return random_adapter(moe.info, SPEC, seed=4, b_scale=0.3)


def _logits(engine, handles, tokens=TOKENS):
    slots = [engine._live(h).weights if h is not None else None for h in handles]
    ops = row_operands(slots, torch.arange(len(handles)), engine.base.dtype)
    with torch.no_grad(), engine.runtime.use(ops):
        return engine.base.model(input_ids=tokens.repeat(len(handles), 1)).logits


def test_layouts_tensor_counts_and_bytes(moe, adapter):
    per = st_load(peft_files(adapter, BASE)[WEIGHTS_NAME])
    pk = st_load(peft_files(adapter, BASE, layout="packed")[WEIGHTS_NAME])
    layers, n_exp = moe.info.num_layers, moe.info.num_experts
    # per layer: 2 attention + 1 router + 3 projections x (16 experts | 1 packed), x {A, B}
    assert len(per) == layers * (3 + 3 * n_exp) * 2 and len(pk) == layers * (3 + 3) * 2
    assert "base_model.model.model.layers.0.mlp.experts.15.down_proj.lora_B.weight" in per  # vLLM naming
    assert pk["base_model.model.model.layers.0.mlp.experts.down_proj.lora_B.weight"].shape == (n_exp, 128, 3)
    assert sum(t.nbytes for t in per.values()) == sum(t.nbytes for t in pk.values())


def test_round_trips_are_bit_identical_both_ways(adapter):
    per_files = peft_files(adapter, BASE)
    packed_files = peft_files(adapter, BASE, layout="packed")
    assert safetensors_metadata(packed_files[WEIGHTS_NAME])[packed.LAYOUT_KEY] == packed.PACKED_LAYOUT_V1
    from_per, from_packed = parse_peft_files(per_files), parse_peft_files(packed_files)
    # per-expert -> packed -> per-expert and packed -> per-expert -> packed: the same bytes
    assert peft_files(from_per.weights, BASE, layout="packed") == packed_files
    assert peft_files(from_packed.weights, BASE) == per_files
    assert peft_files(parse_peft_files(peft_files(from_packed.weights, BASE)).weights, BASE, layout="packed") == packed_files
    for path, (a, b) in adapter.pairs.items():
        for got in (from_per.weights.pairs[path], from_packed.weights.pairs[path]):
            assert torch.equal(got[0], a) and torch.equal(got[1], b)


def test_both_layouts_give_identical_outputs(moe, adapter):
    h_per = moe.create_adapter(SPEC, weights=parse_peft_files(peft_files(adapter, BASE)).weights)
    h_pk = moe.create_adapter(SPEC, weights=parse_peft_files(peft_files(adapter, BASE, layout="packed")).weights)
    out = _logits(moe, [h_per, h_pk, None])
    assert torch.equal(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-3
    for h in (h_per, h_pk):
        moe.remove_adapter(h)


def _mutated(files: dict[str, bytes], edit, metadata=None) -> dict[str, bytes]:
    tensors = dict(st_load(files[WEIGHTS_NAME]))
    edit(tensors)
    meta = safetensors_metadata(files[WEIGHTS_NAME]) if metadata is None else metadata
    return {**files, WEIGHTS_NAME: st_save(tensors, metadata=meta)}


K = "base_model.model.model.layers.1.mlp.experts"


@pytest.mark.parametrize(
    "layout, edit, metadata, message",
    [
        ("per_expert", lambda t: [t.pop(f"{K}.7.up_proj.lora_A.weight"), t.pop(f"{K}.7.up_proj.lora_B.weight")], None,
         r"experts\.up_proj: experts \[7\] are missing"),
        ("per_expert", lambda t: t.pop(f"{K}.3.gate_proj.lora_B.weight"), None, "lora_A and lora_B must both be present"),
        ("per_expert", lambda t: t.update({f"{K}.up_proj.lora_A.weight": torch.zeros(16, 3, 128),
                                           f"{K}.up_proj.lora_B.weight": torch.zeros(16, 64, 3)}), None, "mixes layouts"),
        ("per_expert", lambda t: None, {"format": "pt", packed.LAYOUT_KEY: packed.PACKED_LAYOUT_V1}, "mixed layouts in one file"),
        ("packed", lambda t: None, {"format": "pt", packed.LAYOUT_KEY: packed.PACKED_LAYOUT_V1, packed.EXPERTS_KEY: "8"},
         "metadata says 8 experts"),
        ("packed", lambda t: None, {"format": "pt", packed.LAYOUT_KEY: "zipped-v9"}, "unknown adapter layout"),
        ("packed", lambda t: t.update({f"{K}.gate_proj.lora_A.weight": torch.zeros(16, 2, 128)}), None, "rank 2/3"),
    ],
)
def test_bad_moe_files_are_refused(adapter, layout, edit, metadata, message):
    files = _mutated(peft_files(adapter, BASE, layout=layout), edit, metadata)
    with pytest.raises(IncompatibleAdapter, match=message):
        parse_peft_files(files)


@pytest.mark.parametrize(
    "layout, edit, message",
    [
        ("packed", lambda t: [t.update({k: v[:12]}) for k, v in list(t.items()) if ".mlp.experts." in k],
         "has 12 experts but lorafleet/tiny-moe has 16"),
        ("per_expert", lambda t: [t.pop(k) for k in list(t) if ".mlp.experts.15." in k],
         "has 15 experts but lorafleet/tiny-moe has 16"),
        ("packed", lambda t: t.update({f"{K}.down_proj.lora_A.weight": torch.zeros(16, 3, 32)}), r"do not fit lorafleet/tiny-moe"),
        ("packed", lambda t: [t.pop(k) for k in list(t) if ".layers.2.mlp.experts.gate_proj" in k], "lacks 1 of its target modules"),
    ],
)
def test_files_that_do_not_fit_the_base_are_refused(moe, adapter, layout, edit, message):
    # a packed file written by another tool, without our metadata: shapes are checked against the base
    files = _mutated(peft_files(adapter, BASE, layout=layout), edit, metadata={"format": "pt"})
    parsed = parse_peft_files(files)
    with pytest.raises(IncompatibleAdapter, match=message):
        moe.create_adapter(parsed.spec, weights=parsed.weights)


def test_attention_and_router_only_adapter_is_the_same_in_both_layouts(adapter):
    spec = LoraSpec(rank=3, alpha=6, target_modules=("q_proj", "gate"))
    from lorafleet.lora.weights import LoraWeights

    w = LoraWeights(spec, {p: ab for p, ab in adapter.pairs.items() if p.endswith(("q_proj", "mlp.gate"))})
    assert peft_files(w, BASE) == peft_files(w, BASE, layout="packed")


def _peft_trained(hf_model, tmp_path, **config):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(hf_model, LoraConfig(init_lora_weights=False, **config))
    peft.save_pretrained(str(tmp_path))
    with torch.no_grad():
        return peft(input_ids=TOKENS).logits


def test_peft_target_parameters_adapter_imports_with_peft_logits(moe, paths, tmp_path):
    """PEFT 0.21 puts LoRA on transformers' fused expert tensors via target_parameters."""
    theirs = _peft_trained(
        fresh_hf_model(BASE, paths), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    adapter = read_peft_dir(tmp_path)
    assert adapter.spec.target_modules == ("q_proj", "o_proj", *EXPERTS)
    h = moe.create_adapter(adapter.spec, weights=adapter.weights)
    ours = _logits(moe, [h, None])
    assert (ours[0] - theirs[0]).abs().max() <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    # and its export round-trips through both of our layouts unchanged
    w = moe.get_weights(h)
    assert parse_peft_files(peft_files(w, BASE, layout="packed")).weights.pairs.keys() == w.pairs.keys()
    moe.remove_adapter(h)


def test_shared_expert_gets_one_lora_and_matches_peft(paths, tmp_path):
    """Qwen2-MoE has a shared expert: one LoRA on it, one per routed expert, as PEFT does."""
    from lorafleet.engine import Engine
    from lorafleet.model.registry import _tiny_moe_config, load_base_from_config

    cfg = _tiny_moe_config() | {"model_type": "qwen2_moe", "num_hidden_layers": 2, "shared_expert_intermediate_size": 96}
    cfg.pop("head_dim")
    base = load_base_from_config("test/tiny-qwen2-moe", cfg, paths)
    hf = load_base_from_config("test/tiny-qwen2-moe", cfg, paths).model
    theirs = _peft_trained(
        hf, tmp_path, r=2, lora_alpha=4, target_modules=["v_proj", *EXPERTS],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    adapter = read_peft_dir(tmp_path)
    shared = [p for p in adapter.weights.pairs if ".shared_expert." in p]
    assert sorted(shared) == sorted(f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in EXPERTS)
    assert all(adapter.weights.pairs[p][0].ndim == 2 for p in shared)
    engine = Engine(base)
    h = engine.create_adapter(adapter.spec, weights=adapter.weights)
    ours = _logits(engine, [h])
    assert (ours[0] - theirs[0]).abs().max() <= 1e-4
    cfg_json = json.loads(peft_files(engine.get_weights(h), "test/tiny-qwen2-moe")["adapter_config.json"])
    assert cfg_json["target_modules"] == ["v_proj", *EXPERTS]
    # and back out in PEFT's own form: PEFT loads it with the same logits
    from peft import PeftModel

    from lorafleet.lora.io import peft_param_files

    (tmp_path / "out").mkdir()
    for name, data in peft_param_files(engine.get_weights(h), "test/tiny-qwen2-moe").items():
        (tmp_path / "out" / name).write_bytes(data)
    again = PeftModel.from_pretrained(load_base_from_config("test/tiny-qwen2-moe", cfg, paths).model, str(tmp_path / "out"))
    with torch.no_grad():
        assert (again(input_ids=TOKENS).logits[0] - ours[0]).abs().max() <= 1e-4


def test_attention_lora_on_a_moe_base_exports_to_peft(moe, paths, tmp_path):
    """The part of a MoE adapter PEFT 0.21 can load from our export: attention projections."""
    from peft import PeftModel

    from lorafleet.lora.io import write_peft_dir

    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    h = moe.create_adapter(spec, weights=random_adapter(moe.info, spec, seed=6, b_scale=0.3))
    write_peft_dir(moe.get_weights(h), BASE, tmp_path / "a", layout="packed")  # no experts: same bytes
    peft = PeftModel.from_pretrained(fresh_hf_model(BASE, paths), str(tmp_path / "a"))
    with torch.no_grad():
        theirs = peft(input_ids=TOKENS).logits
    ours = _logits(moe, [h, None])
    assert (ours[0] - theirs[0]).abs().max() <= 1e-4 and (ours[0] - ours[1]).abs().max() > 1e-3
    moe.remove_adapter(h)


@pytest.mark.parametrize("targets", [("q_proj", *EXPERTS), ("v_proj", "up_proj", "down_proj")])
def test_expert_adapter_exports_in_peft_target_parameters_form(moe, paths, tmp_path, targets):
    """PEFT 0.21 loads our expert LoRA through target_parameters (gate+up fused at rank 2r)."""
    from peft import PeftModel

    from lorafleet.lora.io import peft_param_files

    spec = LoraSpec(rank=3, alpha=6.0, target_modules=targets)
    h = moe.create_adapter(spec, weights=random_adapter(moe.info, spec, seed=8, b_scale=0.3))
    files = peft_param_files(moe.get_weights(h), BASE)
    (tmp_path / "p").mkdir()
    for name, data in files.items():
        (tmp_path / "p" / name).write_bytes(data)
    peft = PeftModel.from_pretrained(fresh_hf_model(BASE, paths), str(tmp_path / "p"))
    with torch.no_grad():
        theirs = peft(input_ids=TOKENS).logits
    ours = _logits(moe, [h, None])
    assert (ours[0] - theirs[0]).abs().max() <= 1e-4 and (ours[0] - ours[1]).abs().max() > 1e-3
    back = parse_peft_files(files)  # and it imports again, as the same function
    h2 = moe.create_adapter(back.spec, weights=back.weights)
    assert (_logits(moe, [h2])[0] - ours[0]).abs().max() <= 1e-5
    for handle in (h, h2):
        moe.remove_adapter(handle)
    with pytest.raises(IncompatibleAdapter, match="router"):
        peft_param_files(random_adapter(moe.info, SPEC, seed=1), BASE)
