"""`lorafleet sample`: complete a prompt on a base model, optionally with a PEFT adapter."""

from __future__ import annotations

import argparse

from lorafleet.config import paths_from_env
from lorafleet.model import DEFAULT_BASE, load_base


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="complete a prompt (greedy by default)")
    p.add_argument("--base", default=DEFAULT_BASE, help="a registered name, model folder, cached repo id or .gguf file (default: %(default)s)")
    p.add_argument("--adapter", help="a PEFT LoRA directory to apply")
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
    from lorafleet.lora.io import read_peft_dir

    base = load_base(args.base, paths_from_env(), dtype=args.dtype)
    engine = Engine(base)
    handle = None
    if args.adapter:
        adapter = read_peft_dir(args.adapter)
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
