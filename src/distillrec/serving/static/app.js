// The page over `distillrec serve`: pick a session from the catalogue (or type ids), see what the run recommends.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { session: [], info: {}, query: "", offset: 0, lastResult: null, seq: 0 };
const PAGE = 24;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function card(item, extra = {}) {
  const pic = item.image_url ? el("img", { src: item.image_url, alt: item.title, loading: "lazy" })
                             : el("div", { class: "noimg" }, (item.title || item.id).slice(0, 2));
  const c = el("div", { class: "card", title: `${item.id}: ${item.title}`, "data-id": item.id,
                        onclick: () => addToSession([item.id]) },
    pic, el("div", { class: "title" }, item.title || "(no title)"), el("div", { class: "id" }, item.id));
  if (extra.rank) c.append(el("span", { class: "rank" }, String(extra.rank)));
  if (item.score !== undefined) c.append(el("div", { class: "score" }, `score ${item.score.toFixed(3)}`));
  if (item.cold) c.append(el("span", { class: "badge cold", title: "never seen in training" }, "cold"));
  return c;
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) {
    const d = data.detail;
    const err = new Error(Array.isArray(d) ? d.map((e) => e.msg).join("; ") : String(d));
    err.detail = Array.isArray(d) ? d : [];
    throw err;
  }
  return data;
}

function renderSession() {
  const box = $("session");
  box.replaceChildren();
  if (!state.session.length) box.append(el("span", { class: "hint" }, "Click products below, or type ids."));
  const res = state.lastResult;
  state.session.forEach((id, pos) => {
    let cls = "chip";
    if (res && res.session_cold.includes(id)) cls += " cold";
    if (res && res.session_ignored.includes(id)) cls += " ignored";
    box.append(el("span", { class: cls, "data-id": id, title: "click to remove",
                            onclick: () => { state.session.splice(pos, 1); update(); } }, id));
  });
}

async function update() {
  const seq = ++state.seq;  // only the latest request's answer is shown (answers may arrive out of order)
  renderSession();
  const results = $("results");
  if (!state.session.length) {
    state.lastResult = null;
    results.replaceChildren(el("span", { class: "hint" }, "Recommendations appear here."));
    $("notes").textContent = "";
    showError("");
    return;
  }
  try {
    const res = await api("/recommend", { items: state.session, k: Number($("k").value),
                                          exclude_seen: $("exclude-seen").checked });
    if (seq !== state.seq) return;
    state.lastResult = res;
    showError("");
    results.replaceChildren(...res.items.map((it, i) => card(it, { rank: i + 1 })));
    const cold = res.items.filter((it) => it.cold).length;
    const notes = [`${res.items.length} items, ${cold} cold`];
    if (res.session_ignored.length) notes.push(`ignored (unseen in training, no content vector): ${res.session_ignored.join(", ")}`);
    if (res.session_truncated) notes.push(`${res.session_truncated} oldest items not read`);
    if (res.fallback) notes.push(`nothing readable in the session: most ${res.fallback} items`);
    $("notes").textContent = "(" + notes.join("; ") + ")";
    renderSession();
  } catch (err) {
    if (seq !== state.seq) return;
    // unknown ids leave the session (the error names them); the rest is recommended for again
    const bad = (err.detail || []).filter((e) => e.type === "unknown_item" && e.loc.length === 3).map((e) => e.loc[2]);
    if (bad.length) {
      state.session = state.session.filter((_, i) => !bad.includes(i));
      await update();
    }
    showError(err.message);
  }
}

function addToSession(ids) {
  const clean = ids.map((s) => s.trim()).filter(Boolean);
  if (!clean.length) return;
  state.session.push(...clean);
  update();
}

async function loadCatalogue(append = false) {
  const q = encodeURIComponent(state.query);
  const page = await api(`/items?query=${q}&limit=${PAGE}&offset=${state.offset}`);
  const grid = $("catalogue");
  const cards = page.items.map((it) => card(it));
  if (append) grid.append(...cards); else grid.replaceChildren(...cards);
  if (!page.items.length && !append) grid.append(el("span", { class: "hint" }, "no item matches"));
  $("more").hidden = state.offset + page.items.length >= page.total;
}

async function main() {
  const h = await api("/health");
  state.info = h;
  $("run-info").textContent = `${h.model} on ${h.dataset} · ${h.items} items (${h.cold_items} unseen in training, ` +
    `cold start: ${h.cold_start === "content" ? "through content vectors" : "not supported by this model"})`;
  $("id-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const ids = $("id-input").value.split(/[\s,]+/);
    $("id-input").value = "";
    addToSession(ids);
  });
  $("clear").addEventListener("click", () => { state.session = []; update(); });
  $("k").addEventListener("change", update);
  $("exclude-seen").addEventListener("change", update);
  let timer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.query = $("search").value; state.offset = 0; loadCatalogue(); }, 200);
  });
  $("more").addEventListener("click", () => { state.offset += PAGE; loadCatalogue(true); });
  await loadCatalogue();
  document.body.dataset.ready = "1";
}

main().catch((err) => showError(err.message));
