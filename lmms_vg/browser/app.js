"use strict";
(function () {
  const D = window.LMMS_VG_DATA;
  const $ = (id) => document.getElementById(id);
  const items = D.items.map((r, i) => ({ i, task: r[0], doc: r[1], question: r[2], category: r[3], image: r[4], missing: r[5], outcomes: r[6] }));
  const PAGE = 40;
  const chunks = {};
  const waiting = {};
  const images = {};
  let shown = [];
  let rendered = 0;

  // ---------------------------------------------------------------- lazily loaded data and images (by <script> and <img>: no fetch)
  window.LMMS_VG_CHUNK = function (n, data) {
    chunks[n] = data;
    (waiting[n] || []).forEach((f) => f());
    delete waiting[n];
  };
  function detail(i, then) {
    const n = Math.floor(i / D.chunk);
    if (chunks[n]) return then(chunks[n][i] || {});
    if (!waiting[n]) {
      waiting[n] = [];
      const s = document.createElement("script");
      s.src = "chunks/c" + String(n).padStart(5, "0") + ".js";
      document.body.appendChild(s);
    }
    waiting[n].push(() => then(chunks[n][i] || {}));
  }
  function image(src, then) {
    if (!images[src]) {
      const img = new Image();
      images[src] = { img, ready: false, queue: [] };
      img.onload = () => {
        images[src].ready = true;
        images[src].queue.forEach((f) => f(img));
      };
      img.src = src;
    }
    const found = images[src];
    if (found.ready) then(found.img);
    else found.queue.push(then);
  }

  // ---------------------------------------------------------------- controls and their state in the address (#?task=...&a=...)
  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    select.appendChild(o);
  }
  option($("task"), "", "every task");
  D.tasks.forEach((t, k) => option($("task"), String(k), t));
  option($("category"), "", "every category");
  [...new Set(items.map((it) => it.category).filter(Boolean))].sort().forEach((c) => option($("category"), c, c));
  option($("runs"), "", "every run");
  D.runs.forEach((r, k) => {
    option($("runs"), String(k), r.label);
    option($("run-a"), String(k), r.label);
    option($("run-b"), String(k), r.label);
  });
  const firstMethod = D.runs.findIndex((r) => r.method !== "baseline");
  const firstBaseline = D.runs.findIndex((r) => r.method === "baseline");
  $("run-a").value = String(Math.max(firstBaseline, 0));
  $("run-b").value = String(firstMethod >= 0 ? firstMethod : Math.min(1, D.runs.length - 1));
  $("notes").textContent = (D.notes || []).join(" · ");
  const FIELDS = { task: "task", category: "category", runs: "runs", a: "run-a", b: "run-b", outcome: "outcome", sort: "sort", q: "search" };

  function readAddress() {
    const raw = location.hash.slice(1);
    if (raw.startsWith("?")) {
      const params = new URLSearchParams(raw.slice(1));  // it decodes %2B to "+" (a bare "+" reads as a space)
      for (const [key, id] of Object.entries(FIELDS)) {
        if (!params.has(key)) continue;
        let value = params.get(key);
        if (key === "task" && value && !/^\d+$/.test(value)) value = String(D.tasks.indexOf(value));
        if ((key === "a" || key === "b" || key === "runs") && value && !/^\d+$/.test(value)) value = String(D.runs.findIndex((r) => r.label === value));
        $(id).value = value;
      }
      return null;
    }
    const hash = decodeURIComponent(raw);
    const slash = hash.lastIndexOf("/");
    return slash > 0 ? { task: hash.slice(0, slash), doc: Number(hash.slice(slash + 1)) } : null;
  }

  // ---------------------------------------------------------------- filters and sorting
  function correct(it, run) {
    const o = it.outcomes[run];
    return o && typeof o.correct === "boolean" ? o.correct : null;
  }
  function passes(it, f) {
    if (f.task !== "" && it.task !== Number(f.task)) return false;
    if (f.category !== "" && it.category !== f.category) return false;
    if (f.runs !== "" && !it.outcomes[f.runs]) return false;
    if (f.q && !it.question.toLowerCase().includes(f.q)) return false;
    if (f.outcome === "all") return true;
    const a = correct(it, f.a), b = correct(it, f.b);
    if (f.outcome === "gained") return a === false && b === true;
    if (f.outcome === "lost") return a === true && b === false;
    const known = Object.keys(it.outcomes).map((k) => correct(it, k)).filter((c) => c !== null);
    if (!known.length) return false;
    return f.outcome === "all-wrong" ? known.every((c) => c === false) : known.every((c) => c === true);
  }
  function filters() {
    return {
      task: $("task").value, category: $("category").value, runs: $("runs").value, a: $("run-a").value, b: $("run-b").value,
      outcome: $("outcome").value, sort: $("sort").value, q: $("search").value.trim().toLowerCase(),
    };
  }
  function metric(it, run, name) {
    const o = it.outcomes[run];
    return o && typeof o[name] === "number" && isFinite(o[name]) ? o[name] : null;
  }
  function sortKey(f) {
    if (f.sort === "kl") return (it) => -(metric(it, f.a, "kl") ?? -Infinity);
    if (f.sort === "ar") return (it) => metric(it, f.a, "ar") ?? Infinity;
    if (f.sort === "disagreement") return (it) => -new Set(Object.values(it.outcomes).map((o) => o.answer).filter((x) => x !== undefined)).size;
    return (it) => it.i;
  }
  window.LMMS_VG_TIMES = { start: performance.now() };  // what the scale benchmark reads
  function apply(focus) {
    const t0 = performance.now();
    const f = filters();
    const key = sortKey(f);
    shown = items.filter((it) => passes(it, f));
    if (f.sort !== "doc") shown.sort((x, y) => key(x) - key(y) || x.i - y.i);
    $("count").textContent = shown.length + (shown.length === 1 ? " item" : " items");
    $("cards").textContent = "";
    rendered = 0;
    more();
    if (focus) open(focus);
    window.LMMS_VG_TIMES.apply = performance.now() - t0;
    if (window.LMMS_VG_TIMES.firstCard === undefined) window.LMMS_VG_TIMES.firstCard = performance.now();
  }

  // ---------------------------------------------------------------- cards, rendered a page at a time as the list scrolls
  function more() {
    const end = Math.min(rendered + PAGE, shown.length);
    for (; rendered < end; rendered++) $("cards").appendChild(card(shown[rendered]));
  }
  function nearEnd() {
    return $("sentinel").getBoundingClientRect().top < window.innerHeight + 600;
  }
  new IntersectionObserver(
    (seen) => {
      if (!seen.some((e) => e.isIntersecting)) return;
      do more(); while (rendered < shown.length && nearEnd());  // until the list runs past the window again
    },
    { rootMargin: "0px 0px 600px 0px" },
  ).observe($("sentinel"));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function card(it) {
    const task = D.tasks[it.task];
    const c = el("article", "card");
    c.tabIndex = 0;
    c.id = "card-" + task + "/" + it.doc;
    c.dataset.index = it.i;
    const h = el("h2");
    const link = el("a", "", task + " · doc " + it.doc);
    link.href = "#" + encodeURIComponent(task) + "/" + it.doc;
    h.appendChild(link);
    if (it.category) h.appendChild(document.createTextNode(" · " + it.category));
    c.appendChild(h);
    c.appendChild(el("div", "question", it.question));
    const views = el("div", "views");
    const layer = el("div", "layer");
    const table = el("table");
    c.append(views, layer, table);
    detail(it.i, (d) => fill(c, it, d, views, layer, table));
    return c;
  }

  function fill(c, it, d, views, layer, table) {
    const runs = Object.keys(it.outcomes).map(Number).sort((x, y) => x - y);
    const mapped = runs.filter((r) => d[r] && d[r].normalised);
    const layers = mapped.length ? d[mapped[0]].layers : 0;
    const a = Number($("run-a").value);
    const best = (it.outcomes[a] || it.outcomes[mapped[0]] || {}).best_layer;
    const state = { layer: typeof best === "number" ? best : 0, raw: false };
    const canvases = [];
    if (!it.image) views.appendChild(el("div", "missing", it.missing || "no image"));
    else if (!mapped.length) canvases.push(view(views, "image", null));
    mapped.forEach((r) => canvases.push(view(views, D.runs[r].label, r)));
    const cells = {};
    function draw() {
      canvases.forEach(({ canvas, run }) => paint(canvas, it, run === null ? null : d[run], state));
      runs.forEach((r) => {
        const m = d[r] || {};
        ["ar", "kl", "js"].forEach((k) => {
          if (cells[r + k]) cells[r + k].textContent = m[k] && m[k][state.layer] != null ? Number(m[k][state.layer]).toFixed(3) : "";
        });
      });
      if (slider) label.textContent = "layer " + state.layer + (typeof best === "number" ? " (best for A: " + best + ")" : "");
    }
    let slider = null, label = null;
    if (layers) {
      slider = el("input");
      slider.type = "range";
      slider.min = 0;
      slider.max = layers - 1;
      slider.value = state.layer;
      slider.className = "layer-slider";
      slider.oninput = () => { state.layer = Number(slider.value); draw(); };
      label = el("span");
      const raw = el("input");
      raw.type = "checkbox";
      raw.title = "the question's own attention, not divided by the generic prompt's";
      raw.onchange = () => { state.raw = raw.checked; draw(); };
      layer.append(label, slider, raw, document.createTextNode("raw"));
      c.stepLayer = (step) => { slider.value = Math.min(layers - 1, Math.max(0, state.layer + step)); slider.oninput(); };
    }
    const head = el("tr");
    ["run", "answer", "", "AR", "KL", "JS"].forEach((t) => head.appendChild(el("th", "", t)));
    table.appendChild(head);
    runs.forEach((r) => {
      const o = it.outcomes[r];
      const row = el("tr");
      row.appendChild(el("td", "", D.runs[r].label));
      row.appendChild(el("td", "", o.skipped || o.excluded || o.answer || (o.best_layer != null ? "best layer " + o.best_layer : "")));
      row.appendChild(el("td", o.correct === true ? "right" : o.correct === false ? "wrong" : "", o.correct === true ? "✓" : o.correct === false ? "✗" : ""));
      ["ar", "kl", "js"].forEach((k) => { cells[r + k] = el("td"); row.appendChild(cells[r + k]); });
      table.appendChild(row);
    });
    draw();
  }

  function view(parent, label, run) {
    const v = el("div", "view");
    const canvas = el("canvas");
    canvas.width = 200;
    canvas.height = 200;
    v.append(canvas, el("span", "", label));
    parent.appendChild(v);
    return { canvas, run };
  }

  function paint(canvas, it, m, state) {
    image(it.image, (img) => {
      const scale = Math.min(200 / img.width, 200 / img.height);
      canvas.width = Math.round(img.width * scale);
      canvas.height = Math.round(img.height * scale);
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      if (!m) return;
      const [w0, h0] = m.image_size;
      const k = canvas.width / w0;
      const [sx, sy, ox, oy, cell, cellH] = m.transform;
      const [rows, cols] = m.grid;
      // the token grid covers the model's frame: back to original pixels, then onto the canvas
      const x0 = (-ox / sx) * k, y0 = (-oy / sy) * k, x1 = ((cols * cell - ox) / sx) * k, y1 = ((rows * cellH - oy) / sy) * k;
      image(state.raw && m.raw ? m.raw : m.normalised, (sprite) => {
        ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(sprite, state.layer * cols, 0, cols, rows, x0, y0, x1 - x0, y1 - y0);
        if (m.kept) {
          ctx.fillStyle = "rgba(40,40,40,0.45)";
          for (let n = 0; n < m.kept.length; n++) {
            if (m.kept[n] === "1") continue;
            const r = Math.floor(n / cols), col = n % cols;
            ctx.fillRect(x0 + (col * (x1 - x0)) / cols, y0 + (r * (y1 - y0)) / rows, (x1 - x0) / cols, (y1 - y0) / rows);
          }
        }
        ctx.strokeStyle = "#22c55e";
        ctx.lineWidth = 2;
        (m.boxes || []).forEach(([bx0, by0, bx1, by1]) => ctx.strokeRect(bx0 * k, by0 * k, (bx1 - bx0) * k, (by1 - by0) * k));
      });
    });
  }

  // ---------------------------------------------------------------- permalinks and the keyboard
  function open(target) {
    const task = D.tasks.indexOf(target.task);
    let at = shown.findIndex((it) => it.task === task && it.doc === target.doc);
    if (at < 0) {
      Object.values(FIELDS).forEach((id) => { if ($(id).tagName === "SELECT" && id !== "run-a" && id !== "run-b") $(id).selectedIndex = 0; });
      $("search").value = "";
      apply(null);
      at = shown.findIndex((it) => it.task === task && it.doc === target.doc);
    }
    if (at < 0) return;
    while (rendered <= at) more();
    const c = $("card-" + target.task + "/" + target.doc);
    c.focus();
    c.scrollIntoView({ block: "center" });
  }
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) && document.activeElement.type !== "range") return;
    const cards = [...document.querySelectorAll(".card")];
    const at = cards.indexOf(document.activeElement.closest ? document.activeElement.closest(".card") : null);
    if (e.key === "j" || e.key === "k") {
      const next = e.key === "j" ? at + 1 : Math.max(at - 1, 0);
      if (next >= cards.length) more();
      const target = document.querySelectorAll(".card")[next];
      if (target) { target.focus(); target.scrollIntoView({ block: "nearest" }); }
      e.preventDefault();
    } else if ((e.key === "ArrowLeft" || e.key === "ArrowRight") && at >= 0 && cards[at].stepLayer) {
      cards[at].stepLayer(e.key === "ArrowRight" ? 1 : -1);
      e.preventDefault();
    }
  });
  Object.values(FIELDS).forEach((id) => $(id).addEventListener(id === "search" ? "input" : "change", () => apply(null)));
  window.addEventListener("hashchange", () => apply(readAddress()));
  apply(readAddress());
})();
