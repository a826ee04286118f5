"""`lorafleet cookbook RECIPE [key=value ...]`: a tinker-cookbook recipe against lorafleet, offline
(see lorafleet/cookbook.py for what is filled in)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lorafleet.config import paths_from_env
from lorafleet.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cookbook", help="run a tinker-cookbook recipe (sl_loop, rl_loop, ...) offline against lorafleet",
        description="Run tinker_cookbook.recipes.RECIPE unmodified against a lorafleet server, "
                    "without the Hugging Face Hub: the tokenizer comes from the lorafleet base, "
                    "datasets from --data files (or --demo-data). key=value arguments go to the "
                    "recipe's Config (base_url defaults to $TINKER_BASE_URL or "
                    "http://127.0.0.1:8000, model_name to the default base).")
    p.add_argument("recipe", help="module under tinker_cookbook.recipes, e.g. sl_loop or rl_loop")
    p.add_argument("settings", nargs="*", metavar="key=value", help="recipe Config fields")
    p.add_argument("--data", action="append", default=[], metavar="HUB_NAME=PATH",
                   help="answer load_dataset(HUB_NAME) from a local .jsonl/.json/.parquet/.csv "
                        "file (the train split) or a dataset folder (repeatable)")
    p.add_argument("--demo-data", action="store_true",
                   help="64 made-up rows for the recipes' datasets (no_robots, gsm8k, SciKnowEval, "
                        "DeepMath-103K, tulu-3-sft-mixture, hh-rlhf), eight sentences for "
                        "prompt_distillation.create_data, to try a recipe")
    p.add_argument("--renderer", help="cookbook renderer for the model (default for lorafleet "
                                      "bases: qwen3_instruct, i.e. ChatML)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafleet import cookbook

    overrides = {}
    for item in args.settings:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"{item!r}: recipe settings are key=value")
        overrides[k] = v
    cookbook.run(args.recipe, overrides, paths_from_env(), renderer=args.renderer,
                 data=cookbook.parse_data(args.data), demo_data=args.demo_data)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the tinker SDK's background threads would keep the process alive
