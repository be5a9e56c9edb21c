"use strict";
// Agents not connected and not heard from for this long are shown as offline.
const OFFLINE_AFTER = 120;
// The API token lives in this tab's session storage and travels as a header, never as a
// cookie, so another site cannot make the browser use it.
const TOKEN_KEY = "outpost-token";
// A token in the address's fragment (which browsers never send to the server) is taken once and
// removed from the address: for kiosks and automation.
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(location.hash.slice("#token=".length)));
  history.replaceState(null, "", location.pathname + location.search);
}
const token = () => sessionStorage.getItem(TOKEN_KEY);
class SignInNeeded extends Error {}
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
};
const ago = (now, at) => {
  if (at == null) return "never";
  const s = Math.max(0, now - at);
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return Math.floor(s / 86400) + "d ago";
};

function renderRollouts(rollouts) {
  const box = document.getElementById("rollouts");
  box.replaceChildren();
  if (rollouts.length === 0) box.append(el("p", {class: "meta"}, "No rollouts yet: outpost-hub rollout create --help"));
  for (const r of rollouts) {
    const card = el("div", {class: "rollout", "data-rollout": r.id, "data-phase": r.phase});
    card.append(el("div", {class: "title"},
      `#${r.id} ${r.bundle} → ${r.ref.replace("refs/tags/", "")} `,
      el("span", {class: "phase-" + r.phase}, r.phase + (r.reason ? ` (${r.reason})` : ""))));
    card.append(el("div", {class: "meta"},
      `${r.selector || "all agents"} · ${r.members} agents · ${r.on_release} on the release (waves allow ${r.allowed}) · ` +
      `${r.failures} failed of ${r.budget} allowed · by ${r.created_by}`));
    r.waves.forEach((w, i) => {
      const total = Math.max(w.planned, w.released, 1);
      const bar = el("div", {class: "bar"});
      const seg = (kind, n) => { if (n > 0) bar.append(el("div", {class: "seg-" + kind, style: `width:${100 * n / total}%`})); };
      seg("healthy", w.healthy); seg("failed", w.failed); seg("pending", w.pending); seg("restored", w.restored);
      seg("released", w.released - w.healthy - w.failed - w.pending - w.restored);
      card.append(el("div", {class: "wave", "data-wave": i + 1, "data-state": w.state},
        el("span", {}, `wave ${i + 1} · ${w.size}`), bar,
        el("span", {class: "meta"}, `${w.state} · ${w.released}/${w.planned} released · ${w.healthy} healthy · ${w.failed} failed · ${w.pending} pending`)));
    });
    box.append(card);
  }
}

// What the agent list shows: filters (sent to the hub) and the page's cursor. Previous pages'
// cursors are kept so "previous" goes back.
const view = {after: null, back: [], next: null};
const PAGE = 100;
const filters = () => {
  const q = new URLSearchParams({limit: String(PAGE)});
  for (const id of ["label", "bundle", "phase", "connected", "search"]) {
    const value = document.getElementById("f-" + id).value.trim();
    if (value) q.set(id, value);
  }
  if (view.after) q.set("after", view.after);
  return q;
};
const resetPage = () => { view.after = null; view.back = []; };

function renderSummary(summary) {
  const counts = document.getElementById("counts");
  const offline = summary.agents - summary.revoked - summary.connected;
  counts.replaceChildren(
    el("span", {"data-count": "agents"}, `${summary.agents.toLocaleString()} agents`),
    el("span", {"data-count": "connected"}, `${summary.connected.toLocaleString()} connected`),
    el("span", {}, `${Math.max(0, offline).toLocaleString()} not connected`),
    el("span", {}, `${summary.stale.toLocaleString()} stale`),
    el("span", {"data-count": "drifted"}, `${summary.drifted.toLocaleString()} drifted`),
    el("span", {}, `${summary.revoked.toLocaleString()} revoked`));
  const box = document.getElementById("bundles");
  box.replaceChildren();
  const bundleSelect = document.getElementById("f-bundle");
  const have = new Set([...bundleSelect.options].map(o => o.value));
  for (const b of summary.bundles) {
    if (!have.has(b.bundle)) bundleSelect.append(el("option", {value: b.bundle}, b.bundle));
    const total = Object.values(b.phases).reduce((a, n) => a + n, 0);
    const bar = el("div", {class: "bar"});
    for (const phase of ["Healthy", "Applying", "Degraded", "Failed", "Unknown"]) {
      const n = b.phases[phase] || 0;
      if (n > 0) {
        const seg = el("div", {class: "seg-" + phase, style: `width:${100 * n / Math.max(total, 1)}%`, title: `${phase}: ${n}`});
        seg.addEventListener("click", () => {
          document.getElementById("f-bundle").value = b.bundle;
          document.getElementById("f-phase").value = phase;
          resetPage(); refresh();
        });
        bar.append(seg);
      }
    }
    const phases = Object.entries(b.phases).map(([p, n]) => el("span", {class: "badge " + p, "data-phase-count": p}, `${p} ${n.toLocaleString()}`));
    const releases = b.releases.slice(0, 6).map(r => el("span", {class: "label"}, `${r.release || r.snapshot}: ${r.agents.toLocaleString()}`));
    box.append(el("div", {class: "bundle", "data-summary-bundle": b.bundle},
      el("div", {class: "title"}, b.bundle, " ", ...phases), bar, el("div", {class: "meta"}, "on ", ...releases)));
  }
  if (summary.bundles.length === 0) box.append(el("p", {class: "meta"}, "No bundle is assigned to any agent yet."));
  const keys = document.getElementById("label-keys");
  keys.replaceChildren(...summary.labels.map(l => el("option", {value: l.values[0] ? `${l.key}=${l.values[0].value}` : l.key})));
}

function renderAgents(fleet) {
  const select = document.getElementById("group");
  const keys = new Set();
  fleet.agents.forEach(a => Object.keys(a.labels).forEach(k => keys.add(k)));
  const have = new Set([...select.options].map(o => o.value));
  [...keys].sort().forEach(k => { if (!have.has(k)) select.append(el("option", {value: k}, k)); });
  const by = select.value;
  const groups = new Map();
  for (const a of fleet.agents) {
    const key = by ? (a.labels[by] ?? "(none)") : "";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(a);
  }
  const body = document.getElementById("agents");
  body.replaceChildren();
  for (const key of [...groups.keys()].sort()) {
    const agents = groups.get(key);
    if (by) body.append(el("tr", {class: "group"}, el("td", {colspan: 4}, `${by}=${key} · ${agents.length} agents on this page`)));
    for (const a of agents) {
      const labels = el("td");
      Object.entries(a.labels).forEach(([k, v]) => labels.append(el("span", {class: "label"}, `${k}=${v}`)));
      const bundles = el("td");
      for (const b of a.bundles) {
        const phase = b.status ? b.status.phase : "Unknown";
        const line = el("div", {"data-bundle": b.bundle},
          `${b.bundle}: ${b.release || "gen " + b.generation} `,
          el("span", {class: "badge " + phase, "data-health": phase, title: b.status ? b.status.message : "no report yet"}, phase));
        if (b.status && b.status.stale) line.append(el("span", {class: "badge Stale", "data-stale": "true", title: "its snapshot expired: still enforced, but the agent has heard nothing newer"}, "stale"));
        if (b.drift && b.drift.left_objects > 0) line.append(el("span", {class: "badge Drift", "data-drift": "left",
          title: `${b.drift.left_objects} objects differ from Git since ${ago(fleet.now, b.drift.left_since)}, left in place (drift: report); details: outpost-hub drift --agent ${a.id}`}, "drift"));
        else if (b.drift && b.drift.corrected_at != null && fleet.now - b.drift.corrected_at < 86400) line.append(el("span", {class: "badge Corrected", "data-drift": "corrected",
          title: `drift applied back ${ago(fleet.now, b.drift.corrected_at)} (${b.drift.corrected_objects} objects in all); details: outpost-hub drift --agent ${a.id}`}, "drift corrected"));
        bundles.append(line);
      }
      const isOffline = !a.connected && (a.last_seen == null || fleet.now - a.last_seen > OFFLINE_AFTER);
      body.append(el("tr", {"data-agent": a.id},
        el("td", {}, a.id + (a.revoked ? " (revoked)" : "")), labels, bundles,
        el("td", {class: isOffline ? "offline" : ""}, a.connected ? "connected" : ago(fleet.now, a.last_seen))));
    }
  }
  if (fleet.agents.length === 0) body.append(el("tr", {}, el("td", {colspan: 4, class: "meta"}, "No agent matches.")));
  view.next = fleet.next;
  const first = view.back.length * PAGE;
  document.getElementById("page").textContent = fleet.matched === 0 ? "" :
    `${(first + 1).toLocaleString()}–${(first + fleet.agents.length).toLocaleString()} of ${fleet.matched.toLocaleString()}`;
  document.getElementById("prev").disabled = view.back.length === 0;
  document.getElementById("next").disabled = !fleet.next;
}

function showSignIn(message) {
  document.getElementById("signin").hidden = false;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("error").textContent = message || "";
}

async function api(url) {
  const response = await fetch(url, {headers: {Authorization: "Bearer " + token()}, cache: "no-store"});
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new SignInNeeded(body.error || "sign in with an API token");
  }
  if (!response.ok) throw new Error(`${url}: ${response.status} ${body.error || ""}`);
  return body;
}

async function refresh() {
  if (!token()) { showSignIn("sign in with an API token (viewer or more)"); return; }
  try {
    const [who, summary, fleet, rollouts] = await Promise.all(
      ["/api/v1/whoami", "/api/v1/fleet/summary", "/api/v1/fleet?" + filters(), "/api/v1/rollouts"].map(api));
    document.getElementById("signin").hidden = true;
    document.getElementById("signout").hidden = false;
    document.getElementById("who").textContent = `${who.name} (${who.role})`;
    renderRollouts(rollouts);
    renderSummary(summary);
    renderAgents(fleet);
    document.getElementById("error").textContent = "";
    document.body.setAttribute("data-loaded", "true");
  } catch (error) {
    if (error instanceof SignInNeeded) showSignIn(error.message);
    else document.getElementById("error").textContent = "cannot reach the hub: " + error.message;
  }
}
document.getElementById("signin").addEventListener("submit", event => {
  event.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  refresh();
});
document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showSignIn("signed out");
});
document.getElementById("group").addEventListener("change", refresh);
for (const id of ["label", "bundle", "phase", "connected"]) {
  document.getElementById("f-" + id).addEventListener("change", () => { resetPage(); refresh(); });
}
let typing = null;
document.getElementById("f-search").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { resetPage(); refresh(); }, 300);
});
document.getElementById("next").addEventListener("click", () => {
  if (!view.next) return;
  view.back.push(view.after);
  view.after = view.next;
  refresh();
});
document.getElementById("prev").addEventListener("click", () => {
  if (view.back.length === 0) return;
  view.after = view.back.pop();
  refresh();
});
refresh();
setInterval(refresh, 2000);
