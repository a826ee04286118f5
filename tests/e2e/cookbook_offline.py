"""Run the unmodified tinker-cookbook 0.6.1 recipes `sl_loop` / `rl_loop` offline against lorafleet.

    python tests/e2e/cookbook_offline.py sl|rl BASE_URL MODEL TOKENIZER_DIR LOG_DIR [key=value ...]

No installed file is edited; this wrapper only fills in what the cookbook cannot know offline
(reference/tinker_protocol.md, "Cookbook 0.6.1 as run offline"):
1. the tokenizer: `tokenizer_utils.register_tokenizer(model, <local folder>)` (public API);
2. the model table: the cookbook knows no `HuggingFaceTB/` or `lorafleet/` models, so the model
   gets ChatML's `qwen3_instruct` renderer (token-identical to SmolLM2's template when a system
   message is present; stop token `<|im_end|>`);
3. the datasets: small synthetic `no_robots` / `gsm8k` stand-ins instead of the HF Hub;
4. rl only: a small model never solves GSM8K, every group would get zero advantages and
   rl_loop would skip training, so the reward adds a length-based term to keep variance.
Extra `key=value` arguments go to the recipe's chz Config.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TINKER_API_KEY", "tml-cookbook")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def patch(model: str, tokenizer_dir: str) -> None:
    import datasets
    from transformers import AutoTokenizer

    from tinker_cookbook import model_info, tokenizer_utils

    tokenizer_utils.register_tokenizer(model, lambda: AutoTokenizer.from_pretrained(tokenizer_dir))
    known = model_info.get_model_attributes

    def attributes(name: str):
        if name.split(":")[0] == model:
            return model_info.ModelAttributes(
                organization=model.split("/")[0], version_str="2", size_str="135M", is_chat=True,
                recommended_renderers=("qwen3_instruct",))
        return known(name)

    model_info.get_model_attributes = attributes

    def load_dataset(path, name=None, *args, **kwargs):
        if path == "HuggingFaceH4/no_robots":
            rows = [{"messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Say the number {i} in words."},
                {"role": "assistant", "content": f"The number is {i}."},
            ]} for i in range(64)]
        elif path == "openai/gsm8k":
            rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
                    for i in range(64)]
        else:
            raise RuntimeError(f"offline: no dataset {path!r}")
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                     "test": datasets.Dataset.from_list(rows[:8])})

    datasets.load_dataset = load_dataset


def main(argv: list[str]) -> None:
    recipe, url, model, tokenizer_dir, log_dir, *extra = argv
    patch(model, tokenizer_dir)
    import chz

    if recipe == "sl":
        from tinker_cookbook.recipes import sl_loop as mod
    else:
        from tinker_cookbook.recipes import rl_loop as mod

        official = mod.get_reward
        mod.get_reward = lambda response, answer: official(response, answer) + (len(response) % 3) / 3
    overrides = dict(x.split("=", 1) for x in extra)
    overrides.update(base_url=url, model_name=model, log_path=log_dir)
    config = chz.entrypoint(mod.Config, argv=[f"{k}={v}" for k, v in overrides.items()])
    mod.main(config)


if __name__ == "__main__":
    main(sys.argv[1:])
    os._exit(0)  # the SDK's background threads must not keep the process alive
