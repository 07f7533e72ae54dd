// shim's cluster map. It talks to the shimd that served it with Connect's
// JSON protocol: unary calls as plain JSON POSTs, and the Events stream as
// enveloped JSON read from the fetch body. No framework, no build step.
"use strict";

const API = "/shim.v1.ShimService/";
const $ = (id) => document.getElementById(id);
let token = "";
let lastIndex = 0;          // the last event seen; the stream resumes after it
let usage = {};             // node name -> {cpuMilli, memoryBytes}
let refreshTimer = null;
let streamCtl = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function num(v) { return v === undefined || v === null ? 0 : Number(v); }

function cores(milli) {
  const c = num(milli) / 1000;
  return (Math.round(c * 100) / 100).toString();
}

function bytes(b) {
  b = num(b);
  const u = ["B", "K", "M", "G", "T"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (b >= 10 || i === 0 ? Math.round(b) : Math.round(b * 10) / 10) + u[i];
}

function setStatus(text, bad) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("bad", !!bad);
}

class APIError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

// call is one unary Connect call.
async function call(method, body) {
  const res = await fetch(API + method, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Connect-Protocol-Version": "1",
      "Authorization": "Bearer " + token },
    body: JSON.stringify(body || {}),
  });
  const text = await res.text();
  let msg = {};
  try { msg = text ? JSON.parse(text) : {}; } catch (e) { msg = { message: text }; }
  if (!res.ok) {
    if (res.status === 401 || msg.code === "unauthenticated") showLogin("the token was refused: " + (msg.message || res.status));
    throw new APIError(msg.code || String(res.status), msg.message || res.statusText);
  }
  return msg;
}

// ---- the map

function stateName(s, prefix) {
  return (s || "").replace(prefix, "").toLowerCase() || "unknown";
}

function bar(label, capacity, granted, used, fmt) {
  const b = el("div", "bar");
  const l = el("div", "label");
  const free = Math.max(capacity - granted, 0);
  l.append(el("span", "", label),
    el("span", "", "granted " + fmt(granted) + (used !== null ? " · used " + fmt(used) : "") + " · free " + fmt(free) + " / " + fmt(capacity)));
  const t = el("div", "track");
  const g = el("div", "granted");
  g.style.width = (capacity > 0 ? Math.min(100, 100 * granted / capacity) : 0) + "%";
  t.append(g);
  if (used !== null) {
    const u = el("div", "used");
    u.style.width = (capacity > 0 ? Math.min(100, 100 * used / capacity) : 0) + "%";
    t.append(u);
  }
  b.append(l, t);
  return b;
}

function chip(p) {
  const state = stateName(p.state, "PROCESS_STATE_");
  const c = el("span", "chip " + state);
  c.dataset.id = p.id;
  c.dataset.node = p.node || "";
  c.dataset.state = state;
  const name = (p.spec && p.spec.name) || p.id.slice(0, 8);
  c.title = [p.id, state, (p.spec && p.spec.command || []).join(" "), p.reason || ""].filter(Boolean).join("\n");
  c.append(el("span", "", name));
  const rs = el("button", "resize", "⇲");
  rs.type = "button";
  rs.title = "resize";
  rs.onclick = () => openResize(p);
  const k = el("button", "kill", "✕");
  k.type = "button";
  k.title = "kill";
  k.onclick = () => act(() => call("Kill", { ids: [p.id] }), "kill " + name);
  c.append(rs, k);
  return c;
}

function nodeBox(n, procs) {
  const rec = n.node || {};
  const state = stateName(rec.state, "NODE_STATE_");
  const box = el("div", "node " + state + (rec.draining ? " draining" : ""));
  box.dataset.node = rec.name;
  box.dataset.state = state;
  const h = el("h2", "", rec.name);
  h.append(el("span", "state", state + (rec.draining ? ", draining" : "")));
  if (n.leader) h.append(el("span", "meta", "leader"));
  const actions = el("span", "actions");
  if (state === "up") {
    const d = el("button", "drain", rec.draining ? "undrain" : "drain");
    d.type = "button";
    d.onclick = () => act(() => call("Drain", { node: rec.name, undrain: !!rec.draining }), d.textContent + " " + rec.name);
    actions.append(d);
  }
  h.append(actions);
  box.append(h);
  const role = stateName(rec.role, "NODE_ROLE_");
  box.append(el("div", "meta", role + " · " + (rec.apiAddr || "") + " · " + num(n.processes) + " processes"));
  const cap = rec.capacity || {};
  const capCPU = Math.max(num(cap.cpuMaxMilli), num(cap.cpuMinMilli));
  const capMem = Math.max(num(cap.memMaxBytes), num(cap.memMinBytes));
  const g = n.granted || {};
  const u = state === "up" ? usage[rec.name] : undefined;
  box.append(bar("CPU", capCPU, num(g.cpuMilli), u ? num(u.cpuMilli) : null, cores));
  box.append(bar("memory", capMem, num(g.memBytes), u ? num(u.memoryBytes) : null, bytes));
  const chips = el("div", "chips");
  for (const p of procs) chips.append(chip(p));
  box.append(chips);
  return box;
}

function render(nodes, procs) {
  const byNode = {};
  for (const p of procs) (byNode[p.node || ""] = byNode[p.node || ""] || []).push(p);
  const map = $("map");
  const boxes = [];
  for (const n of nodes) boxes.push(nodeBox(n, byNode[(n.node || {}).name] || []));
  const unplaced = byNode[""] || [];
  if (unplaced.length) {
    const box = el("div", "node pending-box");
    box.dataset.node = "";
    box.append(el("h2", "", "not placed"), el("div", "meta", "waiting for room"));
    const chips = el("div", "chips");
    for (const p of unplaced) chips.append(chip(p));
    box.append(chips);
    boxes.push(box);
  }
  map.replaceChildren(...boxes);
  const up = nodes.filter((n) => (n.node || {}).state === "NODE_STATE_UP").length;
  $("summary").textContent = up + "/" + nodes.length + " nodes up · " + procs.length + " processes";
}

async function refresh() {
  try {
    const [n, l] = await Promise.all([call("Nodes", {}), call("List", {})]);
    render(n.nodes || [], l.processes || []);
    setStatus("live · index " + (l.index || n.index || 0));
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("error: " + e.message, true);
  }
}

// soon asks for a refresh within 150 ms: a burst of events makes one.
function soon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 150);
}

async function pollUsage() {
  try {
    const n = await call("Nodes", { usage: true });
    const u = {};
    for (const s of n.nodes || []) if (s.usage) u[(s.node || {}).name] = s.usage;
    usage = u;
    soon();
  } catch (e) { /* the map's own refresh reports errors */ }
}

async function act(fn, what) {
  try {
    await fn();
    setStatus(what + ": done");
  } catch (e) {
    setStatus(what + ": " + e.message, true);
  }
  soon();
}

// ---- resize

let resizing = null;

function openResize(p) {
  resizing = p;
  $("resize-id").textContent = (p.spec && p.spec.name) || p.id;
  $("resize-cpu").value = "";
  $("resize-mem").value = "";
  $("resize-move").checked = false;
  $("resize-error").textContent = "";
  $("resize").showModal();
}

function parseCPU(s) {
  const v = Number(s);
  if (s === "" || !isFinite(v) || v < 0) throw new Error("CPU " + JSON.stringify(s) + ": give cores, e.g. 0.5");
  return String(Math.round(v * 1000));
}

function parseMem(s) {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s.trim());
  if (!m) throw new Error("memory " + JSON.stringify(s) + ": give bytes with K, M or G, e.g. 64M");
  const mult = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2].toUpperCase()];
  return String(Math.round(Number(m[1]) * mult));
}

function resizeRequest() {
  const r = {};
  const cpu = $("resize-cpu").value.trim(), mem = $("resize-mem").value.trim();
  if (cpu) {
    const [min, max, burst] = cpu.split(":");
    if (min) r.cpuMinMilli = parseCPU(min);
    if (max) r.cpuMaxMilli = parseCPU(max);
    if (burst) r.cpuBurstMilli = parseCPU(burst);
  }
  if (mem) {
    const [min, max] = mem.split(":");
    if (min) r.memMinBytes = parseMem(min);
    if (max) r.memMaxBytes = parseMem(max);
  }
  if (!Object.keys(r).length) throw new Error("give a CPU or a memory size");
  return { id: resizing.id, resources: r, move: $("resize-move").checked };
}

$("resize-cancel").onclick = () => $("resize").close();
$("resize-form").onsubmit = async (ev) => {
  ev.preventDefault();
  try {
    await call("Resize", resizeRequest());
    $("resize").close();
    setStatus("resized " + resizing.id);
    soon();
  } catch (e) {
    $("resize-error").textContent = e.message;
  }
};

// ---- the event stream

function addEvent(e) {
  const idx = num(e.index);
  if (idx > lastIndex) lastIndex = idx;
  const li = el("li", (e.type || "").replace(/\./g, "-"));
  li.dataset.type = e.type || "";
  const t = new Date(num(e.unixNano) / 1e6);
  li.append(el("span", "t", t.toLocaleTimeString()), el("span", "ty", e.type || ""));
  li.append(document.createTextNode([e.id, e.node && "on " + e.node, e.reason].filter(Boolean).join(" ")));
  li.title = "index " + idx;
  const tl = $("timeline");
  tl.prepend(li);
  while (tl.children.length > 300) tl.lastChild.remove();
}

function frame(payload) {
  const body = new TextEncoder().encode(JSON.stringify(payload));
  const buf = new Uint8Array(5 + body.length);
  new DataView(buf.buffer).setUint32(1, body.length);
  buf.set(body, 5);
  return buf;
}

// streamEvents follows the Events stream, resuming after the last index
// seen whenever it breaks.
async function streamEvents(gen) {
  const dec = new TextDecoder();
  while (gen === generation) {
    const ctl = new AbortController();
    streamCtl = ctl;
    try {
      const res = await fetch(API + "Events", {
        method: "POST", signal: ctl.signal,
        headers: { "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
          "Authorization": "Bearer " + token },
        body: frame({ since: String(lastIndex), follow: true }),
      });
      if (!res.ok) {
        let msg = {};
        try { msg = await res.json(); } catch (e) { /* not JSON */ }
        throw new APIError(msg.code || String(res.status), msg.message || res.statusText);
      }
      const reader = res.body.getReader();
      let buf = new Uint8Array(0);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const joined = new Uint8Array(buf.length + value.length);
        joined.set(buf);
        joined.set(value, buf.length);
        buf = joined;
        while (buf.length >= 5) {
          const n = new DataView(buf.buffer, buf.byteOffset).getUint32(1);
          if (buf.length < 5 + n) break;
          const flags = buf[0];
          const msg = JSON.parse(dec.decode(buf.subarray(5, 5 + n)) || "{}");
          buf = buf.slice(5 + n);
          if (flags & 2) {
            if (msg.error) throw new APIError(msg.error.code, msg.error.message);
          } else {
            addEvent(msg);
            soon();
          }
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
      if (e.code === "out_of_range") lastIndex = 0; // the ring moved past us: start from the oldest kept
      if (e.code === "unauthenticated") { showLogin("the token was refused: " + e.message); return; }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- log in

function showLogin(why) {
  generation++;
  timers.forEach(clearInterval);
  if (streamCtl) streamCtl.abort();
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  setStatus("logged out");
}

let timers = [];
let generation = 0; // bumped by each start: older event loops end

function start() {
  generation++;
  if (streamCtl) streamCtl.abort();
  lastIndex = 0;
  $("timeline").replaceChildren();
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  timers.forEach(clearInterval);
  refresh();
  pollUsage();
  streamEvents(generation);
  timers = [setInterval(refresh, 3000), setInterval(pollUsage, 5000)];
}

$("login").onsubmit = (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  if (!token) return;
  localStorage.setItem("shim-token", token);
  start();
};

$("logout").onclick = () => {
  localStorage.removeItem("shim-token");
  token = "";
  timers.forEach(clearInterval);
  showLogin();
};

// tokenFromHash takes a #token=... from the address (and removes it from
// the address bar).
function tokenFromHash() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return false;
  token = decodeURIComponent(m[1]);
  localStorage.setItem("shim-token", token);
  history.replaceState(null, "", location.pathname);
  return true;
}

window.addEventListener("hashchange", () => { if (tokenFromHash()) start(); });

(function init() {
  if (!tokenFromHash()) token = localStorage.getItem("shim-token") || "";
  if (token) start(); else showLogin();
})();
