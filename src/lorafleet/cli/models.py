"""`lorafleet models ls | show`: the bases `--base` can load here, and what one of them is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list and describe base models (docs/models.md)")
    msub = p.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("ls", help="registered bases and supported models in the local Hugging Face cache")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=run_ls)
    show = msub.add_parser("show", help="architecture, parameters, context, dtype, LoRA targets and digest of a base")
    show.add_argument("base", help="a registered name, a model folder, a cached repo id, or a .gguf file")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)


def _cached_repos() -> list[str]:
    """Repo ids of supported models in the local Hugging Face cache (offline)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from lorafleet.model.architectures import SUPPORTED
    from lorafleet.model.sources import hf_cache_dir

    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, OSError):
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            cfg = Path(rev.snapshot_path) / "config.json"
            try:
                if json.loads(cfg.read_text()).get("model_type") in SUPPORTED:
                    out.append(repo.repo_id)
                    break
            except (OSError, ValueError):
                continue
    return sorted(out)


def run_ls(args: argparse.Namespace) -> int:
    from lorafleet.model.registry import base_info, list_bases

    for name in [*list_bases(), *_cached_repos()]:
        info = base_info(name)
        row = {"name": name, "architecture": info.arch, "parameters": info.num_parameters,
               "max_context": info.max_context, "source": info.source}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{name:48s} {info.arch:12s} {_size(info.num_parameters):>8s} ctx {info.max_context:<7d} {info.source}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from lorafleet.model.registry import base_digest, base_info, describe, resolve
    from lorafleet.model.sources import REGISTRY

    info = base_info(args.base)
    src = resolve(args.base)
    dtype = None
    if src.kind != REGISTRY:
        from lorafleet.model.registry import model_folder

        cfg = json.loads((model_folder(src, None) / "config.json").read_text())
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    d = describe(info, base_digest(args.base), dtype)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key in ("name", "family", "architecture", "source", "parameters", "layers", "hidden_size",
                "vocab_size", "max_context", "dtype", "num_experts", "experts_per_token", "digest"):
        value = _size(d[key]) if key == "parameters" else d[key]
        if value not in (None, 0) or key in ("name", "digest"):
            print(f"{key:18s} {value}")
    print("lora targets")
    for proj, t in d["lora_sites"].items():
        experts = f" x {t['experts']} experts" if "experts" in t else ""
        print(f"  {proj:20s} {t['sites']:4d} sites  [{t['shape'][0]}, {t['shape'][1]}]{experts}")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
