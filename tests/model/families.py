"""Tiny random models of every supported architecture, saved as model folders (save_pretrained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    pad_token_id=2, tie_word_embeddings=True,
)
MOE: dict[str, Any] = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MLA: dict[str, Any] = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                           topk_group=1, num_key_value_heads=4, head_dim=8)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 64},
    "phi3": {},
    "olmo2": {},
    "qwen2_moe": MOE | {"num_experts": 4, "shared_expert_intermediate_size": 48},
    "qwen3_moe": MOE | {"num_experts": 4, "norm_topk_prob": True},
    "olmoe": MOE | {"num_experts": 4, "intermediate_size": 32},
    "mixtral": MOE | {"num_local_experts": 4, "intermediate_size": 32},
    "deepseek_v2": MOE | MLA | {"q_lora_rank": None, "topk_method": "greedy"},
    "deepseek_v3": MOE | MLA | {"q_lora_rank": 32},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "sliding_window": 64},
}
DENSE = [f for f, c in FAMILIES.items() if "num_experts_per_tok" not in c]


def config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **(COMMON | FAMILIES[family]))


def save_family(family: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random model of `family` written by save_pretrained, with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32)
        # random, not init-zero, norms and routers: every parameter matters to the logits
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias") or p.abs().sum() == 0 or (p == 1).all():
                    p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder
