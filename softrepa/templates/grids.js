// Filters for the grid page: method (hides the other method's tiles) and a word search over ids and prompts.
// State lives in the URL hash (#method=...&q=...) so a filtered view is a link. Plain JS, no network.
(function () {
  "use strict";
  var method = document.getElementById("f-method"), q = document.getElementById("f-q"), shown = document.getElementById("shown");
  var pairs = Array.prototype.slice.call(document.querySelectorAll("section.pair"));
  function apply() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var m = params.get("method") || "", words = (params.get("q") || "").toLowerCase().split(/\s+/).filter(Boolean);
    method.value = m;
    if (document.activeElement !== q) q.value = params.get("q") || "";
    var n = 0;
    pairs.forEach(function (p) {
      var text = p.getAttribute("data-text");
      var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
      p.classList.toggle("hidden", !ok);
      if (ok) n++;
      p.querySelectorAll("figure.tile[data-method]").forEach(function (f) { f.classList.toggle("hidden", !!m && f.getAttribute("data-method") !== m); });
    });
    document.querySelectorAll("table.means tr[data-method]").forEach(function (r) { r.classList.toggle("hidden", !!m && r.getAttribute("data-method") !== m); });
    shown.textContent = n + " of " + pairs.length + " pairs shown";
    document.body.setAttribute("data-shown", location.hash.replace(/^#/, ""));
    document.body.setAttribute("data-ready", "1");
  }
  function write() {
    var params = new URLSearchParams();
    if (method.value) params.set("method", method.value);
    if (q.value.trim()) params.set("q", q.value.trim());
    location.hash = params.toString();
  }
  method.addEventListener("change", write);
  var timer = null;
  q.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(write, 200); });
  window.addEventListener("hashchange", apply);
  apply();
})();
