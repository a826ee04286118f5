"""Engine: one resident base model executing training and sampling for many adapters.

Synchronous and not locked: the scheduler (engine/scheduler.py) makes the training calls from
its training lane and the sampling calls from its decode lane, at the same time (the LoRA
operands of each forward are thread-local, the base frozen). `sample` is the whole-batch
reference path (engine/generate.py); serving decodes through engine/decode.py, which joins and
retires rows every step. Adapters are addressed by engine-assigned integer handles; adding or
removing one never touches the base weights (the LoRA layers read the batch's adapters from the
runtime, see lora/layers.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafleet.engine.batch import right_pad, row_operands
from lorafleet.engine.generate import generate
from lorafleet.engine.logprobs import PromptScorer, PromptScores, PromptScoring
from lorafleet.engine.prepack import prepack
from lorafleet.engine.types import MAX_TOP_LOGPROBS, SampleRequest, SampleResult, SamplingParams
from lorafleet.errors import BadTokens, InvalidRequest, NotFound
from lorafleet.lora.inject import inject
from lorafleet.lora.layers import MultiLoraRouter, RowOperands
from lorafleet.lora.io import from_peft_tensors, to_peft_tensors
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.model.registry import LoadedBase
from lorafleet.train import losses
from lorafleet.train.optim import AdamState, adamw_step
from lorafleet.train.types import AdamParams, FwdBwdRequest, FwdBwdResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """An adapter resident in the engine: trainable fp32 leaves and their Adam state.

    The Adam state is allocated on first use: a slot that only samples never needs it, and
    a MoE adapter has hundreds of tensors to zero (see bench/packed_load.py).
    """

    weights: LoraWeights
    params: list[Tensor]
    names: list[str]  # one per param: `<module path>.lora_A` / `.lora_B`, the optimizer-state keys
    _opt: AdamState | None = None

    @property
    def opt(self) -> AdamState:
        if self._opt is None:
            self._opt = AdamState.zeros(self.params)
        return self._opt

    @opt.setter
    def opt(self, state: AdamState | None) -> None:
        self._opt = state


def _leaves(weights: LoraWeights, device: torch.device) -> tuple[LoraWeights, list[Tensor], list[str]]:
    pairs, params, names = {}, [], []
    for path, (a, b) in weights.pairs.items():
        a = a.detach().to(device, torch.float32, copy=True).requires_grad_(True)
        b = b.detach().to(device, torch.float32, copy=True).requires_grad_(True)
        pairs[path] = (a, b)
        params += [a, b]
        names += [f"{path}.lora_A", f"{path}.lora_B"]
    return LoraWeights(weights.spec, pairs), params, names


def target_logprobs(logits_BTV: Tensor, targets: list[Tensor]) -> list[Tensor]:
    """log p(target) of every row from one batch of logits: [N] for 1-D targets, [N, K] for
    2-D ones (row b's targets are `targets[b]`, N its length). Differentiable.

    All-1-D batches take the fused cross-entropy kernel; a batch with 2-D targets takes one
    logsumexp over the vocabulary and a gather of its (padded) K columns, so a distillation
    row costs the same forward as any other.
    """
    dev = logits_BTV.device
    if all(t.ndim == 1 for t in targets):
        targets_BT = right_pad(targets, pad=0).to(dev)
        lp_BT = -F.cross_entropy(
            logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none"
        ).view(targets_BT.shape)
        return [lp_BT[b, : len(t)] for b, t in enumerate(targets)]
    k = max(t.shape[1] if t.ndim == 2 else 1 for t in targets)
    targets_BTK = torch.zeros(len(targets), logits_BTV.shape[1], k, dtype=torch.int64)
    for b, t in enumerate(targets):
        t2 = t if t.ndim == 2 else t[:, None]
        targets_BTK[b, : t2.shape[0], : t2.shape[1]] = t2
    logits = logits_BTV.float()
    lp_BTK = logits.gather(-1, targets_BTK.to(dev)) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return [lp_BTK[b, : len(t), : t.shape[1]] if t.ndim == 2 else lp_BTK[b, : len(t), 0]
            for b, t in enumerate(targets)]


class Engine:
    """Trains and samples any number of LoRA adapters over one frozen base model."""

    def __init__(self, base: LoadedBase, cpu_prepack: bool = True) -> None:
        """`cpu_prepack`: on CPU, batched inference reads oneDNN-packed base weights
        (engine/prepack.py: faster decoding, one more copy of the Linear weights)."""
        self.base = base
        self.info = base.info
        self.device = next(base.model.parameters()).device
        self.runtime = inject(base.model, base.info.lora_modules + base.info.unembed)
        if cpu_prepack:
            prepack(base.model)
        # MoE routers in layer order: the first axis of recorded / replayed routes
        self.router_paths = [m.path for m in base.model.modules() if isinstance(m, MultiLoraRouter)]
        self._adapters: dict[int, _Live] = {}
        self._next_handle = 1

    # ---- adapters -------------------------------------------------------------------------

    def create_adapter(self, spec: LoraSpec, seed: int | None = None, weights: LoraWeights | None = None) -> int:
        """Register an adapter (fresh PEFT-style init, or `weights`); returns its handle."""
        if weights is None:
            weights = LoraWeights.init(self.info, spec, seed)
        elif weights.spec != spec:
            raise InvalidRequest("weights.spec differs from spec")
        live_w, params, names = _leaves(weights.checked(self.info), self.device)
        handle = self._next_handle
        self._next_handle += 1
        self._adapters[handle] = _Live(live_w, params, names)
        return handle

    def remove_adapter(self, handle: int) -> None:
        self._live(handle)
        del self._adapters[handle]

    @property
    def adapter_count(self) -> int:
        return len(self._adapters)

    def spec(self, handle: int) -> LoraSpec:
        return self._live(handle).weights.spec

    def get_weights(self, handle: int) -> LoraWeights:
        """A detached copy of the adapter's current weights."""
        return self._live(handle).weights.clone()

    def set_weights(self, handle: int, weights: LoraWeights, reset_optimizer: bool = True) -> None:
        """Replace the adapter's weights in place (same handle); pending gradients are dropped."""
        live = self._live(handle)
        if weights.spec != live.weights.spec:
            raise InvalidRequest(f"weights have spec {weights.spec}, adapter has {live.weights.spec}")
        live.weights, live.params, live.names = _leaves(weights.checked(self.info), self.device)
        if reset_optimizer:
            live.opt = None  # fresh zeros on first use

    def get_tensors(self, handle: int, layout: str = "per_expert") -> dict[str, Tensor]:
        """The adapter's tensors under PEFT key names (MoE experts per expert, or `"packed"`)."""
        return to_peft_tensors(self._live(handle).weights, layout)

    def set_tensors(self, handle: int, tensors: dict[str, Tensor]) -> None:
        self.set_weights(handle, from_peft_tensors(self.spec(handle), tensors))

    def optimizer_state(self, handle: int) -> dict[str, Tensor]:
        live = self._live(handle)
        return live.opt.to_tensors(live.names)

    def load_optimizer_state(self, handle: int, state: dict[str, Tensor]) -> None:
        live = self._live(handle)
        live.opt = AdamState.from_tensors(state, live.params, live.names)

    def discard_grads(self, handle: int) -> None:
        for p in self._live(handle).params:
            p.grad = None

    def has_grads(self, handle: int) -> bool:
        return any(p.grad is not None for p in self._live(handle).params)

    def _live(self, handle: int) -> _Live:
        try:
            return self._adapters[handle]
        except KeyError:
            raise NotFound(f"no adapter with handle {handle} in this engine") from None

    # ---- training -------------------------------------------------------------------------

    def validate(self, req: FwdBwdRequest) -> None:
        """Raise a typed error if `req` cannot run; cheap, no model work."""
        self._live(req.adapter)
        losses.resolve_config(req.loss_fn, req.loss_config)
        if not req.data:
            raise InvalidRequest("forward_backward needs at least one datum")
        for i, d in enumerate(req.data):
            n = int(d.tokens.shape[0]) if d.tokens.ndim == 1 else -1
            if n < 1:
                raise BadTokens(f"datum {i}: model_input must be a non-empty 1-D token sequence")
            self._check_ids(d.tokens, f"datum {i} model_input")
            losses.check_inputs(req.loss_fn, n, d.loss_inputs)
            self._check_ids(d.loss_inputs["target_tokens"], f"datum {i} target_tokens")
            if n > self.info.max_context:
                raise InvalidRequest(f"datum {i}: {n} tokens exceed the context of {self.info.max_context}")
            if d.routes is not None:
                self._check_routes(d.routes, n, f"datum {i}")

    def _check_routes(self, routes: Tensor, n: int, what: str) -> None:
        """Recorded routes must be int expert ids [moe_layers, n, top_k] of this base."""
        if not self.router_paths:
            raise InvalidRequest(f"{what}: routes given but {self.info.name} is not a mixture of experts")
        want = (len(self.router_paths), n, self.info.experts_per_token)
        if routes.dtype.is_floating_point or routes.dtype == torch.bool or tuple(routes.shape) != want:
            raise InvalidRequest(
                f"{what}: routes must be integer expert ids of shape {want} (moe layers, tokens, top_k); "
                f"got {routes.dtype} {tuple(routes.shape)}"
            )
        if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= self.info.num_experts):
            raise InvalidRequest(f"{what}: routes must be expert ids in [0, {self.info.num_experts})")

    def _check_ids(self, ids: Tensor, what: str) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise BadTokens(f"{what}: token ids must be integers, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
            raise BadTokens(f"{what}: token ids must be in [0, {self.info.vocab_size}); got {int(ids.min())}..{int(ids.max())}")

    def forward_backward(self, reqs: list[FwdBwdRequest]) -> list[FwdBwdResult]:
        """Run every request in one fused forward (and one backward for the trainable ones).

        Each adapter's gradient equals what it would get alone: losses are sums and rows of
        different adapters share no trainable tensor. Gradients accumulate until optim_step.
        """
        for req in reqs:
            self.validate(req)
        configs = [losses.resolve_config(r.loss_fn, r.loss_config) for r in reqs]
        train = any(not r.forward_only for r in reqs)
        # one slot per request: forward-only requests see detached weights (no gradient)
        slots = [self._slot_weights(r) for r in reqs]
        rows = [(ri, d) for ri, r in enumerate(reqs) for d in r.data]
        dev = self.device
        slot_B = torch.tensor([ri for ri, _ in rows], device=dev)
        tokens_BT = right_pad([d.tokens.to(torch.int64) for _, d in rows], pad=0).to(dev)
        targets = [d.loss_inputs["target_tokens"].to(torch.int64) for _, d in rows]
        with torch.set_grad_enabled(train):
            operands = row_operands(slots, slot_B, self.base.dtype)
            replay = self._replay(reqs, rows, tokens_BT.shape[1])
            # right padding needs no mask: causal attention never looks at later positions
            with self.runtime.use(operands), self.runtime.routes(replay=replay):
                logits_BTV = self.base.model(input_ids=tokens_BT, use_cache=False).logits
            lp_rows = target_logprobs(logits_BTV, targets)
            outputs: list[list[dict[str, Tensor]]] = [[] for _ in reqs]
            sums: list[Tensor] = [lp_rows[0].new_zeros(()) for _ in reqs]
            for b, (ri, d) in enumerate(rows):
                inputs = {k: v.to(dev) for k, v in d.loss_inputs.items()}
                loss_N = losses.elementwise_loss(reqs[ri].loss_fn, lp_rows[b], inputs, configs[ri])
                sums[ri] = sums[ri] + loss_N.sum()
                outputs[ri].append({"logprobs": lp_rows[b].detach().clone(), "elementwise_loss": loss_N.detach().clone()})
            total = sum((s for s, r in zip(sums, reqs) if not r.forward_only), lp_rows[0].new_zeros(()))
            if train and total.requires_grad:
                total.backward()
        return [
            FwdBwdResult(outputs=out, metrics={"loss:sum": float(s.detach())})
            for out, s in zip(outputs, sums)
        ]

    def _replay(self, reqs: list[FwdBwdRequest], rows: list, width: int) -> dict[str, Tensor]:
        """Per router: the expert ids to replay [B*T, k] (-1 where the batch routes normally)."""
        want = [(b, d.routes) for b, (ri, d) in enumerate(rows) if d.routes is not None and reqs[ri].replay_routes]
        if not want:
            return {}
        k = self.info.experts_per_token
        replay = {}
        for layer, path in enumerate(self.router_paths):
            ids_BTk = torch.full((len(rows), width, k), -1, dtype=torch.int64)
            for b, routes in want:
                ids_BTk[b, : routes.shape[1]] = routes[layer].to(torch.int64)
            replay[path] = ids_BTk.view(-1, k).to(self.device)
        return replay

    def _slot_weights(self, req: FwdBwdRequest) -> LoraWeights:
        w = self._live(req.adapter).weights
        if not req.forward_only:
            return w
        return LoraWeights(w.spec, {p: (a.detach(), b.detach()) for p, (a, b) in w.pairs.items()})

    def optim_step(self, handle: int, hp: AdamParams) -> dict[str, float]:
        """Apply AdamW to the accumulated gradients, then clear them."""
        live = self._live(handle)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live.params]
        metrics = adamw_step(live.params, grads, live.opt, hp)
        if not all(math.isfinite(float(p.detach().abs().max())) for p in live.params[:2]):
            log.warning("adapter %d has non-finite weights after a step", handle)
        self.discard_grads(handle)
        return metrics

    # ---- sampling -------------------------------------------------------------------------

    def validate_sample(self, req: SampleRequest) -> None:
        p = req.params
        if req.adapter is not None:
            self._live(req.adapter)
        if not req.prompt:
            raise BadTokens("the prompt is empty: give at least one token")
        self._check_ids(torch.tensor(req.prompt, dtype=torch.int64), "prompt")
        if p.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {p.max_tokens}")
        if req.num_samples < 1:
            raise InvalidRequest(f"num_samples must be >= 1, got {req.num_samples}")
        if len(req.prompt) + p.max_tokens > self.info.max_context:
            raise InvalidRequest(
                f"prompt ({len(req.prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                f"context length {self.info.max_context} of {self.info.name}"
            )
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            raise InvalidRequest(f"temperature must be >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 (off) or >= 0, got {p.top_k}")
        if p.stop_token_ids is not None:
            self._check_ids(torch.tensor(list(p.stop_token_ids), dtype=torch.int64), "stop token ids")
        if p.grammar is not None and p.grammar.vocab_size != self.info.vocab_size:
            raise InvalidRequest(f"the grammar was compiled for a vocabulary of {p.grammar.vocab_size} "
                                 f"tokens, {self.info.name} has {self.info.vocab_size}")
        self._check_logits_params(p, req)
        if req.record_routes and not self.router_paths:
            raise InvalidRequest(f"record_routes: {self.info.name} is not a mixture of experts")

    def _check_logits_params(self, p: SamplingParams, req: SampleRequest) -> None:
        """The settings of the logits pipeline (engine/logits.py) and of top-k logprobs."""
        for name, value, lo, hi in (("presence_penalty", p.presence_penalty, -2.0, 2.0),
                                    ("frequency_penalty", p.frequency_penalty, -2.0, 2.0)):
            if not lo <= value <= hi:
                raise InvalidRequest(f"{name} must be in [{lo}, {hi}], got {value}")
        if not (0 < p.repetition_penalty <= 2.0):
            raise InvalidRequest(f"repetition_penalty must be in (0, 2], got {p.repetition_penalty}")
        if p.logit_bias:
            self._check_ids(torch.tensor([t for t, _ in p.logit_bias], dtype=torch.int64), "logit_bias token ids")
            bad = [v for _, v in p.logit_bias if not -100 <= v <= 100]
            if bad:
                raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bad[0]}")
        if not 0 <= p.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {p.min_p}")
        if p.allowed_token_ids is not None:
            if not p.allowed_token_ids:
                raise InvalidRequest("allowed_token_ids must not be empty")
            self._check_ids(torch.tensor(p.allowed_token_ids, dtype=torch.int64), "allowed_token_ids")
        if not 0 <= p.min_tokens <= p.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens = {p.max_tokens}], got {p.min_tokens}")
        for name, k in (("top_logprobs", p.top_logprobs), ("topk_prompt_logprobs", req.topk_prompt_logprobs)):
            if not 0 <= k <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")

    def sample(self, reqs: list[SampleRequest],
               on_token: Callable[[int, int, int, float], bool | None] | None = None) -> list[SampleResult]:
        """Sample all requests in one decode batch (rows of many adapters together).

        `on_token(request, sample, token, logprob)` is called after each decode step for every
        token chosen (on the calling thread), for streaming; returning True stops that row
        early (stop_reason 'abort'), e.g. because its client went away.
        """
        for req in reqs:
            self.validate_sample(req)
        adapters = [self.sampling_weights(r.adapter) for r in reqs]
        return generate(
            self.base.model, self.runtime, self.base.tokenizer, self.base.eos_token_id, reqs, adapters,
            router_paths=self.router_paths, on_token=on_token,
        )

    @torch.no_grad()
    def score_prompt(self, prompt: list[int], scoring: PromptScoring, operands: RowOperands,
                     chunk: int = 512) -> tuple[PromptScores, Tensor]:
        """One forward of `prompt` (in chunks over a KV cache, one row, the given LoRA operands):
        its `PromptScores` and the logits [1, V] after its last token (to sample from)."""
        from transformers.cache_utils import DynamicCache

        scorer = PromptScorer(prompt, scoring)
        cache = DynamicCache()
        ids = torch.tensor([prompt], dtype=torch.int64, device=self.device)
        last = None
        with self.runtime.use(operands):
            for start in range(0, len(prompt), chunk):
                end = min(start + chunk, len(prompt))
                out = self.base.model(input_ids=ids[:, start:end], cache=cache, use_cache=True,
                                      position_ids=torch.arange(start, end, device=self.device)[None],
                                      logits_to_keep=0 if scoring.full_logits else 1)
                cache = out.cache
                if scoring.full_logits:
                    scorer.feed(start, out.logits[0])
                last = out.logits[:, -1]
        return scorer.result(), last

    def decode_forward(self, **inputs):
        """One model forward of the continuous decoder (a prefill chunk or a decode step)."""
        return self.base.model(**inputs)

    def sampling_weights(self, handle: int | None) -> LoraWeights | None:
        """The weights sampling rows of `handle` use (None: the base alone)."""
        if handle is None:
            return None
        return self._live(handle).weights
