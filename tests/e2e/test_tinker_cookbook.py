"""tinker-cookbook 0.6.1 recipes, unmodified, offline, through `lorafleet cookbook` against a live
lorafleet server: `sl_loop` (and its resume), `rl_loop` (importance_sampling, gspo), `sdft`
(top-20 distillation), the library's `distillation.train_off_policy`, the `decisions` demo,
`distillation.on_policy_distillation` (a teacher checkpoint), `preference.dpo.train` (DPO on
hh-rlhf pairs) and `prompt_distillation` (`create_data`, then `train`).

The per-recipe table in docs/tinker.md (`RECIPES`) is generated from a run of these tests:

    .venv/bin/python -m tests.e2e.test_tinker_cookbook

runs them and rewrites the table with each test's outcome; `test_recipe_table_is_current`
checks the page lists every row of `RECIPES` as passing (what the tests here assert).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet import cookbook
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed by `make venv`")
RL_WRAPPER = Path(__file__).with_name("cookbook_offline.py")
REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- cookbook-recipes:begin -->", "<!-- cookbook-recipes:end -->"
# (recipe as a user runs it, the settings that matter, the test here that runs it)
RECIPES = [
    ("`lorafleet cookbook sl_loop`", "`--data HuggingFaceH4/no_robots=FILE`; resumes from its checkpoints",
     "test_sl_loop_runs_and_resumes"),
    ("`lorafleet cookbook rl_loop`", "`loss_fn=importance_sampling` (set for you: the default "
     "`stable_reinforce` is refused)", "test_rl_loop_importance_sampling"),
    ("`lorafleet cookbook rl_loop loss_fn=gspo`", "GSPO with `sequence_ratio_mask`", "test_rl_loop_gspo"),
    ("`lorafleet cookbook sdft.train`", "defaults (`topk=20`: top-k prompt logprobs, (N, K) targets); "
     "`--demo-data` or `--data hicai-zju/SciKnowEval=FILE`", "test_sdft_topk_distillation"),
    ("`tinker_cookbook.distillation.train_off_policy` (library)", "`n_teacher_targets=20`",
     "test_distillation_train_off_policy"),
    ("`lorafleet cookbook decisions.demo`", "sparse `target_prompt_logprobs`, `max_tokens=1`",
     "test_decisions_demo_scores_choices_with_target_prompt_logprobs"),
    ("`lorafleet cookbook distillation.on_policy_distillation`", "`--demo-data` (`dataset=deepmath`); "
     "`teacher_model` + `teacher_checkpoint=tinker://...`", "test_on_policy_distillation_from_a_teacher_checkpoint"),
    ("`lorafleet cookbook preference.dpo.train`", "`--demo-data` (`dataset=hhh`); `forward_backward_custom`, "
     "reference from the run's first weights", "test_dpo_trains_on_preference_pairs"),
    ("`lorafleet cookbook prompt_distillation.create_data`, then `prompt_distillation.train`",
     "teacher `model_name`; `--demo-data` sentences; `max_tokens` capped at the context",
     "test_prompt_distillation_create_data_then_train"),
]


def recipe_table(outcomes: dict[str, str]) -> str:
    """The docs table: one row per recipe, 'yes' where its test passed."""
    rows = ["| recipe | runs | with | test |", "|---|---|---|---|"]
    rows += [f"| {name} | {outcomes.get(test, 'not run')} | {flags} | `{test}` |" for name, flags, test in RECIPES]
    return "\n".join(rows)


def test_recipe_table_is_current():
    text = (REPO / "docs" / "tinker.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert table == recipe_table({t: "yes" for _, _, t in RECIPES}), (
        "docs/tinker.md's recipe table is stale: `.venv/bin/python -m tests.e2e.test_tinker_cookbook`")


pytestmark = pytest.mark.slow


def run_recipe(server, recipe: str, log_dir: Path, *extra: str) -> None:
    """`lorafleet cookbook RECIPE` as a user runs it: no hub, the tokenizer of the lorafleet base
    (from the same LORAFLEET_HOME as the server), datasets from local files."""
    cmd = [str(RL_WRAPPER)] if recipe == "rl_loop" else ["-m", "lorafleet", "cookbook", recipe]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKER_"))}
    env |= {"LORAFLEET_HOME": str(TEST_HOME), "TINKER_BASE_URL": server.url}
    r = subprocess.run([sys.executable, *cmd, f"model_name={TINY}", f"log_path={log_dir}", *extra],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """A local file in no_robots' format, as a user would pass with --data."""
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"What is {i} times two?"},
        {"role": "assistant", "content": f"{2 * i}."}]}) + "\n" for i in range(40)))
    return path


def metrics(log_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_sl_loop_runs_and_resumes(server, tmp_path, chats):
    log = tmp_path / "sl"
    data = f"--data=HuggingFaceH4/no_robots={chats}"
    run_recipe(server, "sl_loop", log, data, "batch_size=4", "lora_rank=4", "max_steps=3", "save_every=2",
               "learning_rate=1e-3")
    steps = metrics(log)
    assert [m["step"] for m in steps if "train_mean_nll" in m] == [0, 1, 2]
    ckpts = [json.loads(x) for x in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert {c["name"] for c in ckpts} >= {"000002", "final"}
    # a crash after step 2: drop the final checkpoint; the next run resumes from 000002
    path = log / "checkpoints.jsonl"
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()
                            if json.loads(x)["name"] != "final"))
    first = {m["step"]: m["train_mean_nll"] for m in steps if "train_mean_nll" in m}
    run_recipe(server, "sl_loop", log, data, "batch_size=4", "lora_rank=4", "max_steps=4", "save_every=2",
               "learning_rate=1e-3")
    resumed = [m for m in metrics(log)[len(steps):] if "train_mean_nll" in m]
    assert [m["step"] for m in resumed] == [2, 3]
    # same batch, restored weights and Adam state: the same loss as the uninterrupted run
    assert resumed[0]["train_mean_nll"] == pytest.approx(first[2], rel=1e-5)


def test_rl_loop_importance_sampling(server, tmp_path):
    log = tmp_path / "rl"
    before = server.service.runners[TINY].stats["fused_requests"]
    run_recipe(server, "rl_loop", log, "--demo-data", "batch_size=2", "group_size=4", "max_tokens=12",
               "lora_rank=4", "max_steps=2", "save_every=0")  # loss_fn: importance_sampling by default
    assert len([m for m in metrics(log) if "progress/batch" in m]) == 2
    assert server.service.runners[TINY].stats["fused_requests"] > before  # it really trained


def test_rl_loop_gspo(server, tmp_path):
    log = tmp_path / "gspo"
    run_recipe(server, "rl_loop", log, "--demo-data", "loss_fn=gspo", "batch_size=2", "group_size=4",
               "max_tokens=12", "lora_rank=4", "max_steps=1", "save_every=0")
    assert len([m for m in metrics(log) if "progress/batch" in m]) == 1


def test_sdft_topk_distillation(server, tmp_path):
    """sdft with its default topk=20: the teacher's top-20 prompt logprobs, then 2-D targets."""
    log = tmp_path / "sdft"
    before = server.service.runners[TINY].stats["fused_requests"]
    run_recipe(server, "sdft.train", log, "--demo-data", "groups_per_batch=2", "max_tokens=8", "lora_rank=4",
               "max_steps=2", "save_every=0", "eval_every=0", "learning_rate=1e-3")
    steps = [m for m in metrics(log) if "sdft/topk" in m]
    assert len(steps) == 2 and steps[0]["sdft/topk"] == 20
    assert all("sdft/mean_teacher_entropy" in m for m in steps)  # top-k targets were built
    assert server.service.runners[TINY].stats["fused_requests"] > before


def test_distillation_train_off_policy(server, tmp_path, chats):
    """The library's off-policy distillation: top-20 teacher logprobs become (N, 20) targets."""
    log = tmp_path / "off"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKER_"))}
    env |= {"LORAFLEET_HOME": str(TEST_HOME)}
    script = Path(__file__).with_name("cookbook_off_policy.py")
    r = subprocess.run([sys.executable, str(script), server.url, TINY, str(chats), str(log)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [m["step"] for m in metrics(log) if "train/loss:sum" in m] == [0, 1]


def test_decisions_demo_scores_choices_with_target_prompt_logprobs(server, tmp_path):
    """decisions: one max_tokens=1 sample per question with sparse target_prompt_logprobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKER_"))}
    env |= {"LORAFLEET_HOME": str(TEST_HOME), "TINKER_BASE_URL": server.url}
    r = subprocess.run([sys.executable, "-m", "lorafleet", "cookbook", "decisions.demo", f"model_name={TINY}"],
                       input="How do I pick a learning rate for LoRA?\n\n", capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    probs = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert set(probs) == {"billing", "sdk", "console", "cookbook"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)


def teacher_checkpoint(service_client) -> str:
    """Sampler weights that differ from the base: a few SFT steps at a high learning rate."""
    from tinker import types

    tokens = [[1, *range(100 + i, 140 + i, 3)] for i in range(4)]
    batch = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]),
                         loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)}) for t in tokens]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    for _ in range(3):
        tc.forward_backward(batch, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return tc.save_weights_for_sampler(name="teacher").result().path


def test_on_policy_distillation_from_a_teacher_checkpoint(server, service_client, tmp_path):
    """distillation.on_policy_distillation: the student samples, the teacher (the tiny base with
    sampler weights of its own) scores the samples, the reverse KL is the advantage."""
    log = tmp_path / "opd"
    teacher = teacher_checkpoint(service_client)
    before = server.service.runners[TINY].stats["fused_requests"]
    run_recipe(server, "distillation.on_policy_distillation", log, "--demo-data", "dataset=deepmath",
               f"teacher_model={TINY}", f"teacher_checkpoint={teacher}", "groups_per_batch=2", "group_size=2",
               "max_tokens=8", "lora_rank=4", "max_steps=2", "save_every=0", "eval_every=0", "learning_rate=1e-3")
    steps = [m for m in metrics(log) if "teacher_kl" in m]
    assert [m["step"] for m in steps] == [0, 1]
    # at step 0 the student is the base: a KL of 0 would mean the teacher's weights were not used
    assert steps[0]["teacher_kl"] > 1e-3
    assert steps[0]["env/all/total_episodes"] == 4
    assert server.service.runners[TINY].stats["fused_requests"] > before


def test_dpo_trains_on_preference_pairs(server, tmp_path):
    """preference.dpo.train on hh-rlhf pairs (--demo-data): forward_backward_custom with the DPO
    loss, the reference the run's own initial weights. The recipe has no lora_rank (32)."""
    log = tmp_path / "dpo"
    before = server.service.runners[TINY].stats["fused_requests"]
    run_recipe(server, "preference.dpo.train", log, "--demo-data", "dataset=hhh", "batch_size=4",
               "max_length=128", "max_steps=3", "learning_rate=1e-3")
    steps = [m for m in metrics(log) if "dpo_loss" in m]
    assert [m["step"] for m in steps] == [0, 1, 2] and all(m["num_pairs"] == 4 for m in steps)
    assert steps[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] and steps[-1]["margin"] > 0  # chosen pulled up
    assert "test/nll" in steps[0]  # the hh-rlhf test split, evaluated by the sampler
    assert server.service.runners[TINY].stats["fused_requests"] > before


def test_prompt_distillation_create_data_then_train(server, tmp_path):
    """prompt_distillation: create_data samples the teacher (here the tiny base) with the long
    language-classification prompt for each sentence and keeps the answers it can parse; train
    is SFT on such rows without the prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKER_"))}
    env |= {"LORAFLEET_HOME": str(TEST_HOME), "TINKER_BASE_URL": server.url}
    out = tmp_path / "data" / "lang.jsonl"
    decode_steps = server.service.runners[TINY].stats["steps"]
    r = subprocess.run([sys.executable, "-m", "lorafleet", "cookbook", "prompt_distillation.create_data",
                        "--demo-data", f"model_name={TINY}", f"output_file={out}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"Saved data to {out}" in r.stdout
    assert server.service.runners[TINY].stats["steps"] > decode_steps  # the teacher was sampled
    # a random tiny teacher seldom writes "Final Answer: xx": rows, if any, are (sentence, label)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)
    # train on rows as create_data writes them (a teacher that answers)
    labels = ["en", "de", "fr", "es", "en", "de", "fr", "es"]
    data = tmp_path / "answered.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": s},
                                                     {"role": "assistant", "content": label}]}) + "\n"
                            for s, label in zip(cookbook.DEMO_SENTENCES, labels, strict=True)))
    log = tmp_path / "pd"
    before = server.service.runners[TINY].stats["fused_requests"]
    run_recipe(server, "prompt_distillation.train", log, f"file_path={data}", "batch_size=4", "lora_rank=4",
               "num_epochs=1", "save_every=0", "eval_every=0", "learning_rate=1e-3")
    steps = [m for m in metrics(log) if "train_mean_nll" in m]
    assert [m["step"] for m in steps] == [0, 1]
    assert server.service.runners[TINY].stats["fused_requests"] > before


def test_create_data_refuses_a_teacher_checkpoint_that_is_not_sampler_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKER_"))}
    env |= {"LORAFLEET_HOME": str(TEST_HOME), "TINKER_BASE_URL": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "lorafleet", "cookbook", "prompt_distillation.create_data",
                        f"model_name={TINY}", "teacher_checkpoint=/tmp/teacher", f"output_file={tmp_path}/x.jsonl"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "teacher_checkpoint='/tmp/teacher': expected sampler weights" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def write_docs() -> None:
    """Run the recipe tests and rewrite the table in docs/tinker.md with their outcomes."""
    import tempfile
    import xml.etree.ElementTree as ET

    report = Path(tempfile.mkdtemp()) / "recipes.xml"
    names = " or ".join(t for _, _, t in RECIPES)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", names,
                    f"--junitxml={report}"], cwd=REPO)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failed = any(c.tag in ("failure", "error") for c in case)
        skipped = any(c.tag == "skipped" for c in case)
        outcomes[case.get("name")] = "NO" if failed else "skipped" if skipped else "yes"
    doc = REPO / "docs" / "tinker.md"
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + recipe_table(outcomes) + "\n" + text[end:])
    print(recipe_table(outcomes))


if __name__ == "__main__":
    write_docs()
