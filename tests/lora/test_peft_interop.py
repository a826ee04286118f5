"""Same adapter, same logits in PEFT and in lorafleet (fp32, max abs diff <= 1e-4)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafleet.engine.batch import row_operands
from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora.io import parse_peft_files, peft_files, read_peft_dir, write_peft_dir
from lorafleet.lora.spec import LoraSpec
from tests.helpers import fresh_hf_model, random_adapter

TOKENS = torch.tensor([[1, 504, 2823, 314, 4544, 30, 2, 17, 905, 44]])


def engine_logits(engine, rows: list[int | None], tokens):
    """Logits of a batch whose row i uses adapter handle rows[i] (None = base)."""
    slots = [engine._live(h).weights if h is not None else None for h in rows]
    ops = row_operands(slots, torch.arange(len(rows)), engine.base.dtype)
    with torch.no_grad(), engine.runtime.use(ops):
        return engine.base.model(input_ids=tokens).logits


def peft_logits(hf_model, adapter_dir, tokens):
    peft = PeftModel.from_pretrained(hf_model, str(adapter_dir))
    with torch.no_grad():
        return peft(input_ids=tokens).logits


@pytest.mark.parametrize(
    "spec",
    [
        LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        LoraSpec(rank=3, alpha=7, target_modules=("gate_proj", "down_proj", "v_proj")),
        LoraSpec(rank=16, alpha=8, use_rslora=True),
    ],
)
def test_exported_adapter_gives_peft_logits(tiny_engine, paths, tmp_path, spec):
    w = random_adapter(tiny_engine.info, spec, seed=3)
    h = tiny_engine.create_adapter(spec, weights=w)
    write_peft_dir(tiny_engine.get_weights(h), tiny_engine.info.name, tmp_path / "a")
    ours = engine_logits(tiny_engine, [h], TOKENS)
    theirs = peft_logits(fresh_hf_model("lorafleet/tiny-llama", paths), tmp_path / "a", TOKENS)
    assert (ours - theirs).abs().max() <= 1e-4
    base = engine_logits(tiny_engine, [None], TOKENS)
    assert (ours - base).abs().max() > 1e-3  # the adapter really does something


def test_mixed_batch_rows_match_peft_per_adapter(tiny_engine, paths, tmp_path):
    specs = [LoraSpec(rank=4, alpha=8), LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))]
    handles = []
    for i, spec in enumerate(specs):
        h = tiny_engine.create_adapter(spec, weights=random_adapter(tiny_engine.info, spec, seed=i))
        write_peft_dir(tiny_engine.get_weights(h), tiny_engine.info.name, tmp_path / f"a{i}")
        handles.append(h)
    rows = [handles[0], None, handles[1], handles[0]]
    batch = TOKENS.repeat(4, 1)
    ours = engine_logits(tiny_engine, rows, batch)
    hf = fresh_hf_model("lorafleet/tiny-llama", paths)
    peft = PeftModel.from_pretrained(hf, str(tmp_path / "a0"), adapter_name="a0")
    peft.load_adapter(str(tmp_path / "a1"), adapter_name="a1")
    with torch.no_grad():
        theirs = peft(input_ids=batch, adapter_names=["a0", "__base__", "a1", "a0"]).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_import_adapter_trained_by_peft(tiny_engine, paths, tmp_path):
    hf = fresh_hf_model("lorafleet/tiny-llama", paths)
    cfg = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    peft = get_peft_model(hf, cfg)
    peft.save_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        theirs = peft(input_ids=TOKENS).logits
    adapter = read_peft_dir(tmp_path / "p")
    assert adapter.spec == LoraSpec(rank=6, alpha=12, target_modules=("q_proj", "up_proj"))
    h = tiny_engine.create_adapter(adapter.spec, weights=adapter.weights)
    assert (engine_logits(tiny_engine, [h], TOKENS) - theirs).abs().max() <= 1e-4


def test_smollm2_adapter_matches_peft(paths, tmp_path, smol_engine):
    spec = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    h = smol_engine.create_adapter(spec, weights=random_adapter(smol_engine.info, spec, seed=5, b_scale=0.02))
    write_peft_dir(smol_engine.get_weights(h), smol_engine.info.name, tmp_path / "s")
    ours = engine_logits(smol_engine, [h, None], TOKENS.repeat(2, 1))
    theirs = peft_logits(fresh_hf_model("HuggingFaceTB/SmolLM2-135M-Instruct", paths), tmp_path / "s", TOKENS)
    assert (ours[0] - theirs[0]).abs().max() <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_peft_files_are_canonical_and_round_trip(tiny_engine):
    spec = LoraSpec(rank=2, target_modules=("o_proj",))
    w = random_adapter(tiny_engine.info, spec, seed=1)
    files = peft_files(w, "lorafleet/tiny-llama")
    assert files == peft_files(w.clone(), "lorafleet/tiny-llama")
    back = parse_peft_files(files)
    assert back.spec == spec and back.base_model == "lorafleet/tiny-llama"
    for p, (a, b) in w.pairs.items():
        assert torch.equal(back.weights.pairs[p][0], a) and torch.equal(back.weights.pairs[p][1], b)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.pop("adapter_config.json"), "missing adapter_config.json"),
        (lambda f: f.pop("adapter_model.safetensors"), "missing adapter_model.safetensors"),
        (lambda f: f.__setitem__("adapter_config.json", b"{not json"), "not valid JSON"),
        (lambda f: f.__setitem__("adapter_model.safetensors", b"garbage"), "not a readable safetensors"),
    ],
)
def test_broken_peft_files_are_refused(tiny_engine, mutate, message):
    files = peft_files(random_adapter(tiny_engine.info, LoraSpec(rank=2), seed=1), "lorafleet/tiny-llama")
    mutate(files)
    with pytest.raises(IncompatibleAdapter, match=message):
        parse_peft_files(files)


def test_adapter_that_does_not_fit_the_base_is_refused(tiny_engine, smol_engine):
    spec = LoraSpec(rank=4, target_modules=("q_proj",))
    smol_w = random_adapter(smol_engine.info, spec, seed=1)
    with pytest.raises(IncompatibleAdapter, match="do not fit"):
        tiny_engine.create_adapter(spec, weights=smol_w)
    with pytest.raises(IncompatibleAdapter, match="rank must be"):
        LoraSpec(rank=0)
    with pytest.raises(IncompatibleAdapter, match="unsupported target modules"):
        LoraSpec(rank=4, target_modules=("embed_tokens",))
    head = LoraSpec(rank=4, target_modules=("lm_head",))  # the LM head is a site (train_unembed)
    tiny_engine.remove_adapter(tiny_engine.create_adapter(head, weights=random_adapter(tiny_engine.info, head, seed=2)))
