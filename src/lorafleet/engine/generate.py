"""Batched autoregressive decoding where every row may use a different adapter.

Each request (one prompt, one adapter) is prefilled once; its KV cache rows are then
repeated for its `num_samples`, and rows leave the batch as soon as they stop, so a
finished row costs nothing. Left padding + attention mask + explicit position ids keep
every row's numbers what they would be alone (up to float rounding).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorafleet.engine.batch import left_pad, row_operands, select_rows
from lorafleet.engine.logits import process_logits
from lorafleet.engine.sampling import choose_tokens
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult, SamplingParams, TopLogprobs
from lorafleet.lora.layers import LoraRuntime
from lorafleet.lora.weights import LoraWeights


@dataclass(slots=True)
class _Row:
    request: int
    sample: int
    generator: torch.Generator
    stop_ids: set[int]
    tokens: list[int]
    logprobs: list[float]
    params: SamplingParams
    prompt: list[int]
    top: list[TopLogprobs] = field(default_factory=list)
    stop_reason: str | None = None
    routes: list[Tensor] = field(default_factory=list)  # [moe_layers, positions, k] chunks, if recorded


def _generator(seed: int | None, sample_index: int) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    else:  # distinct, reproducible streams for the n samples of one seeded request
        g.manual_seed((seed * 1_000_003 + sample_index) & ((1 << 63) - 1))
    return g


def _hit_stop_string(tokenizer, row: _Row, stops: tuple[str, ...]) -> bool:
    """A stop string in the completion; with min_tokens, only after them and only one that
    ends in the newest token's text (what engine/decode.py does incrementally)."""
    min_tokens = row.params.min_tokens
    if not stops or len(row.tokens) <= min_tokens:
        return False
    text = tokenizer.decode(row.tokens, skip_special_tokens=False)
    if not min_tokens:
        return any(s in text for s in stops)
    head = len(tokenizer.decode(row.tokens[:-1], skip_special_tokens=False))
    return any(text.find(s, max(0, head - len(s) + 1)) >= 0 for s in stops)


def _prompt_logprobs(logits_TV: Tensor, prompt: list[int], k: int = 0) -> tuple[list[float | None], list | None]:
    """log p(prompt[i] | prompt[:i]) for i >= 1, and with k > 0 the top k (token, logprob) of
    each of those positions; `logits_TV` are the prompt's last len(prompt) positions."""
    lp = torch.log_softmax(logits_TV[:-1].float(), dim=-1)
    targets = torch.tensor(prompt[1:], dtype=torch.int64, device=lp.device)
    values = lp.gather(1, targets[:, None])[:, 0].tolist()
    if k <= 0:
        return [None, *values], None
    top = torch.topk(lp, k, dim=-1)
    return [None, *values], [None, *(list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist()))]


@torch.no_grad()
def generate(
    model: nn.Module,
    runtime: LoraRuntime,
    tokenizer,
    eos_id: int,
    requests: list[SampleRequest],
    adapters: list[LoraWeights | None],
    router_paths: list[str] | None = None,
    on_token: Callable[[int, int, int, float], bool | None] | None = None,
) -> list[SampleResult]:
    """Sample every request in one batch; `adapters[i]` is request i's adapter (or None).

    `on_token(request, sample, token, logprob)`, if given, is called (on this thread) for every
    token as soon as its decode step chose it, so callers can stream. A true return value stops
    that row now (its client went away): it leaves the batch with stop_reason 'abort'.

    With `router_paths` (a MoE base's routers, in layer order) and `record_routes` on a request,
    its sequences carry the experts chosen at every position fed to the model.
    """
    record = {} if router_paths and any(r.record_routes for r in requests) else None
    dtype, dev = next(model.parameters()).dtype, next(model.parameters()).device
    ids, mask = left_pad([r.prompt for r in requests], pad=eos_id)
    ids, mask = ids.to(dev), mask.to(dev)
    # one slot per distinct adapter object, plus a zero slot for the base
    slots: list[LoraWeights | None] = []
    slot_of: dict[int, int] = {}
    for w in adapters:
        key = id(w) if w is not None else 0
        if key not in slot_of:
            slot_of[key] = len(slots)
            slots.append(w)
    req_slot = torch.tensor([slot_of[id(w) if w is not None else 0] for w in adapters], device=dev)
    operands = row_operands(slots, req_slot, dtype) if any(w is not None for w in slots) else {}

    want_prompt_lp = any(r.prompt_logprobs or r.topk_prompt_logprobs for r in requests)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with runtime.use(operands), runtime.routes(record=record):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
            logits_to_keep=0 if want_prompt_lp else 1,
        )
    prompt_routes = _routes_now(record, router_paths, ids.shape[0])
    cache = out.cache
    prompt_lps = [
        _prompt_logprobs(out.logits[i, ids.shape[1] - len(r.prompt):], r.prompt, r.topk_prompt_logprobs)
        if r.prompt_logprobs or r.topk_prompt_logprobs else (None, None)
        for i, r in enumerate(requests)
    ]

    # expand each request's row into its samples
    expand = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.num_samples)], device=dev)
    rows = [
        _Row(
            request=i,
            sample=k,
            generator=_generator(r.params.seed, k),
            stop_ids={eos_id} if r.params.stop_token_ids is None else set(r.params.stop_token_ids),
            tokens=[],
            logprobs=[],
            params=r.params,
            prompt=r.prompt,
        )
        for i, r in enumerate(requests)
        for k in range(r.num_samples)
    ]
    if prompt_routes is not None:
        for row in rows:
            if requests[row.request].record_routes:
                row.routes.append(prompt_routes[row.request][:, -len(requests[row.request].prompt):])
    logits = out.logits[expand, -1]
    cache.batch_select_indices(expand)
    mask = mask[expand]
    next_pos = position[expand, -1] + 1
    operands = select_rows(operands, expand)
    live = list(range(len(rows)))  # index into `rows` of each batch row

    while live:
        params = [requests[rows[j].request].params for j in live]
        chosen = choose_tokens(
            logits,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [rows[j].generator for j in live],
            processed_BV=process_logits(logits, [rows[j] for j in live]),  # history rebuilt per step
            top_n=max(p.top_logprobs for p in params), min_ps=[p.min_p for p in params],
        )
        tokens = chosen.tokens
        keep: list[int] = []
        for b, j in enumerate(live):
            row, p = rows[j], params[b]
            tok = int(tokens[b])
            row.tokens.append(tok)
            row.logprobs.append(float(chosen.logprobs[b]))
            top = chosen.top(b, p.top_logprobs)
            if top is not None:
                row.top.append(top)
            if on_token is not None and on_token(row.request, row.sample, tok, row.logprobs[-1]):
                row.stop_reason = "abort"
            elif tok in row.stop_ids or _hit_stop_string(tokenizer, row, p.stop_strings):
                row.stop_reason = "stop"
            elif len(row.tokens) >= p.max_tokens:
                row.stop_reason = "length"
            else:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(live):
            keep_t = torch.tensor(keep, device=dev)
            cache.batch_select_indices(keep_t)
            mask, next_pos, tokens = mask[keep_t], next_pos[keep_t], tokens.to(dev)[keep_t]
            operands = select_rows(operands, keep_t)
            live = [live[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        with runtime.use(operands), runtime.routes(record=record):
            out = model(
                input_ids=tokens.to(dev)[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                cache=cache, use_cache=True,
            )
        step_routes = _routes_now(record, router_paths, len(live))
        if step_routes is not None:
            for b, j in enumerate(live):
                if requests[rows[j].request].record_routes:
                    rows[j].routes.append(step_routes[b])
        cache = out.cache
        logits = out.logits[:, -1]
        next_pos = next_pos + 1

    results = []
    for i, r in enumerate(requests):
        seqs = [
            SampledSequence(
                tokens=row.tokens, logprobs=row.logprobs, stop_reason=row.stop_reason or "length",
                routes=torch.cat(row.routes, dim=1).cpu() if row.routes else None,
                top_logprobs=row.top if row.params.top_logprobs else None,
            )
            for row in rows
            if row.request == i
        ]
        plp, ptop = prompt_lps[i]
        results.append(SampleResult(sequences=seqs, prompt_logprobs=plp if r.prompt_logprobs else None,
                                    topk_prompt_logprobs=ptop))
    return results


def _routes_now(record: dict[str, Tensor] | None, router_paths: list[str] | None, rows: int) -> Tensor | None:
    """The expert ids of the forward just run, per batch row: int32 [B, moe_layers, T, k]."""
    if record is None or not router_paths:
        return None
    per_layer = [record[p].view(rows, -1, record[p].shape[-1]) for p in router_paths]
    return torch.stack(per_layer, dim=1).to(torch.int32)
