"""The one plain page of ``clipcraft serve``: text search, image search (images or captions), zero-shot.

Kept as a Python string so it ships inside the package with no data-file configuration. Results are put into
the page with ``textContent`` and element properties, never ``innerHTML``, so names and captions cannot inject
markup.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>clipcraft search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 70rem; }
  section { border: 1px solid #ccc; border-radius: 6px; padding: 0.8rem 1rem; margin-bottom: 1rem; }
  h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 0; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.6rem; }
  figure { margin: 0; } figure img { width: 100%; height: 140px; object-fit: cover; border-radius: 4px; }
  figcaption { font-size: 0.8rem; overflow-wrap: anywhere; }
  .error { color: #b00020; } table { border-collapse: collapse; } td { padding: 0.15rem 0.6rem; }
</style>
</head>
<body>
<h1>clipcraft search</h1>
<p id="info"></p>
<p id="error" class="error" role="alert"></p>

<section>
  <h2>Search by text</h2>
  <form id="text-form">
    <input id="q" name="q" size="50" maxlength="500" placeholder="a dog on the grass" required>
    <label>k <input id="k" name="k" type="number" min="1" max="100" value="12"></label>
    <button id="text-go" type="submit">Search</button>
  </form>
</section>

<section>
  <h2>Search by image</h2>
  <form id="image-form">
    <input id="image-file" name="file" type="file" accept="image/*" required>
    <select id="target" name="target">
      <option value="images">similar images</option>
      <option value="captions">best captions</option>
    </select>
    <button id="image-go" type="submit">Search</button>
  </form>
</section>

<section>
  <h2>Results</h2>
  <div id="results" class="grid"></div>
  <table id="caption-results"></table>
</section>

<section>
  <h2>Zero-shot classification</h2>
  <form id="zs-form">
    <input id="labels" name="labels" size="50" placeholder="dog, cat, car" required>
    <input id="zs-file" name="file" type="file" accept="image/*" required>
    <button id="zs-go" type="submit">Classify</button>
  </form>
  <table id="zs-results"></table>
</section>

<script>
const $ = (id) => document.getElementById(id);
function showError(msg) { $("error").textContent = msg || ""; }
async function call(url, options) {
  showError("");
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) { throw new Error((body && body.detail) || ("HTTP " + r.status)); }
  return body;
}
function clearResults() { $("results").replaceChildren(); $("caption-results").replaceChildren(); }
function showImages(rows) {
  clearResults();
  for (const r of rows) {
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = r.url; img.alt = r.name; img.loading = "eager";
    const cap = document.createElement("figcaption");
    cap.textContent = "#" + r.rank + "  " + r.score.toFixed(3) + "  " + r.name;
    fig.append(img, cap);
    $("results").append(fig);
  }
}
function showTable(table, rows, key, value) {
  table.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.className = "row";
    const a = document.createElement("td"); a.className = "name"; a.textContent = r[key];
    const b = document.createElement("td"); b.className = "value"; b.textContent = Number(r[value]).toFixed(3);
    tr.append(a, b);
    table.append(tr);
  }
}
$("text-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const p = new URLSearchParams({ q: $("q").value, k: $("k").value });
    const body = await call("/api/search/text?" + p.toString());
    showImages(body.results);
  } catch (e) { showError(e.message); }
});
$("image-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const fd = new FormData();
    fd.append("file", $("image-file").files[0]);
    fd.append("k", $("k").value);
    fd.append("target", $("target").value);
    const body = await call("/api/search/image", { method: "POST", body: fd });
    if (body.target === "captions") { clearResults(); showTable($("caption-results"), body.results, "caption", "score"); }
    else { showImages(body.results); }
  } catch (e) { showError(e.message); }
});
$("zs-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const fd = new FormData();
    fd.append("file", $("zs-file").files[0]);
    fd.append("labels", $("labels").value);
    const body = await call("/api/zeroshot", { method: "POST", body: fd });
    showTable($("zs-results"), body.results, "label", "probability");
  } catch (e) { showError(e.message); }
});
call("/api/info").then((i) => {
  $("info").textContent = i.images + " images, " + i.captions + " captions, " + i.index.kind + " index";
}).catch((e) => showError(e.message));
</script>
</body>
</html>
"""
