// clipcraft search page. Plain JavaScript, no build step, nothing loaded from other sites.
// Everything the server sends is put into the page with textContent and properties, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  rows: [],          // the results on screen (image results), for the large view's previous / next
  query: null,       // the query on screen: {kind: "text"|"like"|"upload", q, id, name, upload, k, dedup, target}
  controller: null,  // aborts the request in flight when a new query starts
  uploads: new Map(),// upload number -> File, so back / forward can return to an image query
  nextUpload: 1,
  opener: null,      // the card button that opened the large view (focus goes back to it)
  viewing: -1,
};
const EXAMPLES = ["a dog running on the grass", "children playing in the water", "a man on a bicycle", "a snowy mountain"];

// -- talking to the server --------------------------------------------------------------------------------

async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("Could not reach the server. Is `clipcraft serve` still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : "The server answered " + response.status + ".";
    const err = new Error(detail);
    err.status = response.status;
    throw err;
  }
  return body;
}

// -- messages next to the control they concern -------------------------------------------------------------

function setError(id, message) {
  $(id).textContent = message || "";
  if (id === "q-error") $("bar").classList.toggle("invalid", Boolean(message));
  if (id === "opt-error") $("k").setAttribute("aria-invalid", message ? "true" : "false");
}
function clearErrors() { ["q-error", "opt-error"].forEach((id) => setError(id, "")); }
function setStatus(message, loading) {
  $("status").textContent = message || "";
  $("status").classList.toggle("loading", Boolean(loading));
}

// -- reading the controls and the URL ----------------------------------------------------------------------

function options() {
  const max = state.info ? state.info.max_k : 100;
  const k = Number($("k").value);
  if (!Number.isInteger(k) || k < 1 || k > max) {
    setError("opt-error", "Results must be a whole number from 1 to " + max + ".");
    $("k").focus();
    return null;
  }
  let dedup = null;
  if ($("dedup-on").checked) {
    dedup = Number($("dedup").value);
    if (!(dedup > 0 && dedup <= 1)) {
      setError("opt-error", "The near-duplicate threshold is a cosine similarity from 0.5 to 1.");
      $("dedup").focus();
      return null;
    }
  }
  return { k, dedup, target: $("target").value };
}

function queryFromUrl(params, historyState) {
  const k = Number(params.get("k")) || Number($("k").value) || 24;
  const dedup = params.has("dedup") ? Number(params.get("dedup")) : null;
  if (params.has("q")) return { kind: "text", q: params.get("q"), k, dedup };
  if (params.has("like")) return { kind: "like", id: Number(params.get("like")), k, dedup };
  if (params.has("image")) {
    const upload = historyState && historyState.upload;
    return { kind: "upload", upload, k, dedup, target: (historyState && historyState.target) || "images" };
  }
  return null;
}

function urlFor(query) {
  const p = new URLSearchParams();
  if (query.kind === "text") p.set("q", query.q);
  if (query.kind === "like") p.set("like", String(query.id));
  if (query.kind === "upload") p.set("image", "upload");
  p.set("k", String(query.k));
  if (query.dedup != null) p.set("dedup", String(query.dedup));
  return "?" + p.toString();
}

function showControls(query) {
  $("q").value = query && query.kind === "text" ? query.q : "";
  if (!query) return;
  $("k").value = String(query.k);
  $("dedup-on").checked = query.dedup != null;
  $("dedup").disabled = query.dedup == null;
  if (query.dedup != null) $("dedup").value = String(query.dedup);
  $("target").value = query.target || "images";
  $("target-label").hidden = !(query.kind === "upload" && state.info && state.info.captions > 0);
}

// -- running a query ---------------------------------------------------------------------------------------

function clearResults() {
  state.rows = [];
  $("results").replaceChildren();
  $("caption-results").hidden = true;
  $("caption-results").tBodies[0].replaceChildren();
}

function showEmptyState(show) { $("empty").hidden = !show; }

async function run(query, push) {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.query = query;
  clearErrors();
  clearResults();
  showEmptyState(false);
  showControls(query);
  echo(query);
  if (push) history.pushState(historyState(query), "", urlFor(query));
  setStatus("Searching…", true);
  $("results").setAttribute("aria-busy", "true");
  const started = performance.now();
  try {
    const body = await request(query, controller.signal);
    if (controller !== state.controller) return;
    const ms = Math.round(performance.now() - started);
    if (body.target === "captions") showCaptions(body.results, ms);
    else showImages(body, ms);
    if (query.kind === "like" && body.query) echoText("More like ", body.query.name);
  } catch (e) {
    if (e.name === "AbortError" || controller !== state.controller) return;
    clearResults();
    setStatus("");
    $("echo").hidden = true;  // nothing was found for it: the message says why
    // the message goes next to what it is about: the query box, or the options
    if (/^k |dedup/.test(e.message)) setError("opt-error", e.message);
    else setError("q-error", e.message);
  } finally {
    if (controller === state.controller) $("results").setAttribute("aria-busy", "false");
  }
}

function historyState(query) {
  return query.kind === "upload" ? { upload: query.upload, target: query.target } : {};
}

function request(query, signal) {
  const p = new URLSearchParams({ k: String(query.k) });
  if (query.dedup != null) p.set("dedup", String(query.dedup));
  if (query.kind === "text") {
    p.set("q", query.q);
    return api("/api/search/text?" + p.toString(), { signal });
  }
  if (query.kind === "like") {
    p.set("id", String(query.id));
    return api("/api/search/similar?" + p.toString(), { signal });
  }
  const file = state.uploads.get(query.upload);
  if (!file) {
    return Promise.reject(new Error("Image queries are not kept when the page reloads: drop, paste or pick the image again."));
  }
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(query.k));
  form.append("target", query.target || "images");
  if (query.dedup != null) form.append("dedup", String(query.dedup));
  return api("/api/search/image", { method: "POST", body: form, signal });
}

// -- what the query was (query echo) -----------------------------------------------------------------------

function echoText(before, what) {
  const p = $("echo-text");
  const strong = document.createElement("span");
  strong.className = "echo-q";
  strong.textContent = what;
  p.replaceChildren(document.createTextNode(before), strong);
}

function echo(query) {
  const img = $("echo-img");
  $("echo").hidden = false;
  $("echo-zs").hidden = query.kind !== "upload";
  $("echo-zs-results").replaceChildren();
  setError("echo-zs-error", "");
  if (query.kind === "text") {
    img.hidden = true;
    echoText("Results for ", "“" + query.q + "”");
  } else if (query.kind === "like") {
    img.hidden = false;
    img.alt = "the image these results are like";
    img.src = "/api/thumbs/" + query.id + "?size=256";
    echoText("More like ", "image " + query.id);
  } else {
    const file = state.uploads.get(query.upload);
    img.hidden = !file;
    img.alt = "your query image";
    if (file) img.src = URL.createObjectURL(file);
    echoText(query.target === "captions" ? "Best captions for " : "Images like ", file ? file.name || "your image" : "your image");
  }
}

// -- results -----------------------------------------------------------------------------------------------

function showImages(body, ms) {
  const rows = body.results;
  state.rows = rows;
  if (!rows.length) {
    setStatus("No images found. Try other words, or fewer filters.");
    return;
  }
  const dropped = body.dropped ? " · " + body.dropped + " near-duplicate" + (body.dropped === 1 ? "" : "s") + " hidden" : "";
  setStatus(rows.length + " image" + (rows.length === 1 ? "" : "s") + " in " + ms + " ms" + dropped);
  const template = $("card");
  const list = document.createDocumentFragment();
  rows.forEach((r, i) => {
    const card = template.content.firstElementChild.cloneNode(true);
    const img = card.querySelector("img");
    img.src = r.thumb;
    img.alt = r.captions.length ? r.captions[0] : r.name;
    img.width = 256;
    img.height = 256;
    img.loading = i < 12 ? "eager" : "lazy";
    img.addEventListener("error", () => {
      const box = card.querySelector(".thumb");
      box.classList.add("broken");
      box.dataset.msg = "Image not available (changed or removed since indexing?)";
    });
    card.querySelector(".rank").textContent = "#" + r.rank;
    card.querySelector(".score").textContent = r.score.toFixed(3);
    card.querySelector(".name").textContent = r.name;
    const more = r.captions.length > 1 ? " (+" + (r.captions.length - 1) + " more)" : "";
    card.querySelector(".caption").textContent = r.captions.length ? r.captions[0] + more : "";
    const open = card.querySelector(".open");
    open.setAttribute("aria-label", "#" + r.rank + ", " + r.name + ", score " + r.score.toFixed(3) + ": open the large view");
    open.addEventListener("click", () => openViewer(i, open));
    const like = card.querySelector(".like");
    like.setAttribute("aria-label", "More like " + r.name);
    like.addEventListener("click", () => moreLike(r.id));
    list.append(card);
  });
  $("results").append(list);
}

function showCaptions(rows, ms) {
  const body = $("caption-results").tBodies[0];
  setStatus(rows.length ? rows.length + " captions in " + ms + " ms" : "No captions found.");
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.className = "row";
    const rank = document.createElement("td"); rank.textContent = String(r.rank);
    const caption = document.createElement("td"); caption.className = "name"; caption.textContent = r.caption;
    const score = document.createElement("td"); score.className = "value"; score.textContent = r.score.toFixed(3);
    tr.append(rank, caption, score);
    body.append(tr);
  }
  $("caption-results").hidden = rows.length === 0;
}

function moreLike(id) {
  const opts = options();
  if (!opts) return;
  if ($("viewer").open) $("viewer").close();
  run({ kind: "like", id, k: opts.k, dedup: opts.dedup }, true);
  $("results").focus();
}

// -- zero-shot labels --------------------------------------------------------------------------------------

function showLabels(list, results) {
  list.replaceChildren();
  for (const r of results) {
    const li = document.createElement("li");
    const name = document.createElement("span"); name.className = "name"; name.textContent = r.label;
    const bar = document.createElement("span"); bar.className = "bar-fill";
    const fill = document.createElement("span"); fill.style.width = (100 * r.probability).toFixed(1) + "%";
    bar.append(fill);
    const value = document.createElement("span"); value.className = "value"; value.textContent = r.probability.toFixed(3);
    li.append(name, bar, value);
    list.append(li);
  }
}

async function classify(form, input, errorId, list, send) {
  setError(errorId, "");
  list.replaceChildren();
  const labels = input.value.trim();
  if (!labels) {
    setError(errorId, "Give one or more labels, separated by commas.");
    input.focus();
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  button.textContent = "Classifying…";
  try {
    const body = await send(labels);
    showLabels(list, body.results);
    $("v-labels").value = $("echo-labels").value = labels;
  } catch (e) {
    setError(errorId, e.message);
  } finally {
    button.disabled = false;
    button.textContent = "Classify";
  }
}

// -- the large view ----------------------------------------------------------------------------------------

function openViewer(i, opener) {
  const r = state.rows[i];
  if (!r) return;
  state.viewing = i;
  if (opener) state.opener = opener;
  $("v-img").src = r.preview;
  $("v-img").alt = r.captions.length ? r.captions[0] : r.name;
  $("v-rank").textContent = "#" + r.rank + " of " + state.rows.length + " · score " + r.score.toFixed(3);
  $("v-name").textContent = r.name;
  $("v-open").href = r.url;
  const caps = $("v-captions");
  caps.replaceChildren();
  for (const c of r.captions) {
    const li = document.createElement("li"); li.textContent = c; caps.append(li);
  }
  if (!r.captions.length) {
    const li = document.createElement("li"); li.className = "muted"; li.textContent = "No captions for this image.";
    caps.append(li);
  }
  $("v-prev").disabled = i === 0;
  $("v-next").disabled = i === state.rows.length - 1;
  $("v-zs-results").replaceChildren();
  setError("v-zs-error", "");
  if (!$("viewer").open) $("viewer").showModal();
  $("v-close").focus();
}

// -- images given by the user: picker, drop, paste ---------------------------------------------------------

function searchWithFile(file) {
  clearErrors();
  if (!file) return;
  const types = state.info ? state.info.upload_types : ["image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"];
  if (!types.includes(file.type)) {
    setError("q-error", "That file is not an image the server reads (" + types.join(", ") + "); got " + (file.type || "an unknown type") + ".");
    return;
  }
  const max = state.info ? state.info.max_upload_bytes : Infinity;
  if (file.size > max) {
    setError("q-error", "The image is larger than " + Math.floor(max / 1048576) + " MiB.");
    return;
  }
  const opts = options();
  if (!opts) return;
  const upload = state.nextUpload++;
  state.uploads.set(upload, file);
  run({ kind: "upload", upload, k: opts.k, dedup: opts.dedup, target: opts.target }, true);
}

// -- wiring ------------------------------------------------------------------------------------------------

$("search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  clearErrors();
  const q = $("q").value.trim();
  const opts = options();
  if (!opts) return;
  if (!q) {
    // an upload on screen with a changed option: run it again; otherwise the box must hold words
    if (state.query && state.query.kind !== "text" && state.query.upload !== undefined) {
      run({ ...state.query, k: opts.k, dedup: opts.dedup, target: opts.target }, true);
      return;
    }
    if (state.query && state.query.kind === "like") {
      run({ ...state.query, k: opts.k, dedup: opts.dedup }, true);
      return;
    }
    setError("q-error", "Type what to look for, or give an image (Image…, drop or paste).");
    $("q").focus();
    return;
  }
  run({ kind: "text", q, k: opts.k, dedup: opts.dedup }, true);
});

$("pick").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => {
  searchWithFile($("file").files[0]);
  $("file").value = "";
});
$("dedup-on").addEventListener("change", () => { $("dedup").disabled = !$("dedup-on").checked; });

let dragDepth = 0;
window.addEventListener("dragenter", (ev) => {
  if (ev.dataTransfer && Array.from(ev.dataTransfer.types).includes("Files")) { dragDepth++; $("drop").hidden = false; }
});
window.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) $("drop").hidden = true; });
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  const file = ev.dataTransfer && ev.dataTransfer.files[0];
  if (file) searchWithFile(file);
});
document.addEventListener("paste", (ev) => {
  const items = ev.clipboardData ? Array.from(ev.clipboardData.files) : [];
  const image = items.find((f) => f.type.startsWith("image/"));
  if (image) { ev.preventDefault(); searchWithFile(image); }
});
document.addEventListener("keydown", (ev) => {
  const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
  if (ev.key === "/" && !typing && !$("viewer").open) { ev.preventDefault(); $("q").focus(); $("q").select(); }
});

$("v-close").addEventListener("click", () => $("viewer").close());
$("viewer").addEventListener("close", () => { if (state.opener && document.contains(state.opener)) state.opener.focus(); });
$("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) $("viewer").close(); });
$("viewer").addEventListener("keydown", (ev) => {
  if (document.activeElement && document.activeElement.tagName === "INPUT") return;
  if (ev.key === "ArrowRight" && state.viewing < state.rows.length - 1) openViewer(state.viewing + 1);
  if (ev.key === "ArrowLeft" && state.viewing > 0) openViewer(state.viewing - 1);
});
$("v-prev").addEventListener("click", () => openViewer(state.viewing - 1));
$("v-next").addEventListener("click", () => openViewer(state.viewing + 1));
$("v-like").addEventListener("click", () => moreLike(state.rows[state.viewing].id));
$("v-zs").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = state.rows[state.viewing].id;
  classify($("v-zs"), $("v-labels"), "v-zs-error", $("v-zs-results"), (labels) =>
    api("/api/images/" + id + "/zeroshot?" + new URLSearchParams({ labels }).toString()));
});
$("echo-zs").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const file = state.query && state.uploads.get(state.query.upload);
  classify($("echo-zs"), $("echo-labels"), "echo-zs-error", $("echo-zs-results"), (labels) => {
    const form = new FormData();
    form.append("file", file);
    form.append("labels", labels);
    return api("/api/zeroshot", { method: "POST", body: form });
  });
});

window.addEventListener("popstate", (ev) => {
  const query = queryFromUrl(new URLSearchParams(location.search), ev.state);
  if ($("viewer").open) $("viewer").close();
  if (query) { run(query, false); return; }
  if (state.controller) state.controller.abort();
  state.query = null;
  clearErrors(); clearResults(); setStatus("");
  $("echo").hidden = true;
  showControls(null);
  showEmptyState(true);
});

for (const text of EXAMPLES) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", () => { $("q").value = text; $("search").requestSubmit(); });
  $("examples").append(b);
}

(async function start() {
  try {
    state.info = await api("/api/info");
    const i = state.info;
    const caps = i.images_with_captions ? ", " + i.images_with_captions.toLocaleString() + " with captions" : "";
    $("info").textContent = i.images.toLocaleString() + " images" + caps + " · " + (i.index.kind || "?") + " index";
    $("k").max = String(i.max_k);
    $("q").maxLength = i.max_query_chars;
  } catch (e) {
    $("info").textContent = "";
    setError("q-error", "Could not read the index: " + e.message);
  }
  const query = queryFromUrl(new URLSearchParams(location.search), history.state);
  if (query) run(query, false);
  else $("q").focus();
})();
