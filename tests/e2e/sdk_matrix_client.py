"""Exercise every public tinker SDK method we serve; runs inside any SDK venv (0.22 - 0.38).

    <venv>/bin/python tests/e2e/sdk_matrix_client.py BASE_URL BASE_MODEL

Prints one JSON object: {"version": ..., "results": {"Class.method": "ok" | "error: ..."}}.
Only the SDK and numpy are imported, so it runs in the small `.venv-tinker-<ver>` venvs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

warnings.simplefilter("ignore")
os.environ.setdefault("TINKER_API_KEY", "tml-matrix")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np  # noqa: E402
import tinker  # noqa: E402
from tinker import types  # noqa: E402

RESULTS: dict[str, str] = {}


def res(x):
    """Unwrap the futures of newer SDKs; older ones return values directly."""
    return x.result() if hasattr(x, "result") and callable(x.result) else x


def check(name, fn):
    try:
        out = fn()
        RESULTS[name] = "ok"
        return out
    except Exception as e:  # record and go on: this is a compatibility survey
        RESULTS[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if os.environ.get("MATRIX_DEBUG"):
            traceback.print_exc()
        return None


def datum(tokens):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                        "weights": np.ones(len(tokens) - 1, dtype=np.float32)},
    )


def main(url: str, base: str) -> None:
    batch = [datum([1, 5, 9, 13, 17]), datum([2, 4, 6, 8])]
    adam = types.AdamParams(learning_rate=1e-2)
    sc = tinker.ServiceClient(base_url=url)
    rest = check("ServiceClient.create_rest_client", lambda: sc.create_rest_client())
    check("RestClient.get_server_capabilities", lambda: res(rest.get_server_capabilities()))
    check("ServiceClient.get_server_capabilities", lambda: res(sc.get_server_capabilities()))
    tc = check("ServiceClient.create_lora_training_client",
               lambda: res(sc.create_lora_training_client(base_model=base, rank=4)))
    if tc is None:
        return
    check("TrainingClient.get_info", lambda: tc.get_info())
    check("TrainingClient.get_tokenizer", lambda: tc.get_tokenizer())
    check("TrainingClient.forward_backward", lambda: res(tc.forward_backward(batch, "cross_entropy")))
    check("TrainingClient.forward", lambda: res(tc.forward(batch, "cross_entropy")))
    check("TrainingClient.forward_backward_custom", lambda: res(tc.forward_backward_custom(
        batch, lambda d, lps: (sum((-lp).sum() for lp in lps), {}))))
    check("TrainingClient.optim_step", lambda: res(tc.optim_step(adam)))
    state = check("TrainingClient.save_state", lambda: res(tc.save_state("m1")).path)
    check("TrainingClient.load_state", lambda: res(tc.load_state(state)))
    spath = check("TrainingClient.save_weights_for_sampler",
                  lambda: res(tc.save_weights_for_sampler("s1")).path)
    samp = check("TrainingClient.save_weights_and_get_sampling_client",
                 lambda: res(tc.save_weights_and_get_sampling_client()))
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=4)
    if samp is not None:
        check("SamplingClient.sample", lambda: res(samp.sample(prompt, 2, params)).sequences[0].tokens)
        check("SamplingClient.compute_logprobs", lambda: res(samp.compute_logprobs(prompt)))
    check("ServiceClient.create_sampling_client(base_model)", lambda: res(
        res(sc.create_sampling_client(base_model=base)).sample(prompt, 1, params)))
    check("ServiceClient.create_sampling_client(model_path)", lambda: res(
        res(sc.create_sampling_client(model_path=spath)).sample(prompt, 1, params)))
    check("ServiceClient.create_training_client_from_state",
          lambda: res(sc.create_training_client_from_state(state)).get_info())
    check("ServiceClient.create_training_client_from_state_with_optimizer",
          lambda: res(sc.create_training_client_from_state_with_optimizer(state)).get_info())
    check("TrainingClient.save_weights_external", lambda: res(tc.save_weights_external("x1")).path)
    if rest is not None:
        run_id = tc.model_id
        check("RestClient.list_training_runs", lambda: res(rest.list_training_runs()))
        check("RestClient.get_training_run", lambda: res(rest.get_training_run(run_id)))
        check("RestClient.get_training_run_by_tinker_path",
              lambda: res(rest.get_training_run_by_tinker_path(state)))
        check("RestClient.list_checkpoints", lambda: res(rest.list_checkpoints(run_id)))
        check("RestClient.list_user_checkpoints", lambda: res(rest.list_user_checkpoints()))
        check("RestClient.get_weights_info_by_tinker_path",
              lambda: res(rest.get_weights_info_by_tinker_path(state)))
        check("RestClient.publish_checkpoint_from_tinker_path",
              lambda: res(rest.publish_checkpoint_from_tinker_path(spath)))
        check("RestClient.unpublish_checkpoint_from_tinker_path",
              lambda: res(rest.unpublish_checkpoint_from_tinker_path(spath)))
        check("RestClient.set_checkpoint_ttl_from_tinker_path",
              lambda: res(rest.set_checkpoint_ttl_from_tinker_path(spath, 3600)))
        check("RestClient.get_external_weights_urls",
              lambda: res(rest.get_external_weights_urls(f"tinker://{run_id}/external_weights/x1")))
        check("RestClient.list_sessions", lambda: res(rest.list_sessions()))
        check("RestClient.get_session",
              lambda: res(rest.get_session(res(rest.list_sessions()).sessions[0])))
        session_id = run_id.split(":")[0]
        check("RestClient.copy_weights", lambda: res(rest.copy_weights(state, "proj-matrix")))
        os.environ["TINKER_PROJECT_ID"] = "proj-matrix"  # ServiceClient.copy_weights' project
        check("ServiceClient.copy_weights", lambda: res(sc.copy_weights(state)))
        check("RestClient.assign_session_project",
              lambda: res(rest.assign_session_project(session_id, "proj-matrix")))
        check("RestClient.search_sessions", lambda: _found(res(rest.search_sessions(
            types.SessionSearchRequest(project_ids=["proj-matrix"]))), session_id))
        check("RestClient.export_session_trace",
              lambda: _fetch_bytes(res(rest.export_session_trace(session_id))))
        if samp is not None:
            sid = getattr(samp, "_sampling_session_id", None)
            check("RestClient.get_sampler", lambda: res(rest.get_sampler(sid)))
        check("RestClient.delete_checkpoint_from_tinker_path",
              lambda: res(rest.delete_checkpoint_from_tinker_path(spath)))
        check("RestClient.get_checkpoint_archive_url_from_tinker_path",
              lambda: _fetch(res(rest.get_checkpoint_archive_url_from_tinker_path(state)).url))


def _found(page, session_id: str) -> int:
    assert session_id in [x.session_id for x in page.sessions], page
    return len(page.sessions)


def _fetch_bytes(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url) as r:
        data = r.read()
    assert data, url
    return len(data)


def _fetch(url: str) -> int:
    import io
    import tarfile
    import urllib.request

    with urllib.request.urlopen(url) as r:
        names = tarfile.open(fileobj=io.BytesIO(r.read())).getnames()
    assert "adapter_model.safetensors" in names and "checkpoint_complete" in names, names
    return len(names)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from importlib.metadata import version

    print(json.dumps({"version": version("tinker"), "results": RESULTS}))
    os._exit(0)  # the SDK's background threads must not keep the process alive
