// lorafleet console: one page, no build step, no dependencies. Every datum comes from the
// server's JSON APIs (/catalog/v1, /api/v1, /admin/v1) called with the API key the user typed,
// kept in sessionStorage and sent as X-API-Key: the console sees exactly what the key may see.
"use strict";

const KEY = "lorafleet.key";
const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");
let timer = null; // the refresh loop of the current page (training run, serving)

// ---- helpers ---------------------------------------------------------------------------

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
const short = (s, n = 12) => (s ? esc(String(s).slice(0, n)) : "");
const when = (t) => (t ? esc(new Date(t).toLocaleString()) : "");
const json = (v) => (v == null ? '<span class="muted">—</span>' : `<code>${esc(JSON.stringify(v))}</code>`);
function bytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
const enc = encodeURIComponent;
const policyPath = (name, rev) => `#/policy/${name}${rev ? `?rev=${enc(rev)}` : ""}`;
const policyHref = (name, rev) => esc(policyPath(name, rev)); // for an href attribute

class ApiError extends Error {
  constructor(status, name, message) { super(`${status} ${name}: ${message}`); this.status = status; }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!r.ok) {
    if (r.status === 401 && path !== "/catalog/v1/policies?limit=1") { logout("your key was refused: " + (data?.detail || "")); }
    throw new ApiError(r.status, data?.error || r.statusText, data?.detail || text);
  }
  return data;
}

function flash(message, kind = "error") {
  const f = $("#flash");
  f.textContent = message;
  f.className = kind;
  f.hidden = !message;
}

// A confirmation in a modal <dialog>: resolves true only when the user confirms.
function confirmAction(text) {
  const d = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.returnValue = "";
    d.showModal();
  });
}

// Runs an action behind a confirmation; shows the API's own error text when it fails.
async function act(text, fn, done) {
  if (!(await confirmAction(text))) return;
  try {
    const out = await fn();
    flash(done(out), "ok");
  } catch (e) {
    flash(e.message);
    return;
  }
  route();
}

// ---- log in ------------------------------------------------------------------------------

function loginPage(reason) {
  $("#nav").hidden = true;
  main().innerHTML = `
    <div class="login card">
      <h1>Log in</h1>
      <p class="muted">Paste an API key (<code>lorafleet keys create TENANT</code>). On a server started
      with <code>--auth none</code> leave it empty.</p>
      <form id="login-form">
        <input id="key" type="password" autocomplete="off" placeholder="API key">
        <button id="login" class="primary" type="submit">Log in</button>
      </form>
      <p id="login-error" class="fail">${esc(reason || "")}</p>
    </div>`;
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("#key").value.trim());
    try {
      await api("/catalog/v1/policies?limit=1");
    } catch (e) {
      sessionStorage.removeItem(KEY);
      $("#login-error").textContent = e.message;
      return;
    }
    sessionStorage.setItem(KEY + ".ok", "1");
    if (!location.hash || location.hash === "#/login") location.hash = "#/policies";
    else route();
  });
}

function logout(reason) {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(KEY + ".ok");
  loginPage(reason);
}

// ---- policies ----------------------------------------------------------------------------

const pageCursors = []; // cursors of the pages before the current one (Previous)

async function policiesPage(params) {
  const q = params.get("q") || "";
  const cursor = params.get("cursor") || "";
  main().innerHTML = `
    <h1>Policies</h1>
    <div class="toolbar">
      <input id="q" type="search" placeholder="Search policy names" value="${esc(q)}" size="40">
      <button id="prev" type="button" ${cursor ? "" : "disabled"}>Previous</button>
      <button id="next" type="button" disabled>Next</button>
    </div>
    <table id="policies"><thead><tr><th>Policy</th><th>Base model</th><th>Rank / targets</th>
      <th>Visibility</th><th>Created</th></tr></thead><tbody><tr><td colspan="5" class="muted">Loading…</td></tr></tbody></table>`;
  let debounce;
  $("#q").addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { pageCursors.length = 0; location.hash = `#/policies?q=${enc($("#q").value)}`; }, 250);
  });
  const query = new URLSearchParams({ limit: "50" });
  if (q) query.set("q", q);
  if (cursor) query.set("cursor", cursor);
  const page = await api(`/catalog/v1/policies?${query}`);
  $("#policies tbody").innerHTML = page.items.length ? page.items.map((p) => `
    <tr><td><a href="${policyHref(p.name)}">${esc(p.name)}</a></td><td>${esc(p.base_model)}</td>
      <td>r${p.lora.rank} · ${esc(p.lora.target_modules.join(", "))}</td>
      <td>${p.public ? "public" : "private"}</td><td>${when(p.created_at)}</td></tr>`).join("")
    : `<tr><td colspan="5" class="muted">No policies${q ? ` match “${esc(q)}”` : ""}.</td></tr>`;
  const next = $("#next");
  next.disabled = !page.next_cursor;
  next.onclick = () => {
    pageCursors.push(cursor);
    location.hash = `#/policies?${new URLSearchParams({ q, cursor: page.next_cursor })}`;
  };
  $("#prev").onclick = () => {
    const before = pageCursors.pop() || "";
    location.hash = `#/policies?${new URLSearchParams(before ? { q, cursor: before } : { q })}`;
  };
  if (q) { const i = $("#q"); i.focus(); i.setSelectionRange(q.length, q.length); }
}

// ---- one policy --------------------------------------------------------------------------

async function policyPage(name, params) {
  const base = `/catalog/v1/policies/${name}`;
  const limit = Math.min(1000, Math.max(1, Number(params.get("limit")) || 20));
  const [policy, revs, aliases] = await Promise.all([
    api(base), api(`${base}/revisions?limit=${limit}`), api(`${base}/aliases`)]);
  const histories = await Promise.all(aliases.map((a) => api(`${base}/aliases/${enc(a.name)}/history`)));
  const events = histories.flat().sort((a, b) => (a.at < b.at ? 1 : -1));
  const seqOf = Object.fromEntries(revs.items.map((r) => [r.id, r.seq]));
  const revLabel = (id) => (id in seqOf ? `#${seqOf[id]}` : short(id, 16));
  const selected = params.get("rev") || (aliases.find((a) => a.name === "prod") || aliases[0] || {}).revision_id
    || (revs.items[0] || {}).id;
  // evaluations of the newest 50 revisions listed and of the selected one (one call each)
  const withEvals = [...new Set([...revs.items.slice(0, 50).map((r) => r.id), selected].filter(Boolean))];
  const evals = await Promise.all(withEvals.map((id) => api(`/catalog/v1/evaluations?ref=${enc(id)}`)));
  const evalsOf = Object.fromEntries(withEvals.map((id, i) => [id, evals[i]]));
  const gatesOf = {};
  for (const e of events) {
    if (e.reason && e.reason.startsWith("gate ")) (gatesOf[e.to_revision_id] ||= []).push(e);
  }
  const aliasesOf = {};
  for (const a of aliases) (aliasesOf[a.revision_id] ||= []).push(a.name);

  main().innerHTML = `
    <p class="muted"><a href="#/policies">Policies</a> /</p>
    <h1 id="policy-name">${esc(policy.name)}</h1>
    <div class="grid">
      <div class="card"><dl class="kv">
        <dt>Base model</dt><dd>${esc(policy.base_model)} ${policy.base_digest ? `<span class="mono muted">${short(policy.base_digest)}</span>` : ""}</dd>
        <dt>LoRA</dt><dd>rank ${policy.lora.rank}, alpha ${policy.lora.alpha}${policy.lora.use_rslora ? ", rsLoRA" : ""}</dd>
        <dt>Targets</dt><dd>${policy.lora.target_modules.map((t) => `<span class="pill">${esc(t)}</span>`).join("")}</dd>
        <dt>Visibility</dt><dd>${policy.public ? "public" : "private"} · owner ${esc(policy.owner)}</dd>
        <dt>Branched from</dt><dd>${policy.parent_revision_id ? `<a href="#/rev/${enc(policy.parent_revision_id)}">${short(policy.parent_revision_id, 20)}</a>` : "—"}</dd>
        <dt>Training run</dt><dd>${policy.tinker_run_id ? `<a href="#/run/${enc(policy.tinker_run_id)}">${esc(policy.tinker_run_id)}</a>` : "—"}</dd>
        ${Object.entries(policy.metadata).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("")}
      </dl></div>
      <div class="card"><h2 style="margin-top:0">Aliases</h2>
        <table id="aliases"><thead><tr><th>Alias</th><th>Revision</th><th>Version</th><th></th></tr></thead><tbody>
        ${aliases.map((a) => `<tr data-alias="${esc(a.name)}"><td><b>${esc(a.name)}</b></td>
          <td><a href="${policyHref(name, a.revision_id)}" class="alias-target">${revLabel(a.revision_id)}</a></td><td>v${a.version}</td>
          <td><button type="button" class="rollback">Roll back</button></td></tr>`).join("")
          || '<tr><td colspan="4" class="muted">No aliases yet: select a revision and move one.</td></tr>'}
        </tbody></table></div>
    </div>
    <h2>Revisions</h2>
    <table id="revisions"><thead><tr><th>#</th><th>Revision</th><th>Kind</th><th>Step</th><th>Digest (sha256)</th>
      <th>Size</th><th>Aliases</th><th>Evaluations</th><th>Created</th></tr></thead><tbody>
    ${revs.items.map((r) => `<tr class="clickable${r.id === selected ? " selected" : ""}" data-rev="${esc(r.id)}">
      <td>${r.seq}</td><td class="mono">${short(r.id, 20)}</td><td>${esc(r.kind)}</td><td>${r.step ?? ""}</td>
      <td class="mono" title="${esc(r.sha256)}">${short(r.sha256)}</td><td>${bytes(r.size_bytes)}</td>
      <td>${(aliasesOf[r.id] || []).map((a) => `<span class="pill">${esc(a)}</span>`).join("")}</td>
      <td>${evalSummary(evalsOf[r.id])}</td><td>${when(r.created_at)}</td></tr>`).join("")
      || '<tr><td colspan="9" class="muted">No revisions yet.</td></tr>'}
    </tbody></table>
    ${revs.next_cursor && limit < 1000 ? `<p><a href="${esc(`#/policy/${name}?${new URLSearchParams({ ...Object.fromEntries(params), limit: Math.min(1000, limit + 100) })}`)}"
      id="more-revs">Show more revisions</a></p>` : ""}
    <div id="revision"></div>
    <h2>Alias history</h2>
    <table id="alias-history"><thead><tr><th>When</th><th>Alias</th><th>Action</th><th>From</th><th>To</th><th>By</th><th>Reason</th></tr></thead><tbody>
    ${events.map((e) => `<tr><td>${when(e.at)}</td><td>${esc(e.alias)}</td><td>${esc(e.action)}</td>
      <td>${e.from_revision_id ? revLabel(e.from_revision_id) : "—"}</td><td>${revLabel(e.to_revision_id)}</td>
      <td>${esc(e.actor)}</td><td>${esc(e.reason || "")}</td></tr>`).join("")
      || '<tr><td colspan="7" class="muted">No alias moves yet.</td></tr>'}
    </tbody></table>`;

  for (const tr of main().querySelectorAll("#revisions tr[data-rev]")) {
    tr.addEventListener("click", () => { location.hash = policyPath(name, tr.dataset.rev); });
  }
  for (const tr of main().querySelectorAll("#aliases tr[data-alias]")) {
    const alias = tr.dataset.alias;
    tr.querySelector(".rollback").addEventListener("click", () => act(
      `Roll back alias “${alias}” of ${name} to the revision it pointed at before?`,
      () => api(`${base}/aliases/${enc(alias)}/rollback`, { method: "POST", body: {} }),
      (e) => `${alias} rolled back to ${revLabel(e.to_revision_id)}`));
  }
  // the selected revision may be older than the page: resolve it by id
  const rev = revs.items.find((r) => r.id === selected) || (selected && await api(`/catalog/v1/resolve?ref=${enc(selected)}`));
  if (rev && rev.policy === name) await revisionPanel(policy, rev, evalsOf[rev.id], gatesOf[rev.id] || [], aliases);
}

function evalSummary(list) {
  if (list === undefined) return '<span class="muted" title="select the revision to see them">…</span>';
  if (!list.length) return '<span class="muted">—</span>';
  return list.map((e) => `<span class="pill">${esc(e.suite)}: ${Object.entries(e.metrics)
    .map(([k, v]) => `${esc(k)}=${Number(v).toPrecision(3)}`).join(" ")}</span>`).join("");
}

async function revisionPanel(policy, rev, evals, gates, aliases) {
  const name = policy.name;
  const pv = rev.provenance;
  const lineage = await api(`/catalog/v1/lineage?ref=${enc(rev.id)}`);
  const panel = $("#revision");
  panel.innerHTML = `
    <h2>Revision #${rev.seq} <span class="mono muted">${esc(rev.id)}</span></h2>
    <div class="grid">
      <div class="card" id="provenance"><h2 style="margin-top:0">Provenance</h2><dl class="kv">
        <dt>Digest</dt><dd class="mono">${esc(rev.sha256)}</dd>
        <dt>Size</dt><dd>${bytes(rev.size_bytes)}</dd>
        <dt>Parent</dt><dd>${pv.parent_revision_id ? `<a href="#/rev/${enc(pv.parent_revision_id)}" class="mono">${esc(pv.parent_revision_id)}</a>` : "—"}</dd>
        <dt>Step</dt><dd>${rev.step ?? "—"}</dd>
        <dt>Loss</dt><dd>${esc(pv.loss_fn || "—")} ${pv.loss_config ? json(pv.loss_config) : ""}</dd>
        <dt>Optimizer</dt><dd>${json(pv.optimizer_config)}</dd>
        <dt>Data digest</dt><dd class="mono">${esc(pv.data_digest || "—")}</dd>
        <dt>Code version</dt><dd class="mono">${esc(pv.code_version || "—")}</dd>
        <dt>Source run</dt><dd>${policy.tinker_run_id ? `<a href="#/run/${enc(policy.tinker_run_id)}">${esc(policy.tinker_run_id)}</a>` : "—"}
          ${rev.tinker_path ? `<div class="mono muted">${esc(rev.tinker_path)}</div>` : ""}</dd>
        <dt>Created</dt><dd>${when(rev.created_at)} by ${esc(rev.created_by)}</dd>
        ${rev.expires_at ? `<dt>Expires</dt><dd>${when(rev.expires_at)}</dd>` : ""}
      </dl></div>
      <div class="card" id="actions"><h2 style="margin-top:0">Actions</h2>
        <form id="move-alias" class="toolbar">
          <label>Move alias <input id="alias-name" value="${esc((aliases[0] || {}).name || "prod")}" size="8" required></label>
          <label>gate <input id="alias-gate" placeholder="e.g. accuracy>=0.8" size="16"></label>
          <button type="submit" class="primary" id="move">Move here</button>
        </form>
        <div class="toolbar">
          <button type="button" id="warm">Warm into a slot</button>
          <button type="button" id="pin">Pin</button>
          <button type="button" id="unpin">Unpin</button>
        </div>
        <h2>Evaluations</h2>
        <table id="evaluations"><thead><tr><th>Suite</th><th>Metrics</th><th>By</th><th>When</th></tr></thead><tbody>
        ${evals.map((e) => `<tr><td>${esc(e.suite)}</td><td>${Object.entries(e.metrics).map(([k, v]) => `${esc(k)} = <b>${v}</b>`).join("<br>")}</td>
          <td>${esc(e.created_by)}</td><td>${when(e.created_at)}</td></tr>`).join("")
          || '<tr><td colspan="4" class="muted">No evaluations recorded.</td></tr>'}
        </tbody></table>
        <p id="gates">${gates.length ? gates.map((g) => `<span class="pass">passed</span> ${esc(g.reason)} → ${esc(g.alias)} (${when(g.at)})`).join("<br>")
          : '<span class="muted">Gate status: not promoted through a gate yet.</span>'}</p>
      </div>
    </div>
    <h2>Lineage</h2>
    <div class="card" id="lineage">${lineageSvg(lineage)}</div>`;

  $("#move-alias").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const alias = $("#alias-name").value.trim();
    const gate = $("#alias-gate").value.trim();
    act(`Move alias “${alias}” of ${name} to revision #${rev.seq}${gate ? ` if it passes the gate ${gate}` : ""}?`,
      () => api(`/catalog/v1/policies/${name}/aliases/${enc(alias)}`, { method: "PUT", body: { ref: rev.id, require: gate || null } }),
      () => `${alias} now points at #${rev.seq}`);
  });
  $("#warm").addEventListener("click", () => act(`Load revision #${rev.seq} of ${name} into an engine slot?`,
    () => api("/catalog/v1/warm", { method: "POST", body: { refs: [rev.id], tier: "slot" } }),
    (out) => `#${rev.seq} is resident: ${out.map((r) => `${r.base} ${r.tier}`).join(", ")}`));
  $("#pin").addEventListener("click", () => act(`Pin revision #${rev.seq} of ${name} in a slot until unpinned?`,
    () => api("/catalog/v1/pin", { method: "POST", body: { ref: rev.id } }), (r) => `#${rev.seq} pinned (${r.tier})`));
  $("#unpin").addEventListener("click", () => act(`Unpin revision #${rev.seq} of ${name}?`,
    () => api("/catalog/v1/unpin", { method: "POST", body: { ref: rev.id } }), () => `#${rev.seq} unpinned`));
}

// Parents above children, one row per generation; a node links to its policy page.
function lineageSvg(lin) {
  const nodes = [...lin.ancestors.slice().reverse(), lin.revision, ...lin.descendants];
  const byId = Object.fromEntries(nodes.map((r) => [r.id, r]));
  const depth = {};
  const depthOf = (r) => {
    if (depth[r.id] !== undefined) return depth[r.id];
    depth[r.id] = 0; // guards a cycle
    const p = byId[r.provenance.parent_revision_id];
    return (depth[r.id] = p ? depthOf(p) + 1 : 0);
  };
  nodes.forEach(depthOf);
  const rows = [];
  for (const r of nodes) (rows[depth[r.id]] ||= []).push(r);
  const W = 190, H = 44, GX = 24, GY = 34;
  const width = Math.max(...rows.map((row) => row.length)) * (W + GX) + GX;
  const pos = {};
  rows.forEach((row, d) => row.forEach((r, i) => { pos[r.id] = { x: GX + i * (W + GX), y: 10 + d * (H + GY) }; }));
  const edges = nodes.filter((r) => pos[r.provenance.parent_revision_id]).map((r) => {
    const a = pos[r.provenance.parent_revision_id], b = pos[r.id];
    return `<line x1="${a.x + W / 2}" y1="${a.y + H}" x2="${b.x + W / 2}" y2="${b.y}" stroke="#98a2b3" marker-end="url(#arrow)"/>`;
  }).join("");
  const boxes = nodes.map((r) => {
    const p = pos[r.id], me = r.id === lin.revision.id;
    return `<a href="${policyHref(r.policy, r.id)}" class="lineage-node" data-rev="${esc(r.id)}">
      <rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="6" fill="${me ? "#eef3ff" : "#fff"}" stroke="${me ? "#2f5bd3" : "#cfd4dc"}"/>
      <text x="${p.x + 8}" y="${p.y + 18}" font-weight="600">${esc(r.policy)} #${r.seq}</text>
      <text x="${p.x + 8}" y="${p.y + 34}" fill="#667085">${r.step != null ? `step ${r.step} · ` : ""}${short(r.sha256, 10)}</text></a>`;
  }).join("");
  const height = rows.length * (H + GY) + 10;
  return `<svg width="${width}" height="${height}" role="img" aria-label="lineage">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto">
    <path d="M0,0 L10,5 L0,10 z" fill="#98a2b3"/></marker></defs>${edges}${boxes}</svg>
    <p class="muted">${lin.ancestors.length} ancestors, ${lin.descendants.length} descendants (across policies).</p>`;
}

// #/rev/<id>: a bare revision id (a parent in another policy) -> its policy page.
async function revRedirect(id) {
  const r = await api(`/catalog/v1/resolve?ref=${enc(id)}`);
  location.replace(policyPath(r.policy, r.id));
}

// ---- training runs -----------------------------------------------------------------------

async function runsPage(params) {
  const offset = Number(params.get("offset") || 0);
  const data = await api(`/api/v1/training_runs?limit=50&offset=${offset}`);
  const total = data.cursor.total_count;
  main().innerHTML = `
    <h1>Training runs</h1>
    <p class="muted">${total} run(s) of this tenant on this server.</p>
    <table id="runs"><thead><tr><th>Run</th><th>Base model</th><th>Rank</th><th>Last request</th><th>Last checkpoint</th></tr></thead><tbody>
    ${data.training_runs.map((r) => `<tr><td><a href="#/run/${enc(r.training_run_id)}">${esc(r.training_run_id)}</a>${r.corrupted ? ' <span class="fail">corrupted</span>' : ""}</td>
      <td>${esc(r.base_model)}</td><td>${r.lora_rank ?? ""}</td><td>${when(r.last_request_time)}</td>
      <td>${esc(r.last_checkpoint?.checkpoint_id || r.last_sampler_checkpoint?.checkpoint_id || "—")}</td></tr>`).join("")
      || '<tr><td colspan="5" class="muted">No training runs yet: train with the Tinker SDK against this server.</td></tr>'}
    </tbody></table>
    <div class="toolbar">
      ${offset > 0 ? `<a href="#/runs?offset=${Math.max(0, offset - 50)}">Previous</a>` : ""}
      ${offset + 50 < total ? `<a href="#/runs?offset=${offset + 50}">Next</a>` : ""}
    </div>`;
}

async function runPage(id) {
  main().innerHTML = `
    <p class="muted"><a href="#/runs">Training runs</a> /</p>
    <h1>${esc(id)}</h1>
    <div class="grid">
      <div class="card"><h2 style="margin-top:0">Loss per step <span class="muted" id="run-live"></span></h2><div id="chart"></div></div>
      <div class="card"><dl class="kv" id="run-info"></dl></div>
    </div>
    <h2>Checkpoints and sampler versions</h2>
    <table id="checkpoints"><thead><tr><th>Checkpoint</th><th>Type</th><th>Size</th><th>Created</th><th>Catalog revision</th></tr></thead><tbody></tbody></table>`;
  const revisionOf = {};
  const refresh = async () => {
    const [run, stats, ckpts] = await Promise.all([api(`/api/v1/training_runs/${enc(id)}`),
      api(`/admin/v1/runs/${enc(id)}`), api(`/api/v1/training_runs/${enc(id)}/checkpoints`)]);
    $("#chart").innerHTML = chartSvg(stats.series, "step");
    $("#run-live").textContent = `· updated ${new Date().toLocaleTimeString()}`;
    $("#run-info").innerHTML = `<dt>Base model</dt><dd>${esc(run.base_model)}</dd><dt>LoRA rank</dt><dd>${run.lora_rank ?? ""}</dd>
      <dt>Last request</dt><dd>${when(run.last_request_time)}</dd>
      <dt>Published into</dt><dd>${stats.policy ? `<a href="${policyHref(stats.policy)}" id="run-policy">${esc(stats.policy)}</a>` : "— (no checkpoint published yet)"}</dd>`;
    await Promise.all(ckpts.checkpoints.filter((c) => !(c.tinker_path in revisionOf)).map(async (c) => {
      try { revisionOf[c.tinker_path] = await api(`/catalog/v1/resolve?ref=${enc(c.tinker_path)}`); } catch { revisionOf[c.tinker_path] = null; }
    }));
    $("#checkpoints tbody").innerHTML = ckpts.checkpoints.map((c) => {
      const r = revisionOf[c.tinker_path];
      return `<tr><td class="mono">${esc(c.checkpoint_id)}</td><td>${c.checkpoint_type === "sampler" ? "sampler version" : "training state"}</td>
        <td>${bytes(c.size_bytes)}</td><td>${when(c.time)}</td>
        <td>${r ? `<a href="${policyHref(r.policy, r.id)}" class="run-revision">${esc(r.policy)} #${r.seq}</a>` : '<span class="muted">—</span>'}</td></tr>`;
    }).join("") || '<tr><td colspan="5" class="muted">No checkpoints saved yet.</td></tr>';
  };
  await refresh();
  timer = setInterval(() => refresh().catch((e) => flash(e.message)), 2000);
}

// Lines of {name: [[x, y], ...]} on shared axes; plain SVG.
function chartSvg(series, xlabel, width = 520, height = 220) {
  const names = Object.keys(series);
  if (!names.length) return '<p class="muted">No metrics yet: they appear as forward_backward calls finish.</p>';
  const pts = names.flatMap((n) => series[n]);
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const L = 54, R = 10, T = 10, B = 30;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (width - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (height - T - B);
  const colors = ["#2f5bd3", "#d92d20", "#079455", "#dc6803", "#7a5af8", "#0e9384"];
  const lines = names.map((n, i) => `<polyline fill="none" stroke="${colors[i % colors.length]}" stroke-width="1.6"
    points="${series[n].map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}"/>`).join("");
  const legend = names.map((n, i) => `<span class="pill" style="color:${colors[i % colors.length]}">${esc(n)} (${series[n].length})</span>`).join("");
  const fmt = (v) => (Number.isInteger(v) && Math.abs(v) < 1e6 ? String(v) : Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(2) : v.toPrecision(3));
  return `<svg width="${width}" height="${height}" class="chart" role="img" aria-label="chart">
    <line x1="${L}" y1="${height - B}" x2="${width - R}" y2="${height - B}" stroke="#cfd4dc"/>
    <line x1="${L}" y1="${T}" x2="${L}" y2="${height - B}" stroke="#cfd4dc"/>
    <text x="${L - 6}" y="${T + 8}" text-anchor="end">${fmt(y1)}</text>
    <text x="${L - 6}" y="${height - B}" text-anchor="end">${fmt(y0)}</text>
    <text x="${L}" y="${height - 10}">${fmt(x0)}</text>
    <text x="${width - R}" y="${height - 10}" text-anchor="end">${xlabel} ${fmt(x1)}</text>
    ${lines}</svg><div>${legend}</div>`;
}

// ---- serving -----------------------------------------------------------------------------

async function servingPage() {
  main().innerHTML = `
    <h1>Serving <span class="muted" id="serving-live"></span></h1>
    <div class="grid" id="rates">
      <div class="card"><div class="muted">Requests / s</div><div class="big" id="rate-requests">—</div></div>
      <div class="card"><div class="muted">Tokens / s (completion)</div><div class="big" id="rate-tokens">—</div></div>
      <div class="card"><div class="muted">Time to first token (mean)</div><div class="big" id="rate-ttft">—</div></div>
      <div class="card"><div class="muted">Requests served</div><div class="big" id="total-requests">—</div></div>
      <div class="card"><div class="muted">Cold loads from the store (refused: queue full)</div>
        <div class="big"><span id="cold-loads">—</span> <span class="muted" id="cold-refused"></span></div></div>
    </div>
    <h2>Residency per engine</h2>
    <table id="engines"><thead><tr><th>Base model</th><th>Slots</th><th>Pinned</th><th>Host cache</th><th>Cold-load queue</th></tr></thead><tbody></tbody></table>
    <h2>Requests / s since this page opened</h2><div class="card" id="rate-chart"></div>`;
  let last = null;
  const start = Date.now() / 1000;
  const history = { "requests/s": [], "tokens/s": [] };
  const refresh = async () => {
    const s = await api("/admin/v1/serving");
    $("#serving-live").textContent = `· updated ${new Date(s.at * 1000).toLocaleTimeString()}`;
    $("#total-requests").textContent = String(s.counters.requests);
    $("#cold-loads").textContent = String(s.counters.cold_loads);
    $("#cold-refused").textContent = `(${s.counters.cold_load_rejections})`;
    $("#engines tbody").innerHTML = s.engines.map((e) => `<tr data-base="${esc(e.base)}"><td>${esc(e.base)}</td>
      <td><span class="bar"><span style="width:${(100 * e.slots) / Math.max(1, e.max_slots)}%"></span></span> <span class="slots">${e.slots} / ${e.max_slots}</span></td>
      <td>${e.pinned_slots}</td><td class="host">${e.host}</td><td class="queue">${e.load_queue}</td></tr>`).join("");
    if (last) {
      const dt = s.at - last.at;
      const dreq = s.counters.requests - last.counters.requests;
      const dtok = (s.tokens.completion || 0) - (last.tokens.completion || 0);
      const dft = s.counters.first_tokens - last.counters.first_tokens;
      const dfts = s.counters.first_token_seconds - last.counters.first_token_seconds;
      $("#rate-requests").textContent = (dreq / dt).toFixed(2);
      $("#rate-tokens").textContent = (dtok / dt).toFixed(1);
      $("#rate-ttft").textContent = dft > 0 ? `${((1000 * dfts) / dft).toFixed(0)} ms` : "—";
      const t = Math.round(s.at - start);
      history["requests/s"].push([t, dreq / dt]);
      history["tokens/s"].push([t, dtok / dt]);
      for (const k in history) if (history[k].length > 300) history[k].shift();
      $("#rate-chart").innerHTML = chartSvg({ "requests/s": history["requests/s"] }, "seconds on this page", 720, 180);
    }
    last = s;
  };
  await refresh();
  timer = setInterval(() => refresh().catch((e) => flash(e.message)), 1000);
}

// ---- router ------------------------------------------------------------------------------

async function route() {
  document.body.dataset.ready = ""; // set again once this page has rendered
  clearInterval(timer);
  timer = null;
  if (sessionStorage.getItem(KEY + ".ok") !== "1") return loginPage();
  $("#nav").hidden = false;
  const [path, query] = (location.hash.slice(1) || "/policies").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === parts[0] || (a.dataset.page === "runs" && parts[0] === "run")
      || (a.dataset.page === "policies" && parts[0] === "policy"));
  }
  try {
    if (parts[0] === "policy" && parts.length === 3) await policyPage(`${parts[1]}/${parts[2]}`, params);
    else if (parts[0] === "rev" && parts[1]) await revRedirect(parts[1]);
    else if (parts[0] === "runs") await runsPage(params);
    else if (parts[0] === "run" && parts[1]) await runPage(parts.slice(1).join("/"));
    else if (parts[0] === "serving") await servingPage();
    else await policiesPage(params);
    document.body.dataset.ready = location.hash; // tests wait on this
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return;
    main().innerHTML = `<p class="fail" id="page-error">${esc(e.message)}</p>`;
    document.body.dataset.ready = location.hash;
  }
}

window.addEventListener("hashchange", () => { flash(""); route(); });
$("#logout").addEventListener("click", () => logout());
route();
