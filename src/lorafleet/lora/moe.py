"""Pure mixture-of-experts LoRA math: routing (with replay) and routed experts, per-row adapters.

One sparse MoE block (Qwen2/Qwen3-MoE, OLMoE style), token n of the batch in row b(n) with
adapter slot s = slot_N[n]:

    logits_n = W_r x_n + scale[s] * B_r[s] A_r[s] x_n                        (router LoRA)
    p_n      = softmax(logits_n);  E_n = topk(p_n, k)  (or the replayed ids)   w_n = p_n[E_n] (/ sum)
    y_n      = sum_{e in E_n} w_ne * down_e( act(gate_e(x_n)) * up_e(x_n) )
    proj_e(x) = W_proj[e] x + scale[s] * B_proj[s, e] A_proj[s, e] x          (expert LoRA)

transformers fuses gate and up into `gate_up_proj [E, 2I, H]` ([gate; up] along the output;
gpt-oss: transposed, interleaved, with biases and its own clamped GLU, see `split_experts`);
we keep separate gate and up LoRAs (PEFT/vLLM's per-expert naming) and add them to the two
halves. The fast path loops over the experts the batch hit (as transformers' eager kernel does)
and applies every slot's LoRA with two dense matmuls and a one-hot slot mask, so tokens of
different rows routed to one expert use different adapters without any per-token gather.
`moe_block_reference` is the obviously correct per-token twin the tests compare against.
No device moves, no I/O, no globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ExpertTables = dict[str, tuple[Tensor, Tensor]]  # proj -> (a_SERK, b_SEDR), scale folded into B


def route(
    logits_NE: Tensor, top_k: int, norm_topk_prob: bool, replay_Nk: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k routing: (weights_Nk in logits' dtype, experts_Nk int64).

    `replay_Nk` (R3 routing replay): where its row holds expert ids (>= 0), those experts are
    used instead of the top-k, weighted by their current probabilities (renormalised like the
    top-k would be); rows of -1 route normally.
    """
    probs_NE = torch.softmax(logits_NE, dim=-1, dtype=torch.float)
    _, experts_Nk = torch.topk(probs_NE, top_k, dim=-1)
    if replay_Nk is not None:
        use_N = replay_Nk[:, 0] >= 0
        experts_Nk = torch.where(use_N[:, None], replay_Nk.to(experts_Nk.dtype), experts_Nk)
    weights_Nk = probs_NE.gather(1, experts_Nk)
    if norm_topk_prob:
        weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
    return weights_Nk.to(logits_NE.dtype), experts_Nk


def lora_by_slot(x_NK: Tensor, a_SRK: Tensor, b_SDR: Tensor, slot_N: Tensor) -> Tensor:
    """delta_ND = (x A[s]^T) B[s]^T for s = slot_N[n] (0 for slot -1), in two dense matmuls.

    Every token is multiplied by every slot's A (S is the handful of adapters in the batch),
    the other slots' results are masked out, then one matmul with the stacked B's sums up.
    """
    n_slots, rank, k_in = a_SRK.shape
    h_NSR = (x_NK @ a_SRK.reshape(n_slots * rank, k_in).T).view(-1, n_slots, rank)
    onehot_NS = (slot_N[:, None] == torch.arange(n_slots, device=slot_N.device)).to(h_NSR.dtype)
    h_NSR = h_NSR * onehot_NS[:, :, None]
    return h_NSR.reshape(-1, n_slots * rank) @ b_SDR.transpose(1, 2).reshape(n_slots * rank, -1)


@dataclass(frozen=True, slots=True)
class SplitExperts:
    """One MoE layer's experts as separate projections (views of the fused base tensors):
    expert e computes down_e(glu(gate_e(x), up_e(x))), each projection `W x (+ bias)`."""

    gate_EIH: Tensor
    up_EIH: Tensor
    down_EHI: Tensor
    glu: Callable[[Tensor, Tensor], Tensor]
    gate_bias_EI: Tensor | None = None
    up_bias_EI: Tensor | None = None
    down_bias_EH: Tensor | None = None


def split_experts(experts: Any) -> SplitExperts:
    """The SplitExperts of a transformers experts module: `concat` layout (gate_up_proj [E, 2I, H]
    = [gate; up], down_proj [E, H, I]; Qwen-MoE, OLMoE, Mixtral, DeepSeek) or gpt-oss's (transposed
    gate_up_proj [E, H, 2I] with gate and up interleaved, down_proj [E, I, H], biases, and a
    clamped `(up + 1) * gate * sigmoid(alpha * gate)`)."""
    gate_up = experts.gate_up_proj
    if getattr(experts, "gate_up_proj_bias", None) is None:
        inter = gate_up.shape[1] // 2
        act = experts.act_fn
        return SplitExperts(gate_up[:, :inter], gate_up[:, inter:], experts.down_proj, lambda g, u: act(g) * u)
    alpha, limit = float(experts.alpha), float(experts.limit)

    def glu(gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    t = gate_up.transpose(1, 2)  # [E, 2I, H], rows interleaved gate, up, gate, up, ...
    b = experts.gate_up_proj_bias
    return SplitExperts(t[:, 0::2], t[:, 1::2], experts.down_proj.transpose(1, 2), glu,
                        b[:, 0::2], b[:, 1::2], experts.down_proj_bias)


def experts_forward(
    x_NH: Tensor, experts_Nk: Tensor, weights_Nk: Tensor, ex: SplitExperts, tables: ExpertTables, slot_N: Tensor
) -> Tensor:
    """Routed experts with per-token LoRA: y_n = sum_j w_nj * expert_{E_nj}(x_n) (see module doc).

    `tables[proj] = (a_SERK, b_SEDR)` for the projections some adapter targets ("gate_proj",
    "up_proj", "down_proj"); `slot_N` is each token's slot (-1: base only).
    """
    out_NH = torch.zeros_like(x_NH)
    for e in torch.unique(experts_Nk).tolist():
        tok, pos = torch.where(experts_Nk == e)
        x_MH, s_M = x_NH[tok], slot_N[tok]
        gate_MI, up_MI = x_MH @ ex.gate_EIH[e].T, x_MH @ ex.up_EIH[e].T
        if ex.gate_bias_EI is not None:
            gate_MI, up_MI = gate_MI + ex.gate_bias_EI[e], up_MI + ex.up_bias_EI[e]  # type: ignore[index]
        if "gate_proj" in tables:
            a, b = tables["gate_proj"]
            gate_MI = gate_MI + lora_by_slot(x_MH, a[:, e], b[:, e], s_M)
        if "up_proj" in tables:
            a, b = tables["up_proj"]
            up_MI = up_MI + lora_by_slot(x_MH, a[:, e], b[:, e], s_M)
        h_MI = ex.glu(gate_MI, up_MI)
        y_MH = h_MI @ ex.down_EHI[e].T
        if ex.down_bias_EH is not None:
            y_MH = y_MH + ex.down_bias_EH[e]
        if "down_proj" in tables:
            a, b = tables["down_proj"]
            y_MH = y_MH + lora_by_slot(h_MI, a[:, e], b[:, e], s_M)
        out_NH.index_add_(0, tok, (y_MH * weights_Nk[tok, pos, None]).to(out_NH.dtype))
    return out_NH


def moe_block_reference(
    x_NH: Tensor,
    slot_N: list[int],
    router_EH: Tensor,
    gate_up_EFH: Tensor,
    down_EHI: Tensor,
    act: Callable[[Tensor], Tensor],
    top_k: int,
    norm_topk_prob: bool,
    adapters: list[dict[str, tuple[Tensor, Tensor]] | None],
    scales: list[float],
    replay_Nk: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The obviously correct version, one token at a time with merged weights. For tests.

    `adapters[s]` maps "gate" -> (A [r, H], B [E, r]) and "gate_proj"/"up_proj"/"down_proj"
    -> packed (A [E, r, in], B [E, out, r]); missing keys mean no LoRA there. Returns the block
    output [N, H] and the experts used [N, k].
    """
    inter = gate_up_EFH.shape[1] // 2
    out, used = torch.zeros_like(x_NH), torch.zeros(x_NH.shape[0], top_k, dtype=torch.int64)
    for n, s in enumerate(slot_N):
        lora = adapters[s] if s >= 0 and adapters[s] is not None else {}
        scale = scales[s] if s >= 0 else 0.0

        def merged(name: str, base: Tensor, e: int | None) -> Tensor:
            if name not in lora:
                return base
            a, b = lora[name] if e is None else (lora[name][0][e], lora[name][1][e])
            return base + scale * b @ a

        x = x_NH[n]
        probs = torch.softmax(merged("gate", router_EH, None) @ x, dim=-1, dtype=torch.float)
        chosen = torch.topk(probs, top_k).indices
        if replay_Nk is not None and replay_Nk[n, 0] >= 0:
            chosen = replay_Nk[n]
        w = probs[chosen]
        w = w / w.sum() if norm_topk_prob else w
        used[n] = chosen
        for j, e in enumerate(chosen.tolist()):
            gate = merged("gate_proj", gate_up_EFH[e, :inter], e) @ x
            up = merged("up_proj", gate_up_EFH[e, inter:], e) @ x
            out[n] += w[j].to(x.dtype) * (merged("down_proj", down_EHI[e], e) @ (act(gate) * up))
    return out, used
