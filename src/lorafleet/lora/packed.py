"""The two layouts of routed-expert LoRA tensors, and lossless conversion between them.

- **per-expert** (PEFT / vLLM naming): one 2-D pair per expert and projection,
  `model.layers.{l}.mlp.experts.{e}.{proj}` -> (A [r, in], B [out, r]). A Qwen3-30B-A3B adapter
  on gate/up/down + attention holds 37,248 tensors in this layout.
- **packed** (lorafleet, MinT's serving layout): one 3-D pair per layer and projection,
  `model.layers.{l}.mlp.experts.{proj}` -> (A [E, r, in], B [E, out, r]); A[e] / B[e] are expert
  e's matrices (672 tensors for the same adapter). This is also how `LoraWeights` holds expert
  LoRA in memory, so loading a packed file needs no per-expert work at all.

Packing stacks, unpacking indexes: both copy values exactly, so a round trip is bit-identical.
Also here: PEFT's own form for transformers' fused 3-D expert parameters (`target_parameters`),
which imports exactly into the per-expert model (see `from_peft_param_wrappers`). Pure: tensors
in, tensors out; file bytes are lorafleet/lora/io.py's business.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lorafleet.errors import IncompatibleAdapter

Pairs = dict[str, tuple[Tensor, Tensor]]

PACKED = "packed"
PER_EXPERT = "per_expert"
LAYOUTS = (PER_EXPERT, PACKED)
# safetensors metadata of a packed file: the layout and the expert count, to check on import
LAYOUT_KEY = "lorafleet.layout"
EXPERTS_KEY = "lorafleet.num_experts"
PACKED_LAYOUT_V1 = "packed-experts-v1"

PER_EXPERT_PATH = re.compile(r"\A(.+\.experts)\.(\d+)\.(\w+)\Z")
PACKED_PATH = re.compile(r"\A(.+\.experts)\.([a-z_]+)\Z")


def is_packed_pair(path: str, a: Tensor) -> bool:
    """A routed-expert pair in the packed layout (3-D, `...experts.{proj}`)."""
    return a.ndim == 3 and PACKED_PATH.match(path) is not None


def unpack_experts(pairs: Pairs) -> Pairs:
    """Packed -> per-expert: every 3-D pair becomes E pairs `...experts.{e}.{proj}` (views)."""
    out: Pairs = {}
    for path, (a_ERK, b_EDR) in pairs.items():
        if not is_packed_pair(path, a_ERK):
            out[path] = (a_ERK, b_EDR)
            continue
        prefix, proj = PACKED_PATH.match(path).groups()  # type: ignore[union-attr]
        for e in range(a_ERK.shape[0]):
            out[f"{prefix}.{e}.{proj}"] = (a_ERK[e], b_EDR[e])
    return out


def pack_experts(pairs: Pairs) -> Pairs:
    """Per-expert -> packed: stack `...experts.{e}.{proj}` over e = 0..E-1 into one 3-D pair.

    Each packed pair takes the place of its projection's first per-expert pair, so the order
    of modules survives a round trip (the engine's optimizer state is positional).

    Raises IncompatibleAdapter when the expert ids of a (layer, projection) are not exactly
    0..E-1 (a missing expert), or when projections of one layer disagree on E.
    """
    groups: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    out: Pairs = {}
    for path, pair in pairs.items():
        m = PER_EXPERT_PATH.match(path)
        if m is None:
            out[path] = pair
            continue
        key = f"{m.group(1)}.{m.group(3)}"
        if key not in groups:
            out[key] = pair  # placeholder holding the position; replaced below
        groups.setdefault(key, {})[int(m.group(2))] = pair
    for path, by_expert in groups.items():
        ids = sorted(by_expert)
        absent = sorted(set(range(ids[-1] + 1)) - set(ids))
        if absent:
            raise IncompatibleAdapter(
                f"{path}: experts {absent[:8]} are missing (found {len(ids)} of {ids[-1] + 1})"
            )
        shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in by_expert.values()}
        if len(shapes) != 1:
            raise IncompatibleAdapter(f"{path}: experts have different shapes {sorted(shapes)[:3]}")
        out[path] = (torch.stack([by_expert[e][0] for e in ids]), torch.stack([by_expert[e][1] for e in ids]))
    by_layer: dict[str, set[int]] = {}
    for p, (a, _) in out.items():
        if is_packed_pair(p, a):
            by_layer.setdefault(p.rsplit(".", 1)[0], set()).add(int(a.shape[0]))
    for layer, ns in by_layer.items():
        if len(ns) > 1:
            raise IncompatibleAdapter(f"{layer}: projections have different expert counts {sorted(ns)}")
    return out


def layout_of(paths: list[str], ndims: list[int]) -> str | None:
    """PACKED, PER_EXPERT, or None (no routed-expert tensors); IncompatibleAdapter if both."""
    per_expert = any(PER_EXPERT_PATH.match(p) for p in paths)
    packed = any(n == 3 and PACKED_PATH.match(p) for p, n in zip(paths, ndims))
    if per_expert and packed:
        raise IncompatibleAdapter(
            "the adapter mixes layouts: it holds both per-expert tensors (`experts.{e}.proj`) and "
            "packed ones (`experts.proj` [E, r, d]); export one layout per file"
        )
    return PACKED if packed else PER_EXPERT if per_expert else None


def from_peft_param_wrappers(
    found: dict[str, tuple[Tensor, Tensor]], rank: int, names: tuple[str, ...]
) -> Pairs:
    """PEFT `target_parameters` LoRA on fused expert tensors -> our packed gate/up/down pairs.

    PEFT 0.21 puts one LoRA on `experts.gate_up_proj` [E, 2I, H] and one on `experts.down_proj`
    [E, H, I], nesting the wrappers: the keys are `...mlp.experts.base_layer.lora_{A,B}` and
    `...mlp.experts.lora_{A,B}` (which is which depends on the order PEFT wrapped them, so we
    tell them apart by shape). Its lora_A is [E*r, in] read as [E, r, in] and its lora_B is
    [out, r*E] read as [out, r, E]. A fused gate_up LoRA (B [2I, r], A) is exactly a gate LoRA
    (B[:I], A) plus an up LoRA (B[I:], A) sharing A, so the import is exact.

    Args:
        found: `{prefix}` (`model.layers.0.mlp.experts` or `....experts.base_layer`) -> (A, B).
        rank: the adapter's r.
        names: the fused parameters the adapter targets, from `target_parameters`.
    """
    layers: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for prefix, pair in found.items():
        layers.setdefault(prefix.removesuffix(".base_layer"), []).append(pair)
    out: Pairs = {}
    for prefix, got in layers.items():
        for name, (a, b) in zip(_assign(prefix, got, names), got):
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] % rank or b.shape[1] != a.shape[0]:
                raise IncompatibleAdapter(
                    f"{prefix}: PEFT expert LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit r={rank}"
                )
            n_exp = a.shape[0] // rank
            a_ERK = a.reshape(n_exp, rank, a.shape[1])
            b_EDR = b.reshape(b.shape[0], rank, n_exp).permute(2, 0, 1)
            if name == "down_proj":
                out[f"{prefix}.down_proj"] = (a_ERK.contiguous(), b_EDR.contiguous())
            else:
                half = b_EDR.shape[1] // 2  # [gate; up] concatenated along the output
                out[f"{prefix}.gate_proj"] = (a_ERK.contiguous(), b_EDR[:, :half].contiguous())
                out[f"{prefix}.up_proj"] = (a_ERK.clone(), b_EDR[:, half:].contiguous())
    return out


def _assign(prefix: str, got: list[tuple[Tensor, Tensor]], names: tuple[str, ...]) -> list[str]:
    """Which fused parameter each PEFT pair of one layer adapts (gate_up_proj or down_proj)."""
    if len(got) != len(names):
        raise IncompatibleAdapter(
            f"{prefix}: {len(got)} PEFT expert LoRAs but target_parameters lists {list(names)}"
        )
    if len(got) == 1:
        return list(names)
    (a0, b0), (a1, b1) = got
    # gate_up: in = H, out = 2I; down: in = I, out = H
    first_is_gate_up = b0.shape[0] == 2 * a1.shape[1] and b1.shape[0] == a0.shape[1]
    first_is_down = b1.shape[0] == 2 * a0.shape[1] and b0.shape[0] == a1.shape[1]
    if first_is_gate_up == first_is_down:
        raise IncompatibleAdapter(
            f"{prefix}: cannot tell the PEFT gate_up_proj and down_proj LoRAs apart by shape"
        )
    return ["gate_up_proj", "down_proj"] if first_is_gate_up else ["down_proj", "gate_up_proj"]


def to_peft_param_wrappers(pairs: Pairs, rank: int) -> tuple[dict[str, tuple[Tensor, Tensor]], int, list[str]]:
    """Our pairs -> PEFT 0.21 `target_parameters` form, for loading in PEFT (not a lossless layout).

    Routed-expert gate and up LoRAs become one LoRA on the fused `gate_up_proj`: with both
    present it needs rank 2r (A = [A_gate; A_up], B = blockdiag(B_gate, B_up)), so every other
    pair is zero-padded to 2r as well (zero rows and columns add nothing). Returns the
    PEFT-shaped 2-D pairs keyed by module prefix (`...mlp.experts[.base_layer]`, nested as
    PEFT nests them: gate_up_proj inside, down_proj outside), the rank used, and the fused
    parameters targeted (`gate_up_proj`, `down_proj`).
    """
    experts: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for path, (a, b) in pairs.items():
        if is_packed_pair(path, a):
            prefix, proj = PACKED_PATH.match(path).groups()  # type: ignore[union-attr]
            experts.setdefault(prefix, {})[proj] = (a, b)
    both = any({"gate_proj", "up_proj"} <= set(p) for p in experts.values())
    r_out = 2 * rank if both else rank
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for path, (a, b) in pairs.items():
        if not is_packed_pair(path, a):
            out[path] = (_pad_rows(a, r_out), _pad_rows(b.T, r_out).T)
    names: list[str] = []
    for prefix, projs in experts.items():
        fused = _fuse_gate_up(projs, rank, r_out)
        down = projs.get("down_proj")
        wrapped = [(n, p) for n, p in (("gate_up_proj", fused), ("down_proj", down)) if p is not None]
        for i, (name, (a_ERK, b_EDR)) in enumerate(wrapped):
            a_ERK = _pad_rows(a_ERK.transpose(0, 1), r_out).transpose(0, 1)
            b_EDR = _pad_rows(b_EDR.permute(2, 0, 1), r_out).permute(1, 2, 0)
            key = prefix + ".base_layer" * (len(wrapped) - 1 - i)
            n_exp = a_ERK.shape[0]
            out[key] = (a_ERK.reshape(n_exp * r_out, -1), b_EDR.permute(1, 2, 0).reshape(b_EDR.shape[1], r_out * n_exp))
            if name not in names:
                names.append(name)
    return out, r_out, names


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """`t` with zero rows appended along dim 0 up to `rows`."""
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]).contiguous()


def _fuse_gate_up(projs: dict[str, tuple[Tensor, Tensor]], rank: int, r_out: int) -> tuple[Tensor, Tensor] | None:
    """One LoRA on [gate; up] (A [E, r_out, H], B [E, 2I, r_out]) equal to the gate and up LoRAs."""
    gate, up = projs.get("gate_proj"), projs.get("up_proj")
    if gate is None and up is None:
        return None
    a0, b0 = gate if gate is not None else up  # type: ignore[misc]
    n_exp, _, hidden = a0.shape
    inter = b0.shape[1]
    a = a0.new_zeros(n_exp, r_out, hidden)
    b = b0.new_zeros(n_exp, 2 * inter, r_out)
    col = 0
    for half, pair in ((0, gate), (1, up)):
        if pair is not None:
            a[:, col : col + rank] = pair[0]
            b[:, half * inter : (half + 1) * inter, col : col + rank] = pair[1]
            col += rank
    return a, b
