"""`lorafleet sample`: complete a prompt on a base model, optionally with a PEFT adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.config import Paths, paths_from_env
from lorafleet.errors import InvalidRequest
from lorafleet.cli.serve import DEFAULT_BASE  # not lorafleet.model: every CLI call would import torch

if TYPE_CHECKING:
    from lorafleet.lora.io import PeftAdapter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="complete a prompt (greedy by default)")
    p.add_argument("--base", help="a registered name, model folder, cached repo id or .gguf file "
                                  f"(default: the adapter's base, else {DEFAULT_BASE})")
    p.add_argument("--adapter", help="a PEFT LoRA folder, or a catalog reference "
                                     "(owner/name, owner/name:alias, owner/name@rev, tinker://...)")
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the base's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafleet.engine import Engine, SampleRequest, SamplingParams
    from lorafleet.model import load_base

    paths = paths_from_env()
    adapter, adapter_base = _adapter(args.adapter, paths) if args.adapter else (None, None)
    base = load_base(args.base or adapter_base or DEFAULT_BASE, paths, dtype=args.dtype)
    engine = Engine(base)
    handle = None
    if adapter is not None:
        handle = engine.create_adapter(adapter.spec, weights=adapter.weights)
    tok = base.tokenizer
    if args.chat:
        prompt = list(tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_dict=False
        ))
    else:
        prompt = tok.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    (result,) = engine.sample([SampleRequest(handle, prompt, 1, params)])
    print(tok.decode(result.sequences[0].tokens, skip_special_tokens=True))
    return 0


def _adapter(where: str, paths: Paths) -> tuple[PeftAdapter, str | None]:
    """(the adapter, the base it is for) from a folder or a catalog reference; read before the
    base is loaded, so a bad reference fails at once."""
    from lorafleet.lora.io import parse_peft_files, read_peft_dir

    if Path(where).is_dir():
        from lorafleet.model.registry import list_bases

        adapter = read_peft_dir(where)  # its base_model_name_or_path is often a local path
        return adapter, adapter.base_model if adapter.base_model in list_bases() else None
    if Path(where).exists() or where.startswith((".", "/", "~")):
        raise InvalidRequest(f"--adapter {where}: not a PEFT folder")
    from lorafleet.catalog.records import ADMIN
    from lorafleet.catalog.service import Catalog

    cat = Catalog.open(paths.database_url, paths.store_url)
    try:
        try:
            rev = cat.resolve(where, ADMIN)
        except InvalidRequest as e:
            raise InvalidRequest(f"--adapter {where!r} is neither a PEFT folder nor a catalog reference ({e})") from None
        policy = cat.get_policy(ADMIN, rev.policy)
        return parse_peft_files(cat.read_files(ADMIN, rev.id)), policy.base_model
    finally:
        cat.close()
