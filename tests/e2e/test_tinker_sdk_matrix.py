"""SDK version matrix: the same survey of SDK methods with tinker 0.38 (protobuf), 0.26
(first with sample_sequence_ids) and 0.22 (the JSON era), each in its own small venv
(`make sdk-venvs`). Regenerate the table in docs/tinker.md with:

    .venv/bin/python -m tests.e2e.test_tinker_sdk_matrix
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "e2e" / "sdk_matrix_client.py"
OLD_SDKS = ("0.26.2", "0.22.7")
BEGIN, END = "<!-- sdk-matrix:begin -->", "<!-- sdk-matrix:end -->"
pytestmark = pytest.mark.slow


def sdk_python(version: str | None) -> Path | None:
    """The interpreter of an SDK venv, created on demand; None when it cannot be made."""
    if version is None:
        return Path(sys.executable)
    py = REPO / f".venv-tinker-{version}" / "bin" / "python"
    if not (REPO / f".venv-tinker-{version}" / ".installed").exists():
        r = subprocess.run(["make", "-s", f".venv-tinker-{version}/.installed"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return None
    return py


def survey(url: str, python: Path) -> dict:
    r = subprocess.run([str(python), str(CLIENT), url, TINY], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, r.stderr[-3000:]
    return json.loads(lines[-1])


def verdict(result: str) -> str:
    if result == "ok":
        return "yes"
    if "AttributeError" in result and "has no attribute" in result:
        return "not in SDK"
    if "PyTorch is not installed" in result:
        return "yes (client needs torch)"
    return "NO"


@pytest.mark.parametrize("version", [None, *OLD_SDKS])
def test_sdk_version(server, version):
    python = sdk_python(version)
    if python is None:
        pytest.skip(f"could not create .venv-tinker-{version} (no package index?)")
    out = survey(server.url, python)
    bad = {k: v for k, v in out["results"].items() if verdict(v) == "NO"}
    assert not bad, f"tinker {out['version']}: {bad}"
    must = ["TrainingClient.forward_backward", "TrainingClient.optim_step", "SamplingClient.sample",
            "TrainingClient.save_state", "ServiceClient.create_training_client_from_state"]
    assert all(out["results"][m] == "ok" for m in must)


def write_docs() -> None:
    """Run the survey for every SDK and rewrite the table in docs/tinker.md."""
    import tempfile

    from lorafleet.config import paths_from_env
    from tests.conftest import TEST_HOME
    from tests.e2e.conftest import start_server

    live = start_server(paths_from_env({"LORAFLEET_HOME": str(TEST_HOME)}), [TINY],
                        Path(tempfile.mkdtemp()), hold_s=5.0)
    try:
        runs = [survey(live.url, p) for v in (None, *OLD_SDKS) if (p := sdk_python(v))]
    finally:
        live.stop()
    methods = list(dict.fromkeys(m for r in runs for m in r["results"]))
    rows = ["| SDK method | " + " | ".join(f"tinker {r['version']}" for r in runs) + " |",
            "|---|" + "---|" * len(runs)]
    rows += [f"| `{m}` | " + " | ".join(verdict(r["results"].get(m, "-")) for r in runs) + " |"
             for m in methods]
    doc = REPO / "docs" / "tinker.md"
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + "\n".join(rows) + "\n" + text[end:])
    print("\n".join(rows))


if __name__ == "__main__":
    write_docs()
