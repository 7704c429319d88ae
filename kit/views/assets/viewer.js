"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
// Taken from the page rather than spelled out, so the file holds no URL at all.
const SVG_NS = document.getElementById("lines-view").namespaceURI;
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
  [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34],
  [23, 190, 207]];
const ROW = 22, PAD = 10, GAP = 240, HEADER = 24;
// Lines this faint are invisible; skipping them keeps large views fast.
const MIN_WEIGHT = 0.005;
// Ends of the diverging scale (ColorBrewer's RdBu): less attention blue, more red.
const BLUE = [33, 102, 172], RED = [178, 24, 43];
const HINT = "Hover a query (left) or key (right) token to list its weights.";
const START = DATA.start;
const state = {
  view: START.view, example: 0, set: START.set, layer: START.layer, heads: [],
  pinned: null, threshold: 1, valueWeighted: false,
  neuronHead: START.head ?? 0, neuronQuery: START.query,
};
const byId = (id) => document.getElementById(id);

function headColor(n, alpha = 1) {
  if (n < PALETTE.length) return `rgba(${PALETTE[n].join(",")},${alpha})`;
  // Past the palette, golden-angle hues stay apart for any head count.
  return `hsla(${(n * 137.508) % 360},60%,45%,${alpha})`;
}

// Diverging colour of x in [-1, 1]: white at 0, blue below, red above.
function diverging(x) {
  const t = Math.min(1, Math.abs(x)), end = x < 0 ? BLUE : RED;
  return end.map((c) => Math.round(255 + (c - 255) * t));
}

function current() { return DATA.examples[state.example].sets[state.set]; }
function hasVectors(set) { return "query_vectors" in set; }

// The weights [N][T][S] of a layer as the head and model views draw them:
// value-weighted rows are α_ts·||f(x_s)|| normalized to sum 1.
function shownWeights(set, layer) {
  const W = set.weights[layer];
  if (!(state.valueWeighted && set.value_norms)) return W;
  return W.map((rows, n) => rows.map((row) => {
    const scaled = row.map((w, s) => w * set.value_norms[layer][n][s]);
    const sum = scaled.reduce((a, b) => a + b, 0);
    return scaled.map((x) => (sum > 0 ? x / sum : 0));
  }));
}

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

function element(tag, props = {}, children = []) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(el.dataset, value);
    else el[name] = value;
  }
  el.append(...children);
  return el;
}

// --------------------------------------------------------------------------
// Pickers shared by the views.

function setExample(index) {
  const previous = DATA.examples[state.example].sets[state.set];
  state.example = index;
  const sets = DATA.examples[index].sets;
  // Stay on the same attention set (e.g. "cross") when the new example has it.
  const same = previous ? sets.findIndex((s) => s.name === previous.name) : -1;
  state.set = same >= 0 ? same : 0;
  byId("example").value = String(index);
  fillSelect(byId("set"), sets.map((s) => s.name), state.set);
  const prediction = DATA.examples[index].prediction;
  byId("prediction").textContent = prediction === null ? "" : `prediction: ${prediction}`;
  setSet(state.set);
}

function setSet(index) {
  state.set = index;
  state.pinned = null;
  const set = current();
  const L = set.weights.length, N = set.weights[0].length, T = set.query_tokens.length;
  state.layer = Math.min(state.layer, L - 1);
  state.neuronHead = Math.min(state.neuronHead, N - 1);
  state.neuronQuery = Math.min(state.neuronQuery, T - 1);
  fillSelect(byId("layer"), set.weights.map((_, l) => `layer ${l}`), state.layer);
  fillSelect(byId("neuron-head"), set.weights[0].map((_, n) => `head ${n}`), state.neuronHead);
  fillSelect(byId("neuron-query"), set.query_tokens.map((t, i) => `${i}: ${t}`),
             state.neuronQuery);
  state.heads = Array.from({ length: N }, (_, n) => state.heads[n] ?? true);
  byId("heads").replaceChildren(...state.heads.map((on, n) => {
    const box = element("input", { type: "checkbox", className: "head-toggle", checked: on,
                                   dataset: { head: String(n) } });
    box.addEventListener("change", () => { state.heads[n] = box.checked; render(); });
    const swatch = element("span", { className: "swatch" });
    swatch.style.background = headColor(n);
    return element("label", { className: "head-label" }, [box, swatch, `head ${n}`]);
  }));
  byId("view").querySelector('option[value="neuron"]').disabled = !hasVectors(set);
  if (state.view === "neuron" && !hasVectors(set)) state.view = "head";
  render();
}

function setView(view) {
  state.view = view;
  if (view === "diff" && state.example !== DATA.compare.a) setExample(DATA.compare.a);
  else render();
}

function setAllHeads(on) {
  state.heads = state.heads.map(() => on);
  for (const box of document.querySelectorAll(".head-toggle")) box.checked = on;
  render();
}

function render() {
  byId("view").value = state.view;
  for (const section of document.querySelectorAll("section.view")) {
    section.hidden = section.id !== `${state.view}-view`;
  }
  const whole = state.view === "diff" || state.view === "patching";  // not one example
  byId("layer-label").hidden = state.view === "model" || whole;
  byId("example-label").hidden = DATA.examples.length < 2 || whole;
  byId("set-label").hidden = state.view === "patching";
  byId("prediction").hidden = whole;
  const weighted = current().value_norms && (state.view === "head" || state.view === "model");
  byId("value-weighted-label").hidden = !weighted;
  ({ head: drawHead, model: drawModel, neuron: drawNeuron, diff: drawDiff,
     patching: drawPatching })[state.view]();
}

// --------------------------------------------------------------------------
// Head view: lines between query and key tokens.

// Indices of the strongest weights whose running sum first reaches `share` of
// their total: sorted by weight (ties by index), an edge is kept while the
// weights before it sum to less than share x total. Zero weights carry no mass.
function strongest(weights, share) {
  const order = weights.map((_, i) => i).filter((i) => weights[i] > 0)
    .sort((a, b) => weights[b] - weights[a]);
  const total = order.reduce((sum, i) => sum + weights[i], 0);
  const kept = [];
  let before = 0;
  for (const i of order) {
    if (!(before < share * total)) break;
    kept.push(i);
    before += weights[i];
  }
  return kept;
}

function drawHead() {
  const set = current();
  const W = shownWeights(set, state.layer);
  const svg = byId("lines-view");
  svg.replaceChildren();
  const lines = svgElement("g", { id: "lines" });
  svg.append(lines);
  const columns = [["query", set.query_tokens], ["key", set.key_tokens]].map(([kind, tokens]) =>
    tokens.map((token, i) => {
      const text = svgElement("text", { class: `token ${kind}`, "data-index": i });
      text.textContent = token;
      text.addEventListener("mouseenter", () => { if (!state.pinned) focus(kind, i); });
      text.addEventListener("mouseleave", () => { if (!state.pinned) unfocus(); });
      text.addEventListener("click", () => pin(kind, i));
      svg.append(text);
      return text;
    }));
  // Column widths come from the text they hold: measured once the text is in the page,
  // and never under its length in 14px monospace characters (bold ones included),
  // which holds where the page is laid out before it shows (an iframe in a notebook
  // that measures 0, or a narrower fallback font).
  const TOKEN_CHAR = 9;
  const width = (texts) => Math.max(40, ...texts.map((t) =>
    Math.max(t.getComputedTextLength(), TOKEN_CHAR * t.textContent.length)));
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
  const line = (n, t, s, w, opacity) => lines.append(svgElement("line", {
    class: "attn", x1, y1: y(t), x2, y2: y(s), stroke: headColor(n),
    "stroke-opacity": opacity, "stroke-width": 1 + 3 * opacity, "data-head": n,
    "data-query": t, "data-key": s, "data-weight": w,
  }));
  const pinned = state.pinned;
  state.heads.forEach((on, n) => {
    if (!on) return;
    if (!pinned) {
      W[n].forEach((row, t) => row.forEach((w, s) => { if (w >= MIN_WEIGHT) line(n, t, s, w, w); }));
      return;
    }
    // Pinned: only the token's strongest edges, drawn however faint.
    const from = pinned.kind === "query";
    const weights = from ? W[n][pinned.index] : W[n].map((row) => row[pinned.index]);
    const total = weights.reduce((a, b) => a + b, 0);
    for (const j of strongest(weights, state.threshold)) {
      const [t, s] = from ? [pinned.index, j] : [j, pinned.index];
      line(n, t, s, weights[j], from ? weights[j] : weights[j] / total);
    }
  });
  const rows = Math.max(set.query_tokens.length, set.key_tokens.length);
  svg.setAttribute("width", x3 + kWidth + PAD);
  svg.setAttribute("height", 2 * PAD + HEADER + ROW * rows);
  if (pinned) {
    columns[pinned.kind === "query" ? 0 : 1][pinned.index].classList.add("active", "pinned");
    showWeights(pinned.kind, pinned.index);
  } else {
    showHint();
  }
}

function pin(kind, index) {
  const same = state.pinned && state.pinned.kind === kind && state.pinned.index === index;
  state.pinned = same ? null : { kind, index };
  drawHead();
}

function focus(kind, index) {
  const attr = kind === "query" ? "query" : "key";
  for (const line of document.querySelectorAll("#lines .attn")) {
    line.classList.toggle("faded", line.dataset[attr] !== String(index));
  }
  for (const token of document.querySelectorAll(`#lines-view .token.${kind}`)) {
    token.classList.toggle("active", token.dataset.index === String(index));
  }
  showWeights(kind, index);
}

function unfocus() {
  for (const el of document.querySelectorAll("#lines-view .faded, #lines-view .active")) {
    el.classList.remove("faded", "active");
  }
  showHint();
}

function showHint() {
  byId("weights").replaceChildren(element("p", { className: "hint", textContent: HINT }));
}

function showWeights(kind, index) {
  const set = current();
  const W = shownWeights(set, state.layer);
  const isQuery = kind === "query";
  const own = isQuery ? set.query_tokens : set.key_tokens;
  const other = isQuery ? set.key_tokens : set.query_tokens;
  const heads = state.heads.flatMap((on, n) => (on ? [n] : []));
  const table = element("table", { id: "weights-table", dataset: { kind, index: String(index) } });
  table.createCaption().textContent = isQuery
    ? `query ${index} "${own[index]}" attends to`
    : `key ${index} "${own[index]}" is attended by`;
  const head = table.createTHead().insertRow();
  head.append(element("th", { textContent: isQuery ? "key" : "query" }));
  for (const n of heads) {
    const th = element("th", { textContent: `head ${n}` });
    th.style.color = headColor(n);
    head.append(th);
  }
  const body = table.createTBody();
  other.forEach((token, j) => {
    const row = body.insertRow();
    row.dataset.index = String(j);
    row.append(element("th", { className: "tok", textContent: token }));
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

// --------------------------------------------------------------------------
// Model view: a thumbnail heatmap per layer and head.

function heatmap(canvas, rows, color, cell) {
  canvas.width = rows[0].length * cell;
  canvas.height = rows.length * cell;
  const ctx = canvas.getContext("2d");
  rows.forEach((row, t) => row.forEach((value, s) => {
    ctx.fillStyle = color(value);
    ctx.fillRect(s * cell, t * cell, cell, cell);
  }));
}

function drawModel() {
  const set = current();
  const L = set.weights.length, N = set.weights[0].length;
  const T = set.query_tokens.length, S = set.key_tokens.length;
  const cell = Math.max(2, Math.floor(96 / Math.max(T, S)));
  const grid = byId("model-grid");
  grid.className = "grid";
  grid.style.gridTemplateColumns = `auto repeat(${N}, auto)`;
  const children = [element("span")];
  for (let n = 0; n < N; n++) {
    const title = element("span", { className: "col-title", textContent: `head ${n}` });
    title.style.color = headColor(n);
    children.push(title);
  }
  for (let l = 0; l < L; l++) {
    const W = shownWeights(set, l);
    children.push(element("span", { className: "row-title", textContent: `layer ${l}` }));
    for (let n = 0; n < N; n++) {
      const canvas = element("canvas", {
        className: "thumb", title: `layer ${l}, head ${n}`,
        dataset: { layer: String(l), head: String(n) },
      });
      heatmap(canvas, W[n], (w) => `rgb(${[0, 1, 2].map((i) => Math.round(
        255 - (255 - (PALETTE[n % PALETTE.length][i])) * Math.min(1, w))).join(",")})`, cell);
      canvas.addEventListener("click", () => openHead(l, n));
      children.push(canvas);
    }
  }
  grid.replaceChildren(...children);
}

function openHead(layer, head) {
  state.layer = layer;
  byId("layer").value = String(layer);
  state.heads = state.heads.map((_, n) => n === head);
  for (const box of document.querySelectorAll(".head-toggle")) {
    box.checked = box.dataset.head === String(head);
  }
  state.pinned = null;
  state.view = "head";
  render();
}

// --------------------------------------------------------------------------
// Neuron view: how one query's weights arise from the vectors.

// Everything the neuron view shows, in double precision, for query t of head n.
function neuronNumbers(set, l, n, t) {
  const q = set.query_vectors[l][n][t];
  const scale = 1 / Math.sqrt(q.length);
  const keys = set.key_tokens.map((token, s) => {
    const k = set.key_vectors[l][n][s];
    const product = q.map((x, i) => x * k[i]);
    const dot = product.reduce((a, b) => a + b, 0);
    const scaled = dot * scale;
    const bias = set.bias ? set.bias[l][n][t][s] : 0;
    return { s, token, k, product, dot, scaled, bias, logit: scaled + bias,
             masked: set.causal && s > t, weight: 0 };
  });
  const live = keys.filter((key) => !key.masked);
  const max = Math.max(...live.map((key) => key.logit));
  const sum = live.reduce((a, key) => a + Math.exp(key.logit - max), 0);
  for (const key of live) key.weight = Math.exp(key.logit - max) / sum;
  const H = set.value_vectors[l][n][0].length;
  const output = Array.from({ length: H }, (_, i) =>
    keys.reduce((a, key) => a + key.weight * set.value_vectors[l][n][key.s][i], 0));
  return { q, scale, keys, output };
}

// A vector as a strip of cells coloured by value/limit; the full values in data-values.
function vectorCells(values, limit, className) {
  const strip = element("span", { className: `vector ${className}`,
                                  dataset: { values: JSON.stringify(values) } });
  for (const x of values) {
    const cell = element("span", { title: x.toFixed(4) });
    cell.style.background = `rgb(${diverging(limit > 0 ? x / limit : 0).join(",")})`;
    strip.append(cell);
  }
  return strip;
}

function drawNeuron() {
  const set = current();
  const l = state.layer, n = state.neuronHead, t = state.neuronQuery;
  const { q, scale, keys, output } = neuronNumbers(set, l, n, t);
  const absMax = (vectors) => Math.max(0, ...vectors.flat().map(Math.abs));
  const kLimit = absMax([q, ...keys.map((key) => key.k)]);
  const pLimit = absMax(keys.map((key) => key.product));
  const vLimit = absMax(set.value_vectors[l][n]);
  const table = element("table", { id: "neuron-table", dataset: {
    layer: String(l), head: String(n), query: String(t), scale: String(scale) } });
  table.createCaption().textContent =
    `layer ${l}, head ${n}: query ${t} "${set.query_tokens[t]}"` +
    (set.causal ? " (causal: keys after it are masked)" : "");
  const qRow = table.createTHead().insertRow();
  qRow.append(element("th", { textContent: "query q" }),
              element("td", {}, [vectorCells(q, kLimit, "query-vector")]));
  const head = table.createTHead().insertRow();
  const columns = ["key", "key k", "q ⊙ k", "q · k", "× 1/√H",
    ...(set.bias ? ["+ bias"] : []), "softmax", "model", "value v"];
  head.append(...columns.map((c) => element("th", { textContent: c })));
  const body = table.createTBody();
  const number = (x, className) => element("td", { className: `step ${className}`,
                                                   textContent: x.toFixed(4) });
  for (const key of keys) {
    const row = body.insertRow();
    row.className = key.masked ? "neuron-key masked" : "neuron-key";
    Object.assign(row.dataset, {
      key: String(key.s), masked: String(key.masked), product: JSON.stringify(key.product),
      dot: String(key.dot), scaled: String(key.scaled), logit: String(key.logit),
      weight: String(key.weight),
    });
    row.append(element("th", { className: "tok", textContent: key.token }),
               element("td", {}, [vectorCells(key.k, kLimit, "key-vector")]),
               element("td", {}, [vectorCells(key.product, pLimit, "product")]),
               number(key.dot, "dot"), number(key.scaled, "scaled"));
    if (set.bias) row.append(number(key.bias, "bias"));
    if (key.masked) row.append(element("td", { className: "step softmax", textContent: "masked" }));
    else row.append(number(key.weight, "softmax"));
    row.append(number(set.weights[l][n][t][key.s], "model"),
               element("td", {}, [vectorCells(set.value_vectors[l][n][key.s], vLimit, "value")]));
  }
  const foot = table.createTFoot().insertRow();
  foot.append(element("th", { textContent: "output Σ α v", colSpan: columns.length - 1 }));
  const cell = element("td", { id: "neuron-output", dataset: { values: JSON.stringify(output) } },
                       [vectorCells(output, vLimit, "output")]);
  foot.append(cell);
  byId("neuron").replaceChildren(table);
}

// --------------------------------------------------------------------------
// Diff view: b - a for every layer and head, on a diverging scale.

function drawDiff() {
  const { a, b } = DATA.compare;
  const setA = current();
  const setB = DATA.examples[b].sets.find((s) => s.name === setA.name);
  const predictions = [a, b].map((i, j) => {
    const ex = DATA.examples[i];
    const said = ex.prediction === null ? "" : ` → ${ex.prediction}`;
    return element("p", { className: `diff-prediction ${j ? "b" : "a"}`,
                          textContent: `${j ? "b" : "a"}: ${ex.name}${said}` });
  });
  byId("diff-predictions").replaceChildren(...predictions);
  const grid = byId("diff-grid");
  const aligned = setB && setB.weights.length === setA.weights.length &&
    setB.weights[0].length === setA.weights[0].length &&
    setB.query_tokens.length === setA.query_tokens.length &&
    setB.key_tokens.length === setA.key_tokens.length;
  if (!aligned) {
    const why = setB ? "has another shape in b (another output length)" : "is not in b";
    grid.replaceChildren(element("p", { className: "diff-missing",
                                        textContent: `"${setA.name}" ${why}` }));
    byId("diff-scale").replaceChildren();
    return;
  }
  const diff = setA.weights.map((heads, l) => heads.map((rows, n) => rows.map((row, t) =>
    row.map((w, s) => setB.weights[l][n][t][s] - w))));
  const limit = Math.max(...diff.flat(3).map(Math.abs)) || 1;
  const tokens = (x, y) => x.map((tok, i) => (tok === y[i] ? tok : `${tok}→${y[i]}`));
  const queries = tokens(setA.query_tokens, setB.query_tokens);
  const keysShown = tokens(setA.key_tokens, setB.key_tokens);
  const L = diff.length, N = diff[0].length, T = queries.length, S = keysShown.length;
  const cell = Math.max(3, Math.floor(160 / Math.max(T, S)));
  const color = (d) => `rgb(${diverging(d / limit).join(",")})`;
  const scale = element("canvas", { id: "diff-colorbar", dataset: { limit: String(limit) } });
  heatmap(scale, Array.from({ length: 6 }, () => Array.from({ length: 101 },
    (_, i) => limit * (i / 50 - 1))), color, 2);
  byId("diff-scale").replaceChildren(element("span", { textContent: `−${limit.toFixed(4)} ` }),
    scale, element("span", { textContent: ` +${limit.toFixed(4)}` }));
  grid.className = "grid";
  grid.style.gridTemplateColumns = `auto repeat(${N}, auto)`;
  const children = [element("span")];
  for (let n = 0; n < N; n++) {
    children.push(element("span", { className: "col-title", textContent: `head ${n}` }));
  }
  for (let l = 0; l < L; l++) {
    children.push(element("span", { className: "row-title", textContent: `layer ${l}` }));
    for (let n = 0; n < N; n++) {
      const canvas = element("canvas", { className: "diff-cell", dataset: {
        layer: String(l), head: String(n), cell: String(cell),
        values: JSON.stringify(diff[l][n]) } });
      heatmap(canvas, diff[l][n], color, cell);
      canvas.addEventListener("mousemove", (e) => {
        const box = canvas.getBoundingClientRect();
        const t = Math.min(T - 1, Math.floor((e.clientY - box.top) / cell));
        const s = Math.min(S - 1, Math.floor((e.clientX - box.left) / cell));
        byId("diff-readout").textContent = `layer ${l}, head ${n}: ${queries[t]} → ` +
          `${keysShown[s]}: a ${setA.weights[l][n][t][s].toFixed(4)}, ` +
          `b ${setB.weights[l][n][t][s].toFixed(4)}, b − a ${diff[l][n][t][s].toFixed(4)}`;
      });
      children.push(canvas);
    }
  }
  grid.replaceChildren(...children);
}

// --------------------------------------------------------------------------
// Patching view: the share of the clean answer that patching each head's output,
// and the residual stream at each position, brings back into the corrupted run;
// activation patching beside attribution patching's one-backward-pass estimate.

function drawPatching() {
  const P = DATA.patching;
  byId("patching-summary").textContent = `answer at position ${P.position} ` +
    `(${P.clean_tokens[P.position]}): "${P.right}" (clean) vs "${P.wrong}" (corrupted); ` +
    `logit difference ${P.clean.toFixed(3)} clean, ${P.corrupt.toFixed(3)} corrupted. ` +
    "1 = the whole clean answer comes back, 0 = nothing.";
  const tokens = P.clean_tokens.map((t, i) => (t === P.corrupt_tokens[i] ? t
    : `${t}/${P.corrupt_tokens[i]}`));
  const heads = P.heads[0].map((_, n) => `head ${n}`);
  const panels = [
    ["heads", "heads: activation patching", P.head_points, heads],
    ["heads_attribution", "heads: attribution patching", P.head_points, heads],
    ["positions", "residual stream: activation patching", P.position_points, tokens],
    ["positions_attribution", "residual stream: attribution patching", P.position_points,
     tokens],
  ];
  const limit = Math.max(1, ...panels.flatMap(([field]) => P[field].flat().map(Math.abs)));
  const color = (x) => `rgb(${diverging(x / limit).join(",")})`;
  const cell = Math.max(14, Math.min(36, Math.floor(480 / tokens.length)));
  byId("patching-panels").replaceChildren(...panels.map(([field, title, rows, columns]) => {
    const values = P[field];
    const canvas = element("canvas", { className: "patching-cell",
                                       dataset: { field, cell: String(cell) } });
    heatmap(canvas, values, color, cell);
    canvas.addEventListener("mousemove", (e) => {
      const box = canvas.getBoundingClientRect();
      const r = Math.min(rows.length - 1, Math.floor((e.clientY - box.top) / cell));
      const c = Math.min(columns.length - 1, Math.floor((e.clientX - box.left) / cell));
      const base = field.replace("_attribution", "");
      byId("patching-readout").textContent = `${rows[r]}, ${columns[c]}: activation ` +
        `patching ${P[base][r][c].toFixed(3)}, attribution ` +
        `${P[`${base}_attribution`][r][c].toFixed(3)}`;
    });
    const labels = element("div", { className: "patching-rows" },
      rows.map((name) => element("span", { textContent: name })));
    labels.style.gridTemplateRows = `repeat(${rows.length}, ${cell}px)`;
    const cols = element("div", { className: "patching-columns" },
      columns.map((name) => element("span", { className: "tok", textContent: name })));
    cols.style.gridTemplateColumns = `repeat(${columns.length}, ${cell}px)`;
    return element("figure", { className: "patching-panel" }, [
      element("figcaption", { textContent: title }),
      element("div", { className: "patching-body" }, [labels, canvas, element("span"), cols]),
    ]);
  }));
  const scale = element("canvas", { id: "patching-colorbar" });
  heatmap(scale, Array.from({ length: 6 }, () => Array.from({ length: 101 },
    (_, i) => limit * (i / 50 - 1))), color, 2);
  byId("patching-scale").replaceChildren(element("span", { textContent: `−${limit.toFixed(2)} ` }),
    scale, element("span", { textContent: ` +${limit.toFixed(2)}` }));
}

// --------------------------------------------------------------------------

byId("view").addEventListener("change", (e) => setView(e.target.value));
byId("example").addEventListener("change", (e) => setExample(Number(e.target.value)));
byId("set").addEventListener("change", (e) => setSet(Number(e.target.value)));
byId("layer").addEventListener("change", (e) => {
  state.layer = Number(e.target.value);
  render();
});
byId("heads-all").addEventListener("click", () => setAllHeads(true));
byId("heads-none").addEventListener("click", () => setAllHeads(false));
byId("threshold").addEventListener("input", (e) => {
  state.threshold = Number(e.target.value);
  byId("threshold-value").textContent = state.threshold.toFixed(2);
  render();
});
byId("value-weighted").addEventListener("change", (e) => {
  state.valueWeighted = e.target.checked;
  render();
});
byId("neuron-head").addEventListener("change", (e) => {
  state.neuronHead = Number(e.target.value);
  render();
});
byId("neuron-query").addEventListener("change", (e) => {
  state.neuronQuery = Number(e.target.value);
  render();
});
for (const [view, given] of [["diff", DATA.compare], ["patching", DATA.patching]]) {
  byId("view").querySelector(`option[value="${view}"]`).hidden = !given;
  byId("view").querySelector(`option[value="${view}"]`).disabled = !given;
}
fillSelect(byId("example"), DATA.examples.map((e) => e.name), 0);
if (START.head !== null) {
  const N = DATA.examples[0].sets[START.set].weights[0].length;
  state.heads = Array.from({ length: N }, (_, n) => n === START.head);
}
setExample(state.view === "diff" ? DATA.compare.a : 0);
