"""Every shell and Python snippet in README.md and docs/*.md runs, as written, against a live
server, so the pages cannot rot.

The harness is what a reader has after `make run`, on a smaller scale:
- a `lorafleet serve --base lorafleet/tiny-llama --auth none` subprocess on a free port, with
  its own lorafleet home (the converted models are shared with the test home);
- the snippets run in order, page by page (docs/quickstart.md first), in a folder that looks
  like the repository (`.venv`, `recipes/`, ...) and holds `./my-peft-dir`, a PEFT LoRA folder
  for the base (the pages that use it say so);
- three rewrites, the same for every page: `127.0.0.1:8000` / `localhost:8000` -> the test
  server, `--port 8000` -> another free port, `HuggingFaceTB/SmolLM2-135M-Instruct` ->
  `lorafleet/tiny-llama` (the same code on a base 100x faster on 2 cores).

Fenced blocks marked `bash`, `sh` or `python` are snippets (unmarked blocks are output). An HTML
comment on the line above a block changes how it runs:
    <!-- docs-test: server -->          it starts a server: run it, wait for "serving on", stop it
    <!-- docs-test: slow -->            runs, marked slow (a recipe, a training loop)
    <!-- docs-test: skip: REASON -->    not run (the reason is the skip message)
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_HOME
from tests.e2e.conftest import free_port

SMOL, TINY = "HuggingFaceTB/SmolLM2-135M-Instruct", "lorafleet/tiny-llama"
RUN_LANGS = {"bash", "sh", "python"}
TEXT_LANGS = {"", "json", "text"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*docs-test:\s*(server|slow|skip)\s*:?\s*(.*?)\s*-->\s*$")


def pages() -> list[Path]:
    docs = sorted((REPO / "docs").glob("*.md"))
    first = [REPO / "docs" / "quickstart.md", REPO / "README.md"]
    return [p for p in first if p.exists()] + [p for p in docs if p not in first]


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    mark: str  # "" | server | slow | skip
    reason: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        out.append(Snippet(page, text[:m.start()].count("\n") + 1, m.group(1), m.group(2),
                           mark.group(1) if mark else "", mark.group(2) if mark else ""))
    return out


ALL = [s for p in pages() for s in snippets(p)]
RUNNABLE = [s for s in ALL if s.lang in RUN_LANGS]


def _param(s: Snippet):  # type: ignore[no-untyped-def]
    marks = [pytest.mark.slow] if s.mark == "slow" else []
    return pytest.param(s, id=s.id, marks=marks)


@dataclass
class Harness:
    cwd: Path
    env: dict[str, str]
    port: int


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_base):
    from lorafleet.lora.io import write_peft_dir
    from lorafleet.lora.spec import LoraSpec
    from tests.helpers import random_adapter

    root = tmp_path_factory.mktemp("docs")
    home, cwd = root / "home", root / "repo"
    home.mkdir()
    cwd.mkdir()
    (home / "models").symlink_to(TEST_HOME / "models", target_is_directory=True)
    for entry in REPO.iterdir():
        if not entry.name.startswith(".git"):
            (cwd / entry.name).symlink_to(entry)
    if not (cwd / ".venv").exists():
        (cwd / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    write_peft_dir(random_adapter(tiny_base.info, LoraSpec(rank=4, alpha=8), seed=7), TINY,
                   cwd / "my-peft-dir")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LORAFLEET_", "TINKER_", "HF_", "OPENAI_"))}
    env |= {"LORAFLEET_HOME": str(home), "TINKER_BASE_URL": f"http://127.0.0.1:{port}",
            "TINKER_API_KEY": "tml-local", "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = _start([sys.executable, "-m", "lorafleet", "serve", "--base", TINY, "--port", str(port)],
                    cwd, env)
    yield Harness(cwd, env, port)
    _stop(server)


def _start(cmd, cwd: Path, env: dict[str, str], shell: bool = False) -> subprocess.Popen:
    """Start a server and return once it says "serving ... on http://" (its socket is bound)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, shell=shell, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)],
                     daemon=True).start()
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if re.search(r"serving .* on http://", line):
            return proc
    _stop(proc)
    raise AssertionError("server did not start:\n" + "".join(seen[-40:]))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rewrite(code: str, port: int, server_port: int) -> str:
    code = code.replace(SMOL, TINY).replace("--port 8000", f"--port {server_port}")
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("localhost:8000", f"127.0.0.1:{port}")


@pytest.mark.parametrize("snippet", [_param(s) for s in RUNNABLE])
def test_snippet_runs(snippet: Snippet, harness: Harness) -> None:
    if snippet.mark == "skip":
        pytest.skip(snippet.reason or "marked skip")
    code = rewrite(snippet.code, harness.port, free_port())
    if snippet.mark == "server":
        _stop(_start(code, harness.cwd, harness.env, shell=True))
        return
    if snippet.lang == "python":
        script = harness.cwd / ".snippet.py"
        script.write_text(code)
        cmd = [sys.executable, "-W", "error::FutureWarning:__main__", str(script)]  # no deprecated calls
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, cwd=harness.cwd, env=harness.env, capture_output=True, text=True,
                       timeout=900 if snippet.mark == "slow" else 300)
    assert r.returncode == 0, f"{snippet.id} failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


def test_code_blocks_are_snippets_or_output() -> None:
    """A block in another language would silently escape the snippet test."""
    odd = [f"{s.id} ({s.lang})" for s in ALL if s.lang not in RUN_LANGS | TEXT_LANGS]
    assert not odd, f"use bash, sh or python for commands, no language for output: {odd}"
    marked = [s.id for s in ALL if s.mark and s.lang not in RUN_LANGS]
    assert not marked, f"docs-test marks on blocks that are not snippets: {marked}"


def test_pages_are_self_contained() -> None:
    """No links out of the repository; every page says what it assumes."""
    for page in pages():
        text = page.read_text()
        assert "../shared" not in text and "](../" not in text, f"{page.name} links outside the repository"
        assert re.search(r"^(\*\*)?Assumes", text, re.M), f"{page.name} does not say what it assumes"
    readme = (REPO / "README.md").read_text()
    assert "docs/quickstart.md" in readme.split("\n## ", 1)[0], "the README must link the quickstart at the top"
