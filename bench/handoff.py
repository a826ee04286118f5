"""Policy handoff: from "optimizer step finished" to "the sampler's first token on the new weights"
(SmolLM2-135M, LoRA rank 1 and 32 on all projections). Prints ONE JSON line.

    python bench/handoff.py            # 5 repeats per rank
    python bench/handoff.py --quick    # 2 repeats per rank

Three paths, interleaved repeat by repeat after a real `forward_backward` + `optim_step`:
  sdk     adapter-only handoff as recipes/grpo.py does it, through the tinker SDK against a
          server on loopback (in this process): save_weights_for_sampler (an immutable catalog
          revision: PEFT files written and hashed) + create_sampling_client + sample(max_tokens=1);
  engine  the same handoff inside the engine: copy the adapter tensors into a sampler slot and
          sample one token (no files, no HTTP);
  merged  the baseline that moves a full checkpoint: merge B@A*scale into the base weights, save
          the full model as safetensors (+ config), load it into a fresh transformers model,
          run the prompt, take the first token.
With a vLLM environment (`make vllm-venv`, or LORAFLEET_VLLM_PYTHON), two more paths into vLLM
(docs/vllm.md), a lorafleet server with `--sampler vllm`, after the same kind of training step:
  vllm         adapter-only: save_weights_for_sampler (the revision is registered in vLLM before
               the future completes) + create_sampling_client + sample(max_tokens=1) on vLLM;
  vllm_merged  merge B@A*scale into the base, write the full model folder, start vLLM on it
               (a restart: vLLM cannot swap its weights), first token from its completions API.
Keys vllm_handoff_s_r*, vllm_merged_handoff_s_r*, vllm_handoff_speedup_r* (merged / adapter)
and vllm_first_token_agree_r*; without a vLLM environment, "vllm": "skipped: <why>".
`--vllm-only` runs these two paths alone (1 repeat with --quick, else 2).
Keys: handoff_speedup_r1 / _r32 = merged / sdk (target >= 18.3, MinT's 4B dense figure),
handoff_speedup_engine_r*, adapter_bytes_over_base_bytes_r*, per-path medians in seconds and
the merged path's breakdown, and handoff_overhead_speedup_r* = the same ratio with each path's
one-token forward (first_token_s_r*, paid by every path alike) taken out. The merged model's greedy first token is checked against the
sampler's (`first_token_agree`): both paths serve the same weights.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import SMOL, emit, median, note, parse_args, set_threads  # noqa: E402

os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANKS = (1, 32)
PROMPT = "What is 7 + 5? Answer with just the number."


def main() -> None:
    only_vllm = "--vllm-only" in sys.argv  # the vLLM paths alone (each merged one starts a vLLM)
    if only_vllm:
        sys.argv.remove("--vllm-only")
    args = parse_args(__doc__.splitlines()[0])
    if "--threads" not in sys.argv:
        args.threads = 1  # a server and its client share 2 cores: 1 thread (small_models.md)
    if "--repeats" not in sys.argv:
        args.repeats = 2 if args.quick else 5
    set_threads(args.threads)
    import tinker
    import torch
    import uvicorn
    from safetensors.torch import save_file
    from tinker import types
    from transformers import AutoModelForCausalLM

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.config import Paths, paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.engine.types import SampleRequest, SamplingParams
    from lorafleet.lora.io import peft_files
    from lorafleet.model import load_base
    from lorafleet.model.smollm2 import _cache_dir

    home = paths_from_env()
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-handoff-"))
    paths = Paths(home.home, f"sqlite:///{tmp / 'catalog.db'}", str(tmp / "store"))
    note("loading SmolLM2 (server engine + a plain copy for the merged baseline)")
    base = load_base(SMOL, paths)
    engine = Engine(base)
    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=tmp / "tinker",
                                 engines={SMOL: (base, engine)}, threads=args.threads))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    service = tinker.ServiceClient(base_url=url)
    runner = app.state.tinker.runners[SMOL]
    model_dir = _cache_dir(home.models_dir) / "model"
    base_bytes = (model_dir / "model.safetensors").stat().st_size
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tied = bool(getattr(plain.config, "tie_word_embeddings", False))
    tok = base.tokenizer
    prompt = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                          add_generation_prompt=True, return_dict=False))
    greedy1 = types.SamplingParams(max_tokens=1, temperature=0.0)
    train_batch = [types.Datum(model_input=types.ModelInput.from_ints(prompt + [33]),
                               loss_fn_inputs={"target_tokens": prompt[1:] + [33, 2]})]
    out: dict[str, object] = {"bench": "handoff", "base": SMOL, "threads": args.threads,
                              "repeats": args.repeats, "base_bytes": base_bytes}

    for rank in () if only_vllm else RANKS:
        tc = service.create_lora_training_client(base_model=SMOL, rank=rank, seed=0).result()
        live = runner.runs[tc.model_id]
        sampler_slot = engine.create_adapter(live.spec, seed=0)  # the engine path's sampler slot
        times: dict[str, list[float]] = {"sdk": [], "engine": [], "merged": []}
        parts: dict[str, list[float]] = {"merge": [], "save": [], "load": [], "first_token": []}
        sdk_parts: dict[str, list[float]] = {"save_weights_for_sampler": [], "create_sampling_client": [],
                                             "sample_1_token": []}
        sample_only: list[float] = []  # the engine path's one-token sample alone
        agree: list[bool] = []  # one check per rank after the timed repeats
        counter = [0]

        def train_step() -> None:
            tc.forward_backward(train_batch, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()

        def sdk() -> int:
            counter[0] += 1
            t0 = time.perf_counter()
            path = tc.save_weights_for_sampler(f"r{rank}-{counter[0]}").result().path
            t1 = time.perf_counter()
            sc = service.create_sampling_client(model_path=path).result()
            t2 = time.perf_counter()
            token = sc.sample(types.ModelInput.from_ints(prompt), 1, greedy1).result().sequences[0].tokens[0]
            for k, v in zip(sdk_parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                sdk_parts[k].append(v)
            return token

        def in_engine() -> int:
            engine.set_weights(sampler_slot, engine.get_weights(live.handle))
            t0 = time.perf_counter()
            res = engine.sample([SampleRequest(sampler_slot, prompt, 1, SamplingParams(max_tokens=1, temperature=0.0))])
            sample_only.append(time.perf_counter() - t0)
            return res[0].sequences[0].tokens[0]

        def merged() -> int:
            t0 = time.perf_counter()
            weights = engine.get_weights(live.handle)
            scale = weights.spec.scale
            with torch.no_grad():
                sd = dict(plain.state_dict())
                for mod, (a, b) in weights.pairs.items():
                    key = f"{mod}.weight"
                    sd[key] = sd[key] + scale * (b @ a)
                if tied:
                    sd.pop("lm_head.weight", None)
                sd = {k: v.contiguous() for k, v in sd.items()}
            t1 = time.perf_counter()
            ckpt = tmp / f"merged-r{rank}"
            ckpt.mkdir(exist_ok=True)
            save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
            plain.config.save_pretrained(str(ckpt))
            t2 = time.perf_counter()
            fresh = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
            t3 = time.perf_counter()
            with torch.no_grad():
                token = int(fresh(torch.tensor([prompt])).logits[0, -1].argmax())
            t4 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k].append(v)
            return token

        fns = {"sdk": sdk, "engine": in_engine, "merged": merged}
        note(f"rank {rank}: warm-up, then {args.repeats} repeats")
        train_step()
        for name, fn in fns.items():  # warm-up (first sample compiles shapes, page cache)
            fn()
        for k in parts:
            parts[k].clear()
        sample_only.clear()
        for k in sdk_parts:
            sdk_parts[k].clear()
        for r in range(args.repeats):
            names = list(fns)[r % 3:] + list(fns)[:r % 3]
            for name in names:
                train_step()  # new weights each time: the handoff really moves fresh weights
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        # same weights through all three paths (no step in between): same greedy first token
        tokens = {name: fn() for name, fn in fns.items()}
        agree.append(len(set(tokens.values())) == 1)
        adapter_bytes = sum(len(v) for k, v in peft_files(engine.get_weights(live.handle), SMOL).items()
                            if k.endswith(".safetensors"))
        med = {k: median(v) for k, v in times.items()}
        first = median(sample_only[:args.repeats])  # the first-token forward both paths pay
        merged_first = statistics.median(parts["first_token"][:args.repeats])
        out |= {
            f"sdk_handoff_s_r{rank}": med["sdk"], f"engine_handoff_s_r{rank}": med["engine"],
            f"merged_handoff_s_r{rank}": med["merged"],
            f"merged_parts_s_r{rank}": {k: statistics.median(v[:args.repeats]) for k, v in parts.items()},
            f"sdk_parts_s_r{rank}": {k: statistics.median(v[:args.repeats]) for k, v in sdk_parts.items()},
            f"handoff_speedup_r{rank}": med["merged"] / med["sdk"],
            f"handoff_speedup_engine_r{rank}": med["merged"] / med["engine"],
            f"first_token_s_r{rank}": first,
            # the handoff without the one-token forward that every path pays
            f"handoff_overhead_speedup_r{rank}": (med["merged"] - merged_first) / max(med["sdk"] - first, 1e-9),
            f"adapter_bytes_r{rank}": adapter_bytes,
            f"adapter_bytes_over_base_bytes_r{rank}": adapter_bytes / base_bytes,
            f"first_token_agree_r{rank}": all(agree),
        }
        note(f"rank {rank}: sdk {med['sdk']:.3f} s, engine {med['engine']:.3f} s, merged {med['merged']:.3f} s")
        engine.remove_adapter(sampler_slot)
    server.should_exit = True
    server_thread.join(timeout=30)
    out |= vllm_handoff(args, paths, tmp, prompt, train_batch, plain, tied)
    emit(out)


def vllm_handoff(args, paths, tmp: Path, prompt: list[int], train_batch, plain, tied: bool) -> dict:  # type: ignore[no-untyped-def]
    """The two handoffs into vLLM (see the module docstring), interleaved repeat by repeat."""
    import httpx
    import tinker
    import torch
    import uvicorn
    from safetensors.torch import save_file
    from tinker import types

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.engine import Engine
    from lorafleet.engine.vllm import VllmSettings
    from lorafleet.engine.vllm.folders import base_folder
    from lorafleet.engine.vllm.process import VllmConfig, VllmProcess, default_python
    from lorafleet.model import load_base

    python = os.environ.get("LORAFLEET_VLLM_PYTHON") or default_python()
    if python is None:
        return {"vllm": "skipped: no vLLM environment (make vllm-venv, or LORAFLEET_VLLM_PYTHON)"}
    note("vLLM: starting lorafleet --sampler vllm")
    base = load_base(SMOL, paths)
    settings = VllmSettings(python=Path(python), max_lora_rank=max(RANKS), threads=args.threads)
    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=tmp / "tinker-vllm", sampler="vllm",
                                 vllm=settings, engines={SMOL: (base, Engine(base))}, threads=args.threads))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    service = tinker.ServiceClient(base_url=url)
    runner = app.state.tinker.runners[SMOL]
    greedy1 = types.SamplingParams(max_tokens=1, temperature=0.0)
    out: dict[str, object] = {}
    repeats = 1 if args.quick else 2
    for rank in RANKS:
        tc = service.create_lora_training_client(base_model=SMOL, rank=rank, seed=0).result()
        live = runner.runs[tc.model_id]
        counter = [0]

        def train_step() -> None:
            tc.forward_backward(train_batch, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()

        def adapter_only() -> int:
            counter[0] += 1
            path = tc.save_weights_for_sampler(f"vllm-r{rank}-{counter[0]}").result().path
            sc = service.create_sampling_client(model_path=path).result()
            return sc.sample(types.ModelInput.from_ints(prompt), 1, greedy1).result().sequences[0].tokens[0]

        def merged() -> int:
            weights = runner.engine.get_weights(live.handle)  # (the compute thread is idle between steps)
            with torch.no_grad():
                sd = dict(plain.state_dict())
                for mod, (a, b) in weights.pairs.items():
                    sd[f"{mod}.weight"] = sd[f"{mod}.weight"] + weights.spec.scale * (b @ a)
                if tied:
                    sd.pop("lm_head.weight", None)
                sd = {k: v.contiguous() for k, v in sd.items()}
            ckpt = tmp / f"vllm-merged-r{rank}"
            folder = base_folder(base, ckpt)  # tokenizer and config links, then the merged weights
            (folder / "model.safetensors").unlink()
            save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
            proc = VllmProcess(VllmConfig(python=Path(python), model_dir=folder, served_name="merged",
                                          max_loras=1, max_cpu_loras=1, max_lora_rank=8, threads=args.threads,
                                          log_path=ckpt / "vllm.log"))
            try:
                proc.start()
                r = httpx.post(f"{proc.url}/v1/completions", timeout=300, json={
                    "model": "merged", "prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True})
                return int(r.json()["choices"][0]["token_ids"][0])
            finally:
                proc.stop()

        fns = {"vllm": adapter_only, "vllm_merged": merged}
        train_step()
        adapter_only()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        agree = True
        for r in range(repeats):  # a vLLM start per merged handoff: both paths on the same weights
            train_step()
            tokens = {}
            for name in list(fns)[r % 2:] + list(fns)[:r % 2]:
                t0 = time.perf_counter()
                tokens[name] = fns[name]()
                times[name].append(time.perf_counter() - t0)
            agree = agree and len(set(tokens.values())) == 1  # same weights, same greedy first token
        med = {k: median(v) for k, v in times.items()}
        out |= {f"vllm_handoff_s_r{rank}": med["vllm"], f"vllm_merged_handoff_s_r{rank}": med["vllm_merged"],
                f"vllm_handoff_speedup_r{rank}": med["vllm_merged"] / med["vllm"],
                f"vllm_first_token_agree_r{rank}": agree}
        note(f"vLLM rank {rank}: adapter {med['vllm']:.3f} s, merged {med['vllm_merged']:.3f} s")
    server.should_exit = True
    thread.join(timeout=60)
    return out


if __name__ == "__main__":
    main()
