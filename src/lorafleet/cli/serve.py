"""`lorafleet serve`: the Tinker-compatible training and sampling service."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from pathlib import Path

from lorafleet.errors import InvalidRequest

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# after SIGTERM, how long uvicorn waits for open responses (Tinker long polls, streams that are
# not reading) before it cancels them; streams themselves end at once (begin_shutdown)
GRACEFUL_SHUTDOWN_S = 10
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
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lorafleet.api.app import ServeConfig, begin_shutdown, create_app
    from lorafleet.config import paths_from_env
    from lorafleet.model.registry import canonical_name

    check_auth(args.auth, args.host)
    bases = list(dict.fromkeys(canonical_name(b) for b in args.bases or [DEFAULT_BASE]))  # paths made absolute
    cfg = ServeConfig(bases=bases, paths=paths_from_env(), auth=args.auth,
                      dtype=args.dtype, threads=args.threads, state_dir=args.state_dir,
                      max_slots=args.max_slots, max_host_adapters=args.max_host_adapters or None,
                      max_host_bytes=args.max_host_bytes, load_queue=args.load_queue,
                      load_batch=args.load_batch, max_runs=args.max_runs, max_queued=args.max_queued,
                      max_adapters=args.max_adapters)
    if args.max_body_bytes is not None:
        cfg.max_body_bytes = args.max_body_bytes
    if args.max_json_bytes is not None:
        cfg.max_json_bytes = args.max_json_bytes
    app = create_app(cfg)
    log.info("serving %s on http://%s:%d (auth %s)", cfg.bases, args.host, args.port, args.auth)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            begin_shutdown(app)  # before uvicorn waits for open streams to finish
            await super().shutdown(sockets)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)).run()
    return 0
