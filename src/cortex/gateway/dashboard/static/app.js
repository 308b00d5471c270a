// cortex fleet dashboard: polls the gateway's admin JSON and renders it. No framework, no build step.
// Every value from the server is written with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "cortex-admin-key";
let adminKey = sessionStorage.getItem(KEY_STORE) || "";
let stopped = false;
let pending = null; // {model, node}: a load started from this page, followed until it ends
const rows = new Map(); // "node\u0000model" -> <tr>, updated in place so buttons stay put between polls
const $ = (id) => document.getElementById(id);

class NeedsKey extends Error {}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (adminKey) headers.Authorization = "Bearer " + adminKey;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (_) { /* an empty or non-JSON answer */ }
  if (resp.status === 401) throw new NeedsKey((data && data.error && data.error.message) || "admin key required");
  if (!resp.ok) throw new Error((data && data.error && data.error.message) || resp.status + " " + resp.statusText);
  return { status: resp.status, data };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) if (child != null) node.append(child instanceof Node ? child : String(child));
  return node;
}

const mb = (v) => (v == null ? "-" : v >= 1024 ? (v / 1024).toFixed(1) + " GB" : Math.round(v) + " MB");
const num = (v, digits = 1) => (v == null ? "-" : Number(v).toFixed(digits));
const ms = (s) => (s == null ? "-" : s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(2) + " s");
const pct = (v) => (v == null ? "-" : (v * 100).toFixed(1) + "%");

function notice(text, cls) {
  const box = $("notice");
  box.textContent = text;
  box.className = "banner " + (cls || "");
  box.hidden = !text;
}

// ---- rendering ---------------------------------------------------------------------------------
function renderNodes(state) {
  const cards = state.nodes.map((n) => {
    const health = el("span", { class: n.healthy ? "good" : "bad" }, n.healthy ? "healthy" : "unhealthy");
    const card = el("div", { class: "card", "data-node": n.name },
      el("h3", {}, n.name + " ", health),
      el("div", { class: "sub dim" }, n.endpoint + (n.hostname ? " · " + n.hostname : "")));
    if (!n.healthy && n.last_error) card.append(el("div", { class: "sub bad" }, n.last_error));
    for (const d of n.devices) {
      const used = d.vram_used_mb || 0, total = d.vram_total_mb || 0;
      const fill = el("div");
      fill.style.width = (total ? Math.min(100, (100 * used) / total) : 0).toFixed(1) + "%";
      card.append(el("div", { class: "device", "data-device": String(d.index) },
        el("div", {}, d.index + ": " + (d.name || d.kind)),
        el("div", { class: "meter" }, fill),
        el("div", { class: "sub dim" },
          mb(used) + " / " + mb(total) + " used · util " + (d.utilization_pct == null ? "-" : Math.round(d.utilization_pct) + "%") +
          " · " + (d.temp_c == null ? "-" : Math.round(d.temp_c) + "°C"))));
    }
    return card;
  });
  $("nodes").replaceChildren(...cards);
}

function modelRow(key, model, node) {
  const unload = el("button", { class: "unload", type: "button" }, "Unload");
  unload.addEventListener("click", () => doUnload(model, node));
  const pin = el("button", { class: "pin", type: "button" }, "Pin");
  pin.addEventListener("click", () => doPin(model, node, pin.dataset.pinned !== "true"));
  const cells = ["model", "node", "status", "memory", "inflight", "queue", "toks", "ttft", "errors", "pinned"];
  const tr = el("tr", { "data-model": model, "data-node": node });
  for (const name of cells) tr.append(el("td", { class: name + (["memory", "inflight", "queue", "toks", "ttft", "errors"].includes(name) ? " num" : "") }));
  tr.append(el("td", { class: "actions" }, unload, " ", pin));
  tr.querySelector(".model").textContent = model;
  tr.querySelector(".node").textContent = node;
  return tr;
}

function setStatus(cell, text, cls, progress) {
  cell.replaceChildren(el("span", { class: cls || "" }, text));
  if (progress != null) {
    cell.append(el("progress", { max: 1, value: progress }), el("span", { class: "percent dim" }, " " + Math.round(progress * 100) + "%"));
  }
}

function renderModels(state, live) {
  const seen = new Set();
  const body = document.querySelector("#models tbody");
  const figures = (live && live.models) || {};
  const put = (model, node, fill) => {
    const key = node + "\u0000" + model;
    seen.add(key);
    let tr = rows.get(key);
    if (!tr) { tr = modelRow(key, model, node); rows.set(key, tr); body.append(tr); }
    fill(tr);
  };
  for (const n of state.nodes) {
    for (const m of n.models) {
      put(m.id, n.name, (tr) => {
        const status = tr.querySelector(".status");
        tr.dataset.status = n.healthy ? m.status : "stale";
        if (!n.healthy) setStatus(status, "stale (was " + m.status + ")", "bad");
        else if (m.status === "loading" || m.status === "recovering") setStatus(status, m.status, "warn", m.load_progress || 0);
        else setStatus(status, m.status + (m.error ? " (" + m.error + ")" : ""), m.status === "loaded" ? "good" : m.status === "failed" || m.status === "poisoned" ? "bad" : "");
        tr.querySelector(".memory").textContent = m.vram_used_mb ? mb(m.vram_used_mb) : "-";
        tr.querySelector(".inflight").textContent = n.healthy ? String(Math.max(m.in_flight, m.neuron_in_flight)) : "-";
        tr.querySelector(".queue").textContent = n.healthy ? String(m.queue_depth) : "-";
        const f = figures[m.id] || {};
        tr.querySelector(".toks").textContent = num(f.tokens_per_s);
        tr.querySelector(".ttft").textContent = ms(f.ttft_p50_s);
        tr.querySelector(".errors").textContent = pct(f.error_rate);
        tr.querySelector(".pinned").textContent = m.pinned ? "yes" : "";
        const pin = tr.querySelector("button.pin");
        pin.dataset.pinned = String(m.pinned);
        pin.textContent = m.pinned ? "Unpin" : "Pin";
      });
    }
  }
  // Loads placed but not yet reported by their neuron: shown with their phase.
  for (const job of state.loads) {
    const key = (job.node || "?") + "\u0000" + job.model;
    if (seen.has(key)) continue;
    put(job.model, job.node || "?", (tr) => {
      tr.dataset.status = "loading";
      setStatus(tr.querySelector(".status"), job.phase, "warn", 0);
    });
  }
  for (const [key, tr] of rows) if (!seen.has(key)) { tr.remove(); rows.delete(key); }
  $("no-models").hidden = rows.size > 0;
}

function renderLoadForm(state) {
  const models = $("load-model"), nodes = $("load-node");
  const wantModels = state.catalogue.map((c) => c.id);
  const wantNodes = state.nodes.filter((n) => n.healthy).map((n) => n.name);
  const sync = (select, values, keepFirst) => {
    const have = [...select.options].slice(keepFirst).map((o) => o.value);
    if (have.join("\u0000") === values.join("\u0000")) return;
    const chosen = select.value;
    while (select.options.length > keepFirst) select.remove(keepFirst);
    for (const v of values) select.append(el("option", { value: v }, v));
    if (values.includes(chosen)) select.value = chosen;
  };
  sync(models, wantModels, 0);
  sync(nodes, wantNodes, 1);
}

function renderEvents(live) {
  const events = (live && live.events) || [];
  const items = events.map((e) => el("li", { "data-kind": e.kind },
    el("span", { class: "dim" }, new Date(e.at * 1000).toLocaleTimeString() + " "),
    el("span", { class: e.kind === "eviction" ? "warn" : "" }, e.kind === "eviction" ? "evicted" : "cold load"),
    " " + e.model + " on " + e.node + (e.count > 1 ? " ×" + e.count : "")));
  $("events").replaceChildren(...items);
  $("no-events").hidden = items.length > 0;
}

function renderFollow(state) {
  if (!pending) return;
  const node = state.nodes.find((n) => n.name === pending.node);
  const replica = node && node.models.find((m) => m.id === pending.model);
  if (replica && replica.status === "loaded") {
    notice("loaded " + pending.model + " on " + pending.node, "good");
    pending = null;
  } else if (replica && replica.status === "failed") {
    notice("loading " + pending.model + " on " + pending.node + " failed: " + (replica.error || "?"), "bad");
    pending = null;
  } else {
    const p = replica && replica.load_progress;
    notice("loading " + pending.model + " on " + pending.node + (p != null ? " — " + Math.round(p * 100) + "%" : " …"), "warn");
  }
}

// ---- actions -------------------------------------------------------------------------------------
async function act(fn) {
  try { await fn(); } catch (err) {
    if (err instanceof NeedsKey) askForKey(err.message); else notice(err.message, "bad");
  }
}

function doLoad(event) {
  event.preventDefault();
  const model = $("load-model").value, node = $("load-node").value;
  if (!model) return;
  act(async () => {
    const { status, data } = await api("POST", "/admin/load", node ? { model, node } : { model });
    if (status === 200) notice(data.model + " is already loaded on " + data.node, "good");
    else { pending = { model: data.model, node: data.node }; notice("loading " + data.model + " on " + data.node + " …", "warn"); }
    poll();
  });
}

function doUnload(model, node) {
  act(async () => {
    const { data } = await api("POST", "/admin/unload", { model, node });
    const row = rows.get(node + "\u0000" + model);
    const pinned = row && row.querySelector("button.pin").dataset.pinned === "true";
    notice("unloaded " + data.model + " from " + data.node +
      (pinned ? " — it is pinned there, so the gateway loads it again; unpin it first to keep it out" : ""), pinned ? "warn" : "good");
    poll();
  });
}

function doPin(model, node, pinned) {
  act(async () => {
    const { data } = await api("POST", "/admin/pin", { model, node, pinned });
    notice((data.pinned ? "pinned " : "unpinned ") + data.model + " on " + data.node + " (until the gateway restarts)", "good");
    poll();
  });
}

function askForKey(message) {
  stopped = true;
  $("key-form").hidden = false;
  $("key-error").textContent = adminKey ? message : "";
  $("admin-key").focus();
}

function useKey(event) {
  event.preventDefault();
  adminKey = $("admin-key").value.trim();
  sessionStorage.setItem(KEY_STORE, adminKey);
  $("key-form").hidden = true;
  stopped = false;
  poll();
}

// ---- polling -------------------------------------------------------------------------------------
let timer = null;
async function poll() {
  clearTimeout(timer);
  if (stopped) return;
  try {
    const [state, live] = await Promise.all([api("GET", "/admin/state"), api("GET", "/admin/live")]);
    $("error").hidden = true;
    const g = state.data.gateway;
    $("gateway").textContent = "v" + g.version + " · up " + Math.round(g.uptime_s) + " s · eviction " + g.strategy;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    renderNodes(state.data);
    renderModels(state.data, live.data);
    renderLoadForm(state.data);
    renderEvents(live.data);
    renderFollow(state.data);
  } catch (err) {
    if (err instanceof NeedsKey) { askForKey(err.message); return; }
    $("error").textContent = "cannot read the fleet: " + err.message;
    $("error").hidden = false;
  }
  clearTimeout(timer); // a poll an action started may have finished first: keep one chain
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("load-form").addEventListener("submit", doLoad);
  $("key-form").addEventListener("submit", useKey);
  poll();
});
