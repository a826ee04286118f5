"""Iteration-level (continuous) decoding: rows join and leave the running batch every step.

`DecodeBatch.step()` is one scheduler iteration of sampling work:
1. rows of cancelled jobs leave;
2. one decode forward feeds every running row its pending token (the one it chose last
   step) and chooses the next; finished rows leave at once (their job completes when its
   last row does);
3. the remaining per-step token budget (`max_num_batched_tokens` minus the decode rows)
   prefills waiting requests, a long prompt in chunks over several steps, so a long prompt
   never stalls running rows; a request whose prompt is fully prefilled chooses its first
   token(s) and joins the batch, its KV repeated for its `num_samples` rows.

KV cache: one left-padded batch cache per layer (K, V [B, H, L, D]) with an attention mask
[B, L] and explicit per-row positions, so a row's numbers are what they would be alone (up
to float rounding). Joining rows are left-padded (or the batch is) to a common length;
leading columns no row uses are trimmed when rows leave. Its size is bounded by
`kv_cache_bytes`: admission refuses what would exceed it, and if growth does, the newest
rows are preempted and later recomputed (their prompt plus the tokens they already chose
are prefilled again; their sampling state is kept, so the tokens are unchanged).

Each row samples from its own `torch.Generator` (seeded from the request's seed and the
sample index), so a seeded request gives the same tokens whatever else is in the batch.
Stop strings are checked on a tail window of the row's tokens, not the whole completion.
Before choosing, each row's logits go through its logits pipeline (engine/logits.py: bias,
min_tokens, penalties over the row's history, which the batch keeps aligned with its rows).

Rows take their LoRA operands from the preallocated slot buffers (engine/slots.py) by a
row -> slot index. The pure reference for all of this is `engine/generate.py` (one whole
batch, no joining, tables stacked per batch): the tests compare the two.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorafleet.engine.generate import _generator, _routes_now
from lorafleet.engine.jobs import Job, Sample
from lorafleet.engine.logits import History, needs_history, process_logits
from lorafleet.engine.sampling import choose_tokens
from lorafleet.engine.slots import SlotTable
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult, TopLogprobs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Budgets:
    """Per-step limits of sampling work (vLLM's scheduler budgets).

    Args:
        max_num_seqs: rows decoding at once.
        max_num_batched_tokens: tokens fed to the model per step: one per decode row plus
            prefill chunks; a prompt longer than what is left is prefilled over several steps.
        kv_cache_bytes: KV cache memory of the running batch; exceeding it preempts the
            newest rows (recomputed later).
        boundary_only: admit new requests only when no row is running (batch-boundary
            admission, the pre-continuous-batching behaviour; a benchmark baseline).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_bytes: int = 2 << 30
    boundary_only: bool = False


@dataclass(slots=True, eq=False)
class _Row:
    job: _JobState
    request: int
    sample: int
    generator: torch.Generator
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopLogprobs] = field(default_factory=list)  # with params.top_logprobs
    routes: list[Tensor] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def params(self):
        return self.job.requests[self.request].params

    @property
    def prompt(self) -> list[int]:
        return self.job.requests[self.request].prompt


@dataclass(slots=True, eq=False)
class _JobState:
    job: Job
    requests: list[SampleRequest]
    slots: list[int]  # SlotTable index per request (0: the base alone)
    results: list[list[SampledSequence | None]]
    prompt_lps: list[list[float | None] | None]
    prompt_top: list[list[TopLogprobs | None] | None]
    left: int  # rows not finished yet
    failed: bool = False


@dataclass(slots=True, eq=False)
class _Prefill:
    """A request (or a preempted row) being prefilled, possibly over several steps."""

    job: _JobState
    request: int
    ids: list[int]  # what to feed: the prompt, or prompt + chosen tokens for a recompute
    rows: list[_Row]  # the rows it becomes (its samples, or the one preempted row)
    fed: int = 0
    kv: list[tuple[Tensor, Tensor]] | None = None
    lps: list[float | None] = field(default_factory=list)
    top_lps: list[TopLogprobs | None] = field(default_factory=list)
    routes: list[Tensor] = field(default_factory=list)
    recompute: bool = False
    last_logits: Tensor | None = None  # [1, V] at the last position fed


class DecodeBatch:
    """The running rows of one engine, their KV cache, and the requests being prefilled.

    Args:
        engine: the Engine (its model, LoRA runtime, tokenizer, routers).
        table: the adapter slots rows index (engine/slots.py).
        budgets: per-step limits.
        on_token: (job, request, sample, token, logprob, top) for every chosen token; `top` is
            the position's top-k (token, logprob) with params.top_logprobs = k, else None.
    """

    def __init__(self, engine, table: SlotTable, budgets: Budgets,
                 on_token: Callable[[Job, int, int, int, float, TopLogprobs | None], None]) -> None:
        self.engine = engine
        self.table = table
        self.budgets = budgets
        self.on_token = on_token
        base = engine.base
        self.model = base.model
        self.runtime = engine.runtime
        self.tokenizer = base.tokenizer
        self.eos = base.eos_token_id
        self.dtype = base.dtype
        self.device = engine.device
        self.router_paths = engine.router_paths
        self.vocab = engine.info.vocab_size
        self.rows: list[_Row] = []
        self._empty()
        self._operands = None
        self.prefills: deque[_Prefill] = deque()
        self.preempted: deque[_Prefill] = deque()
        self.finished: list[_JobState] = []  # jobs whose rows all ended during the last step:
        # the scheduler reports them (done, or failed / cancelled) after every step
        self.stats = {"steps": 0, "preempted": 0, "prefill_chunks": 0}

    # ---- state ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.prefills or self.preempted)

    @property
    def seqs(self) -> int:
        """Rows decoding or reserved by requests being prefilled (not preempted ones)."""
        return len(self.rows) + sum(len(p.rows) for p in self.prefills)

    def kv_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    def _kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * heads * head_dim * torch.finfo(self.dtype).bits // 8

    def fits(self, rows: int, tokens: int) -> bool:
        """Whether `rows` more rows with `tokens` of context each fit the budgets now."""
        b = self.budgets
        if b.boundary_only and (self.rows or self.prefills):
            return False
        if self.seqs and self.seqs + rows > b.max_num_seqs:
            return False
        width = max(self.mask.shape[1] if self.rows else 0, tokens + 1)
        need = (self.seqs + rows) * width * self._kv_bytes_per_token()
        return not self.seqs or need <= b.kv_cache_bytes

    def admit(self, state: _JobState) -> None:
        """Queue a validated job's requests for prefill (its rows are reserved now)."""
        for i, req in enumerate(state.requests):
            p = req.params
            rows = [
                _Row(state, i, k, _generator(p.seed, k),
                     frozenset({self.eos} if p.stop_token_ids is None else p.stop_token_ids))
                for k in range(req.num_samples)
            ]
            self.prefills.append(_Prefill(state, i, list(req.prompt), rows))

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, admit_more: Callable[[], bool]) -> None:
        """One iteration: drop cancelled rows, decode, then prefill under the token budget.

        `admit_more()` is called while budget is left; it admits the next waiting job (via
        `admit`) and returns whether it did.
        """
        self.finished = []
        self._drop_cancelled()
        if self.rows:
            self._decode()
        self._enforce_kv_budget()
        budget = self.budgets.max_num_batched_tokens - len(self.rows)
        while budget > 0:
            if not self.prefills:
                if self.preempted:  # preempted rows come back before anything new
                    if not self.fits(len(self.preempted[0].rows), len(self.preempted[0].ids)):
                        break
                    self.prefills.append(self.preempted.popleft())
                elif not admit_more():
                    break
                continue
            pre = self.prefills[0]
            n = min(budget, len(pre.ids) - pre.fed)
            self._prefill_chunk(pre, n)
            budget -= n
            if pre.fed == len(pre.ids):
                self.prefills.popleft()
                self._join(pre)
        self.stats["steps"] += 1

    def _drop_cancelled(self) -> None:
        for q in (self.prefills, self.preempted):
            for pre in [p for p in q if p.job.job.cancelled or p.job.failed]:
                q.remove(pre)
                self._end_rows(pre.job, len(pre.rows))
        keep = [b for b, r in enumerate(self.rows) if not (r.job.job.cancelled or r.job.failed)]
        if len(keep) < len(self.rows):
            for r in self.rows:
                if r.job.job.cancelled or r.job.failed:
                    self._end_rows(r.job, 1)
            self._select(keep)

    def _end_rows(self, state: _JobState, n: int) -> None:
        state.left -= n
        if state.left <= 0:
            self.finished.append(state)

    def fail_job(self, state: _JobState) -> None:
        """Mark a job failed: its rows leave at the next step (or now, if it has none left)."""
        state.failed = True

    # ---- decode -----------------------------------------------------------------------------

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        cache = _cache(self.kv)
        record = self._record([r.job.requests[r.request] for r in self.rows])
        with self.runtime.use(self._row_operands()), self.runtime.routes(record=record):
            out = self.engine.decode_forward(input_ids=self.pending[:, None], attention_mask=self.mask,
                                             position_ids=self.pos[:, None], cache=cache, use_cache=True)
        self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self.pos = self.pos + 1
        step_routes = _routes_now(record, self.router_paths, len(self.rows))
        if step_routes is not None:
            for b, row in enumerate(self.rows):
                if row.job.requests[row.request].record_routes:
                    row.routes.append(step_routes[b])
        tokens = self._choose(self.rows, out.logits[:, -1], self.history)
        if self.history is not None:
            self.history.observe(tokens)
        self.pending = tokens.to(self.device)
        keep = [b for b, row in enumerate(self.rows) if row.stop_reason is None]
        if len(keep) < len(self.rows):
            self._select(keep)

    def _choose(self, rows: list[_Row], logits_BV: Tensor, history: History | None = None) -> Tensor:
        """Choose one token per row (after its logits pipeline), report it, and mark rows that stop."""
        params = [r.params for r in rows]
        chosen = choose_tokens(
            logits_BV, [p.temperature for p in params], [p.top_k for p in params],
            [p.top_p for p in params], [r.generator for r in rows],
            processed_BV=process_logits(logits_BV, rows, history),
            top_n=max(p.top_logprobs for p in params), min_ps=[p.min_p for p in params],
        )
        tokens = chosen.tokens
        for b, row in enumerate(rows):
            tok = int(tokens[b])
            top = chosen.top(b, row.params.top_logprobs)
            row.tokens.append(tok)
            row.logprobs.append(float(chosen.logprobs[b]))
            if top is not None:
                row.top.append(top)
            self.on_token(row.job.job, row.request, row.sample, tok, row.logprobs[-1], top)
            if tok in row.stop_ids or self._hit_stop_string(row):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.params.max_tokens:
                row.stop_reason = "length"
            if row.stop_reason is not None:
                self._retire(row)
        return tokens

    def _hit_stop_string(self, row: _Row) -> bool:
        """Incremental: a stop string first appears in a window ending at the newest token.

        A token adds at least one character except for byte fragments of a multi-byte
        character (up to 4 tokens per character), so 4 tokens per character of the longest
        stop string (plus slack) always cover it. Before `min_tokens` tokens nothing stops,
        and after them only a stop string that ends in the newest token's text does (vLLM).
        """
        stops, min_tokens = row.params.stop_strings, row.params.min_tokens
        if not stops or len(row.tokens) <= min_tokens:
            return False
        window = 4 * max(len(s) for s in stops) + 4
        text = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=False)
        if not min_tokens:
            return any(s in text for s in stops)
        head = len(self.tokenizer.decode(row.tokens[-window:-1], skip_special_tokens=False))
        return any(text.find(s, max(0, head - len(s) + 1)) >= 0 for s in stops)

    def _retire(self, row: _Row) -> None:
        state = row.job
        state.results[row.request][row.sample] = SampledSequence(
            tokens=row.tokens, logprobs=row.logprobs, stop_reason=row.stop_reason or "length",
            routes=torch.cat(row.routes, dim=1).cpu() if row.routes else None,
            top_logprobs=row.top if row.params.top_logprobs else None,
        )
        self._end_rows(state, 1)

    def _empty(self) -> None:
        self.kv: list[tuple[Tensor, Tensor]] = []  # per layer, [B, H, L, D]
        self.mask: Tensor = torch.zeros(0, 0, dtype=torch.int64, device=self.device)
        self.pos: Tensor = torch.zeros(0, dtype=torch.int64, device=self.device)  # next position per row
        self.pending: Tensor = torch.zeros(0, dtype=torch.int64, device=self.device)  # chosen, not fed yet
        self.history: History | None = None  # while some row has a penalty (engine/logits.py)

    def _select(self, keep: list[int]) -> None:
        """Keep only the batch rows `keep` (in order); trim KV columns no row uses."""
        idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
        self.rows = [self.rows[b] for b in keep]
        self._operands = None
        if not self.rows:
            self._empty()
            return
        mask = self.mask[idx]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.mask = mask[:, start:]
        self.kv = [(k[idx, :, start:], v[idx, :, start:]) for k, v in self.kv]
        self.pos, self.pending = self.pos[idx], self.pending[idx]
        if self.history is not None:
            self.history = self.history.select(idx) if needs_history(self.rows) else None

    def _row_operands(self):
        if self._operands is None:
            self._operands = self._operands_for([r.job.slots[r.request] for r in self.rows])
        return self._operands

    def _operands_for(self, slots: list[int]):
        """Gathered from the slot buffers by the rows' slot index: nothing restacked."""
        return self.table.operands(torch.tensor(slots, dtype=torch.int64))

    def _record(self, requests: list[SampleRequest]) -> dict[str, Tensor] | None:
        return {} if self.router_paths and any(r.record_routes for r in requests) else None

    # ---- prefill ----------------------------------------------------------------------------

    def _prefill_chunk(self, pre: _Prefill, n: int) -> None:
        from transformers.cache_utils import DynamicCache

        req = pre.job.requests[pre.request]
        want_lp = (req.prompt_logprobs or req.topk_prompt_logprobs > 0) and not pre.recompute
        dev = self.device
        ids = torch.tensor([pre.ids[pre.fed: pre.fed + n]], dtype=torch.int64, device=dev)
        positions = torch.arange(pre.fed, pre.fed + n, dtype=torch.int64, device=dev)[None]
        mask = torch.ones(1, pre.fed + n, dtype=torch.int64, device=dev)
        cache = _cache(pre.kv) if pre.kv else DynamicCache()
        record = self._record([req])
        with self.runtime.use(self._operands_for([pre.job.slots[pre.request]])), \
                self.runtime.routes(record=record):
            out = self.engine.decode_forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                             cache=cache, use_cache=True, logits_to_keep=0 if want_lp else 1)
        pre.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        routes = _routes_now(record, self.router_paths, 1)
        if routes is not None:
            pre.routes.append(routes[0])
        if want_lp:
            if pre.fed == 0:
                pre.lps.append(None)
                pre.top_lps.append(None)
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            targets = pre.ids[pre.fed + 1: pre.fed + n + 1]
            if targets:
                t = torch.tensor(targets, dtype=torch.int64, device=lp.device)
                pre.lps.extend(lp[: len(targets)].gather(1, t[:, None])[:, 0].tolist())
                if req.topk_prompt_logprobs > 0:
                    top = torch.topk(lp[: len(targets)], req.topk_prompt_logprobs, dim=-1)
                    pre.top_lps.extend(list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist()))
        pre.fed += n
        pre.last_logits = out.logits[:, -1]
        self.stats["prefill_chunks"] += 1

    def _join(self, pre: _Prefill) -> None:
        """A fully prefilled request: its rows choose their first token and join the batch."""
        state = pre.job
        if not pre.recompute:
            if state.requests[pre.request].prompt_logprobs:
                state.prompt_lps[pre.request] = pre.lps
            if state.requests[pre.request].topk_prompt_logprobs > 0:
                state.prompt_top[pre.request] = pre.top_lps
            if pre.routes and state.requests[pre.request].record_routes:
                prompt_routes = torch.cat(pre.routes, dim=1)  # [layers, P, k]
                for row in pre.rows:
                    row.routes.append(prompt_routes)
        n = len(pre.rows)
        if pre.recompute:  # the row chose its pending token before it was preempted
            tokens = torch.tensor([pre.rows[0].tokens[-1]], dtype=torch.int64)
            live = pre.rows
        else:
            tokens = self._choose(pre.rows, pre.last_logits.expand(n, -1))
            keep = [b for b, r in enumerate(pre.rows) if r.stop_reason is None]
            live, tokens = [pre.rows[b] for b in keep], tokens[keep]
        if not live:
            return
        m = len(live)  # the samples of one prompt share its prefill (KV repeated per row)
        kv = [(k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1)) for k, v in pre.kv]
        self._merge(live, kv, len(pre.ids), tokens)

    def _merge(self, rows: list[_Row], kv: list[tuple[Tensor, Tensor]], length: int, tokens: Tensor) -> None:
        """Add rows with KV of `length` real positions to the batch (left-padding as needed)."""
        width = self.mask.shape[1] if self.rows else 0
        mask_new = torch.ones(len(rows), length, dtype=torch.int64, device=self.device)
        if not self.rows:
            self.kv = [(k.contiguous(), v.contiguous()) for k, v in kv]
            self.mask = mask_new
        else:
            if width < length:
                pad = length - width
                self.kv = [(_lpad(k, pad), _lpad(v, pad)) for k, v in self.kv]
                self.mask = torch.cat([self.mask.new_zeros(len(self.rows), pad), self.mask], dim=1)
            elif length < width:
                pad = width - length
                kv = [(_lpad(k, pad), _lpad(v, pad)) for k, v in kv]
                mask_new = torch.cat([mask_new.new_zeros(len(rows), pad), mask_new], dim=1)
            self.kv = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(self.kv, kv)]
            self.mask = torch.cat([self.mask, mask_new])
        self.rows += rows
        if self.history is not None:
            self.history = self.history.cat(History.of(rows, self.vocab, self.device))
        elif needs_history(rows):  # the first row with a penalty: the whole batch gets one
            self.history = History.of(self.rows, self.vocab, self.device)
        self.pos = torch.cat([self.pos, torch.full((len(rows),), length, dtype=torch.int64, device=self.device)])
        self.pending = torch.cat([self.pending, tokens.to(self.device, torch.int64)])
        self._operands = None

    # ---- memory -----------------------------------------------------------------------------

    def _enforce_kv_budget(self) -> None:
        """Preempt the newest rows (recompute later) while the cache exceeds its budget."""
        while len(self.rows) > 1 and self.kv_bytes() > self.budgets.kv_cache_bytes:
            row = self.rows[-1]
            self._select(list(range(len(self.rows) - 1)))
            prompt = row.job.requests[row.request].prompt
            self.preempted.appendleft(_Prefill(row.job, row.request, list(prompt) + row.tokens[:-1],
                                               [row], recompute=True))
            self.stats["preempted"] += 1

    def clear(self) -> list[_JobState]:
        """Drop everything (shutdown); returns the jobs that had work."""
        states = {id(r.job): r.job for r in self.rows}
        for p in (*self.prefills, *self.preempted):
            states[id(p.job)] = p.job
        self.rows = []
        self.prefills.clear()
        self.preempted.clear()
        self._empty()
        return list(states.values())


def _cache(kv: list[tuple[Tensor, Tensor]]):
    """A transformers DynamicCache over our per-layer KV tensors, without copying them
    (building it from `ddp_cache_data` would concatenate every layer once more)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in kv])
    for layer, (k, v) in zip(cache.layers, kv):
        layer.keys, layer.values = k, v
    return cache


def _lpad(t: Tensor, pad: int) -> Tensor:
    """Zero-pad a KV tensor [B, H, L, D] on the left of its length axis."""
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)


def job_state(job: Job, slots: list[int]) -> _JobState:
    payload: Sample = job.payload  # type: ignore[assignment]
    reqs = payload.requests
    return _JobState(job, reqs, slots, [[None] * r.num_samples for r in reqs],
                     [None] * len(reqs), [None] * len(reqs), left=sum(r.num_samples for r in reqs))


def results(state: _JobState) -> list[SampleResult]:
    return [SampleResult(sequences=list(seqs), prompt_logprobs=state.prompt_lps[i],  # type: ignore[arg-type]
                         topk_prompt_logprobs=state.prompt_top[i])
            for i, seqs in enumerate(state.results)]


