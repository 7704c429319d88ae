"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
// Taken from the page rather than spelled out, so the file holds no URL at all.
const SVG_NS = document.getElementById("view").namespaceURI;
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
  [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34],
  [23, 190, 207]];
const ROW = 22, PAD = 10, GAP = 240, HEADER = 24;
// Lines this faint are invisible; skipping them keeps large views fast.
const MIN_WEIGHT = 0.005;
const HINT = "Hover a query (left) or key (right) token to list its weights.";
const state = { example: 0, set: 0, layer: 0, heads: [] };
const byId = (id) => document.getElementById(id);

function headColor(n, alpha = 1) {
  if (n < PALETTE.length) return `rgba(${PALETTE[n].join(",")},${alpha})`;
  // Past the palette, golden-angle hues stay apart for any head count.
  return `hsla(${(n * 137.508) % 360},60%,45%,${alpha})`;
}

function current() { return DATA.examples[state.example].sets[state.set]; }

function fillSelect(select, labels, selected) {
  select.replaceChildren(...labels.map((label, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = label;
    return option;
  }));
  select.value = String(selected);
}

function svgElement(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  return el;
}

function setExample(index) {
  const previous = DATA.examples[state.example].sets[state.set];
  state.example = index;
  const sets = DATA.examples[index].sets;
  // Stay on the same attention set (e.g. "cross") when the new example has it.
  const same = previous ? sets.findIndex((s) => s.name === previous.name) : -1;
  state.set = same >= 0 ? same : 0;
  fillSelect(byId("set"), sets.map((s) => s.name), state.set);
  setSet(state.set);
}

function setSet(index) {
  state.set = index;
  const set = current();
  const L = set.weights.length, N = set.weights[0].length;
  state.layer = Math.min(state.layer, L - 1);
  fillSelect(byId("layer"), set.weights.map((_, l) => `layer ${l}`), state.layer);
  state.heads = Array.from({ length: N }, (_, n) => state.heads[n] ?? true);
  const heads = byId("heads");
  heads.replaceChildren(...state.heads.map((on, n) => {
    const label = document.createElement("label");
    label.className = "head-label";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "head-toggle";
    box.dataset.head = String(n);
    box.checked = on;
    box.addEventListener("change", () => { state.heads[n] = box.checked; draw(); });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = headColor(n);
    label.append(box, swatch, document.createTextNode(`head ${n}`));
    return label;
  }));
  draw();
}

function setAllHeads(on) {
  state.heads = state.heads.map(() => on);
  for (const box of document.querySelectorAll(".head-toggle")) box.checked = on;
  draw();
}

function draw() {
  const set = current();
  const W = set.weights[state.layer];
  const svg = byId("view");
  svg.replaceChildren();
  const lines = svgElement("g", { id: "lines" });
  svg.append(lines);
  const columns = [["query", set.query_tokens], ["key", set.key_tokens]].map(([kind, tokens]) =>
    tokens.map((token, i) => {
      const text = svgElement("text", { class: `token ${kind}`, "data-index": i });
      text.textContent = token;
      text.addEventListener("mouseenter", () => focus(kind, i));
      text.addEventListener("mouseleave", unfocus);
      svg.append(text);
      return text;
    }));
  // Column widths are measured after the text is in the page, so any font fits.
  const width = (texts) => Math.max(40, ...texts.map((t) => t.getComputedTextLength()));
  const [qWidth, kWidth] = columns.map(width);
  const x0 = PAD + qWidth, x1 = x0 + 8, x2 = x1 + GAP, x3 = x2 + 8;
  const y = (i) => PAD + HEADER + ROW * (i + 0.5);
  columns[0].forEach((t, i) => { t.setAttribute("x", x0); t.setAttribute("y", y(i)); });
  columns[0].forEach((t) => t.setAttribute("text-anchor", "end"));
  columns[1].forEach((t, i) => { t.setAttribute("x", x3); t.setAttribute("y", y(i)); });
  const titles = [["queries", x0, "end"], ["keys", x3, "start"]];
  for (const [label, x, anchor] of titles) {
    const text = svgElement("text", { class: "column-title", x, y: PAD + HEADER / 2,
                                      "text-anchor": anchor });
    text.textContent = label;
    svg.append(text);
  }
  state.heads.forEach((on, n) => {
    if (!on) return;
    W[n].forEach((row, t) => row.forEach((w, s) => {
      if (w < MIN_WEIGHT) return;
      lines.append(svgElement("line", {
        class: "attn", x1, y1: y(t), x2, y2: y(s), stroke: headColor(n),
        "stroke-opacity": w, "stroke-width": 1 + 3 * w, "data-head": n, "data-query": t,
        "data-key": s, "data-weight": w,
      }));
    }));
  });
  const rows = Math.max(set.query_tokens.length, set.key_tokens.length);
  svg.setAttribute("width", x3 + kWidth + PAD);
  svg.setAttribute("height", 2 * PAD + HEADER + ROW * rows);
  showHint();
}

function focus(kind, index) {
  const attr = kind === "query" ? "query" : "key";
  for (const line of document.querySelectorAll("#lines .attn")) {
    line.classList.toggle("faded", line.dataset[attr] !== String(index));
  }
  for (const token of document.querySelectorAll(`#view .token.${kind}`)) {
    token.classList.toggle("active", token.dataset.index === String(index));
  }
  showWeights(kind, index);
}

function unfocus() {
  for (const el of document.querySelectorAll("#view .faded, #view .active")) {
    el.classList.remove("faded", "active");
  }
  showHint();
}

function showHint() {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = HINT;
  byId("weights").replaceChildren(p);
}

function showWeights(kind, index) {
  const set = current();
  const W = set.weights[state.layer];
  const isQuery = kind === "query";
  const own = isQuery ? set.query_tokens : set.key_tokens;
  const other = isQuery ? set.key_tokens : set.query_tokens;
  const heads = state.heads.flatMap((on, n) => (on ? [n] : []));
  const table = document.createElement("table");
  table.id = "weights-table";
  table.dataset.kind = kind;
  table.dataset.index = String(index);
  const caption = table.createCaption();
  caption.textContent = isQuery
    ? `query ${index} "${own[index]}" attends to`
    : `key ${index} "${own[index]}" is attended by`;
  const head = table.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.textContent = isQuery ? "key" : "query";
  head.append(corner);
  for (const n of heads) {
    const th = document.createElement("th");
    th.textContent = `head ${n}`;
    th.style.color = headColor(n);
    head.append(th);
  }
  const body = table.createTBody();
  other.forEach((token, j) => {
    const row = body.insertRow();
    row.dataset.index = String(j);
    const th = document.createElement("th");
    th.className = "tok";
    th.textContent = token;
    row.append(th);
    for (const n of heads) {
      const w = isQuery ? W[n][index][j] : W[n][j][index];
      const td = row.insertCell();
      td.dataset.head = String(n);
      td.textContent = w.toFixed(4);
      td.style.background = headColor(n, 0.6 * w);
    }
  });
  byId("weights").replaceChildren(table);
}

byId("example").addEventListener("change", (e) => setExample(Number(e.target.value)));
byId("set").addEventListener("change", (e) => setSet(Number(e.target.value)));
byId("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
byId("heads-all").addEventListener("click", () => setAllHeads(true));
byId("heads-none").addEventListener("click", () => setAllHeads(false));
fillSelect(byId("example"), DATA.examples.map((e) => e.name), 0);
byId("example-label").hidden = DATA.examples.length < 2;
setExample(0);
