"""What lorafleet asks vLLM for (engine/vllm/sampler.py `completion_body`), and the command it
starts vLLM with: pure functions, no vLLM needed (tests/e2e/test_vllm_sampler.py runs the real one)."""

from __future__ import annotations

from pathlib import Path

from lorafleet.engine.types import SampleRequest, SamplingParams
from lorafleet.engine.vllm.process import VllmConfig
from lorafleet.engine.vllm.sampler import completion_body


def test_token_ids_in_and_out_with_the_engine_stop_semantics():
    req = SampleRequest(None, [1, 2, 3], 3, SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=0,
                                                           seed=4, stop_strings=("\n",)))
    b = completion_body("lf-x", req, stream=True)
    assert b["prompt"] == [1, 2, 3] and b["n"] == 3 and b["model"] == "lf-x" and b["stream"]
    assert b["return_token_ids"] and b["logprobs"] == 0 and not b["add_special_tokens"]
    assert b["top_k"] == -1 and b["seed"] == 4 and b["stop"] == ["\n"]
    assert "ignore_eos" not in b and "stop_token_ids" not in b  # None: stop on EOS, vLLM's default
    none = completion_body("m", SampleRequest(None, [1], params=SamplingParams(stop_token_ids=())), stream=False)
    assert none["ignore_eos"] and none["stop_token_ids"] == []  # empty: never stop on a token
    ids = completion_body("m", SampleRequest(None, [1], params=SamplingParams(stop_token_ids=(7, 9))), stream=False)
    assert ids["ignore_eos"] and ids["stop_token_ids"] == [7, 9]  # these instead of EOS
    assert "seed" not in ids and "prompt_logprobs" not in ids
    assert completion_body("m", SampleRequest(None, [1], prompt_logprobs=True), stream=False)["prompt_logprobs"] == 0


def test_command_enables_runtime_lora_on_loopback():
    cfg = VllmConfig(python=Path("/venv/bin/python"), model_dir=Path("/m"), served_name="base", max_loras=3,
                     max_cpu_loras=2, threads=1)
    cmd = cfg.command(1234)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    arg = dict(zip(cmd[3::1], cmd[4::1]))
    assert arg["--host"] == "127.0.0.1" and arg["--port"] == "1234" and "--enable-lora" in cmd
    assert arg["--max-loras"] == "3" and arg["--max-cpu-loras"] == "3"  # vLLM needs cpu >= gpu loras
    assert arg["--logprobs-mode"] == "raw_logprobs"
    env = cfg.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["OMP_NUM_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and "VIRTUAL_ENV" not in env
