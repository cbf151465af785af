// dataprep report: renders one page of cards at a time from data/chunk-*.js.
// Chunks are plain scripts calling window.__chunk(i, rows), so the page works
// from file:// (no fetch, no CORS). Filter state lives in the URL hash
// (#rule=...&status=...&q=...&page=N), so a filtered view is a link.
(function () {
  "use strict";
  var META = window.__REPORT_META;
  var chunks = new Array(META.chunks.length);
  var waiting = {};
  var generation = 0; // bumps on every state change; stale scans stop

  window.__chunk = function (i, rows) {
    chunks[i] = rows;
    (waiting[i] || []).forEach(function (f) { f(); });
    delete waiting[i];
  };

  function loadChunk(i) {
    return new Promise(function (resolve, reject) {
      if (chunks[i]) return resolve(chunks[i]);
      if (waiting[i]) { waiting[i].push(function () { resolve(chunks[i]); }); return; }
      waiting[i] = [function () { resolve(chunks[i]); }];
      var s = document.createElement("script");
      s.src = META.chunks[i].file;
      s.onerror = function () { delete waiting[i]; reject(new Error("cannot load " + s.src)); };
      document.head.appendChild(s);
    });
  }

  // ------------------------------------------------------------ state <-> hash
  var KEYS = ["rule", "status", "verdict", "dup", "cluster", "q"];
  function readState() {
    var st = { page: 0, hash: location.hash.replace(/^#/, "") };
    var params = new URLSearchParams(st.hash);
    KEYS.forEach(function (k) { st[k] = params.get(k) || ""; });
    st.page = Math.max(0, (parseInt(params.get("page") || "1", 10) || 1) - 1);
    return st;
  }
  function writeState(st) {
    var params = new URLSearchParams();
    KEYS.forEach(function (k) { if (st[k]) params.set(k, st[k]); });
    if (st.page) params.set("page", String(st.page + 1));
    var h = params.toString();
    if (("#" + h) !== location.hash && !(h === "" && location.hash === "")) location.hash = h;
    else render();
  }
  function setFilter(k, v) { var st = readState(); st[k] = v; st.page = 0; writeState(st); }

  // ------------------------------------------------------------ matching
  function filtered(st) { return st.rule || st.status || st.verdict || st.dup || st.cluster || st.q; }
  function hay(c) {
    if (c._hay === undefined) c._hay = [c.id, c.cap, c.src, c.tgt, c.raw, c.cerr, c.eerr].filter(Boolean).join("\n").toLowerCase();
    return c._hay;
  }
  function matches(c, st, words) {
    if (st.status && c.status !== st.status) return false;
    if (st.rule && !(c.viol && c.viol.indexOf(st.rule) >= 0)) return false;
    if (st.verdict) {
      var v = c.judge ? String(c.judge.verdict) : "-";
      if (v !== st.verdict) return false;
    }
    if (st.dup === "yes" && !c.dup) return false;
    if (st.dup === "no" && c.dup) return false;
    if (st.cluster && !(c.dup && c.dup.some(function (d) { return d.cluster === st.cluster; }))) return false;
    if (words.length) {
      var h = hay(c);
      for (var i = 0; i < words.length; i++) if (h.indexOf(words[i]) < 0) return false;
    }
    return true;
  }

  // ------------------------------------------------------------ DOM helpers
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  // text with [start, end) wrapped in <mark class=cls>; textContent only, never innerHTML
  function marked(tag, cls, text, range, markCls) {
    var e = el(tag, cls);
    if (!range || range[0] < 0 || range[1] > text.length) { e.textContent = text; return e; }
    e.appendChild(document.createTextNode(text.slice(0, range[0])));
    e.appendChild(el("mark", markCls, text.slice(range[0], range[1])));
    e.appendChild(document.createTextNode(text.slice(range[1])));
    return e;
  }
  function row(dl, k, v) {
    if (v === undefined || v === null || v === "") return;
    dl.appendChild(el("dt", null, k));
    dl.appendChild(el("dd", null, typeof v === "object" ? JSON.stringify(v) : v));
  }
  // p = [shared index, key, seed, finish_reason, prompt_tokens, completion_tokens, created_at] (cards.py ROW_PROV)
  function provRows(dl, label, p) {
    if (!p) return;
    var shared = META.provenance[p[0]] || {};
    dl.appendChild(el("dt", "group", label));
    dl.appendChild(el("dd", "group", ""));
    row(dl, "engine", shared.engine);
    row(dl, "model", shared.model + (shared.model_revision ? "@" + shared.model_revision : ""));
    row(dl, "prompt", (shared.prompt_id || "") + (shared.prompt_sha256 ? " (" + shared.prompt_sha256.slice(0, 12) + ")" : ""));
    row(dl, "sampling", shared.sampling);
    row(dl, "seed", p[2]);
    row(dl, "finish", p[3]);
    if (p[4] !== null || p[5] !== null) row(dl, "tokens (prompt / completion)", p[4] + " / " + p[5]);
    row(dl, "run", shared.run_id);
    row(dl, "created", p[6]);
    row(dl, "key", p[1]);
  }
  function chip(text, cls, onclick, title) {
    var b = el(onclick ? "button" : "span", "chip " + (cls || ""), text);
    if (onclick) { b.type = "button"; b.addEventListener("click", onclick); }
    if (title) b.title = title;
    return b;
  }

  function card(c) {
    var art = el("article", "card status-" + c.status);
    art.dataset.id = c.id;
    art.dataset.status = c.status;
    var fig = el("div", "thumb");
    if (c.th) {
      var img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.src = c.th;
      img.width = c.tw; img.height = c.thh;
      img.alt = c.id;
      if (c.uri && c.uri.charAt(0) === "/") { // a local file: the thumbnail opens the full image
        var a = el("a");
        a.href = "file://" + c.uri.split("/").map(encodeURIComponent).join("/");
        a.title = "open " + c.uri;
        a.appendChild(img);
        fig.appendChild(a);
      } else {
        fig.appendChild(img);
      }
    } else {
      fig.appendChild(el("span", "nothumb", c.terr ? "no thumbnail: " + c.terr : "no image"));
    }
    art.appendChild(fig);
    var body = el("div", "body");
    var head = el("div", "head");
    head.appendChild(el("code", "id", c.id));
    head.appendChild(chip(c.status === "none" ? "no edit" : c.status, "badge " + c.status));
    if (c.judge) {
      var v = String(c.judge.verdict);
      head.appendChild(chip("judge: " + v, "verdict", function () { setFilter("verdict", v); }, "show only judge verdict " + v));
    }
    (c.dup || []).forEach(function (d) {
      head.appendChild(chip("dup " + d.cluster + " (" + d.size + ")", "dup", function () { setFilter("cluster", d.cluster); }, "show this duplicate cluster" + (d.kind ? " (" + d.kind + ")" : "")));
    });
    body.appendChild(head);
    if (c.cap !== undefined && c.cap !== null) {
      body.appendChild(el("div", "label", "caption"));
      body.appendChild(c.src === undefined ? marked("p", "caption", c.cap, c.ss, "span-src") : el("p", "caption", c.cap));
    } else if (c.cerr) {
      body.appendChild(el("p", "error", "caption error: " + c.cerr));
    }
    if (c.src !== undefined && c.src !== null) {
      body.appendChild(el("div", "label", "source"));
      body.appendChild(marked("p", "source", c.src, c.ss, "span-src"));
    }
    if (c.tgt !== undefined && c.tgt !== null) {
      body.appendChild(el("div", "label", "target"));
      body.appendChild(marked("p", "target", c.tgt, c.ts, "span-tgt"));
    }
    if (c.eerr) body.appendChild(el("p", "error", "edit error: " + c.eerr));
    if (c.viol && c.viol.length) {
      var vs = el("div", "violations");
      c.viol.forEach(function (r) { vs.appendChild(chip(r, "rule", function () { setFilter("rule", r); }, META.rules[r] || r)); });
      body.appendChild(vs);
    }
    var det = el("details", "more");
    det.appendChild(el("summary", null, "details" + (c.att ? " \u00b7 " + c.att + " attempt" + (c.att > 1 ? "s" : "") : "")));
    var dl = el("dl");
    row(dl, "attempts", c.att);
    row(dl, "raw output", c.raw);
    row(dl, "other edit rows", c.more);
    row(dl, "image", c.uri);
    if (c.w) row(dl, "size", c.w + " x " + c.h);
    provRows(dl, "caption provenance", c.cp);
    provRows(dl, "edit provenance", c.ep);
    if (c.judge) {
      dl.appendChild(el("dt", "group", "judge")); dl.appendChild(el("dd", "group", ""));
      Object.keys(c.judge).forEach(function (k) { row(dl, k, c.judge[k]); });
    }
    (c.dup || []).forEach(function (d) {
      dl.appendChild(el("dt", "group", "duplicate cluster " + d.cluster)); dl.appendChild(el("dd", "group", ""));
      Object.keys(d).forEach(function (k) { if (k !== "cluster") row(dl, k, d[k]); });
    });
    det.appendChild(dl);
    body.appendChild(det);
    art.appendChild(body);
    return art;
  }

  // ------------------------------------------------------------ rendering
  var main = document.getElementById("cards");
  function show(list, from, total, exact, st) {
    main.textContent = "";
    var frag = document.createDocumentFragment();
    list.forEach(function (c) { frag.appendChild(card(c)); });
    main.appendChild(frag);
    var pages = Math.max(1, Math.ceil(total / META.page_size));
    var text = total === 0 && exact ? "no matching images" :
      "images " + (list.length ? from + 1 : 0) + "\u2013" + (from + list.length) + " of " + (exact ? total : "at least " + total) +
      (filtered(st) ? " matching" : "") + " \u00b7 page " + (st.page + 1) + (exact ? " of " + pages : "");
    document.querySelectorAll(".pager .where").forEach(function (w) { w.textContent = text; });
    document.querySelectorAll(".pager .prev").forEach(function (b) { b.disabled = st.page === 0; });
    document.querySelectorAll(".pager .next").forEach(function (b) { b.disabled = from + list.length >= total && exact; });
    document.body.dataset.shown = st.hash; // which state the cards on screen belong to (tests wait on it)
    document.body.dataset.ready = exact ? "1" : "partial";
  }

  function syncForm(st) {
    ["rule", "status", "verdict", "dup", "q"].forEach(function (k) {
      var f = document.getElementById("f-" + k);
      if (f && f.value !== st[k]) f.value = st[k];
    });
    var cl = document.getElementById("f-cluster");
    if (cl) {
      cl.hidden = !st.cluster;
      cl.textContent = st.cluster ? "cluster " + st.cluster + " \u00d7" : "";
    }
  }

  function render() {
    var st = readState();
    var gen = ++generation;
    syncForm(st);
    document.body.dataset.ready = "0";
    var ps = META.page_size, from = st.page * ps;
    if (!filtered(st)) {
      // plain paging: load only the chunks this page overlaps
      var need = [];
      META.chunks.forEach(function (ch, i) { if (ch.start < from + ps && ch.start + ch.n > from) need.push(i); });
      Promise.all(need.map(loadChunk)).then(function () {
        if (gen !== generation) return;
        var list = [];
        need.forEach(function (i) {
          var ch = META.chunks[i];
          chunks[i].forEach(function (c, j) { var k = ch.start + j; if (k >= from && k < from + ps) list.push(c); });
        });
        show(list, from, META.total, true, st);
      }, fail);
      return;
    }
    // filtered: scan chunks in order; show the page as soon as it is full, keep counting
    var words = st.q.toLowerCase().split(/\s+/).filter(Boolean);
    var list = [], seen = 0, shown = false;
    function step(i) {
      if (gen !== generation) return;
      if (i >= META.chunks.length) { show(list, from, seen, true, st); return; }
      loadChunk(i).then(function (rows) {
        if (gen !== generation) return;
        rows.forEach(function (c) {
          if (!matches(c, st, words)) return;
          if (seen >= from && seen < from + ps) list.push(c);
          seen++;
        });
        if (!shown && list.length >= ps) { shown = true; show(list, from, seen, false, st); }
        step(i + 1);
      }, fail);
    }
    step(0);
  }
  function fail(err) {
    document.querySelectorAll(".pager .where").forEach(function (w) { w.textContent = String(err && err.message || err); });
    document.body.dataset.ready = "error";
  }

  // ------------------------------------------------------------ wiring
  ["rule", "status", "verdict", "dup"].forEach(function (k) {
    var f = document.getElementById("f-" + k);
    if (f) f.addEventListener("change", function () { setFilter(k, f.value); });
  });
  var q = document.getElementById("f-q"), timer = null;
  q.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () { setFilter("q", q.value.trim()); }, 200);
  });
  q.addEventListener("keydown", function (e) { if (e.key === "Enter") { clearTimeout(timer); setFilter("q", q.value.trim()); } });
  var cl = document.getElementById("f-cluster");
  if (cl) cl.addEventListener("click", function () { setFilter("cluster", ""); });
  document.getElementById("f-clear").addEventListener("click", function () { location.hash = ""; });
  document.querySelectorAll(".pager .prev").forEach(function (b) {
    b.addEventListener("click", function () { var st = readState(); st.page = Math.max(0, st.page - 1); writeState(st); window.scrollTo(0, 0); });
  });
  document.querySelectorAll(".pager .next").forEach(function (b) {
    b.addEventListener("click", function () { var st = readState(); st.page += 1; writeState(st); window.scrollTo(0, 0); });
  });
  window.addEventListener("hashchange", render);
  render();
})();
