// meshgate's web pane: the three traffic charts (uPlot), fed by the "series" SSE event
// that htmx's sse extension swaps into #series; form resets and copy buttons.
(function () {
  "use strict";
  var charts = {};
  var styles = getComputedStyle(document.documentElement);
  function colour(name) { return styles.getPropertyValue(name).trim() || "#888"; }

  function size(el) { return { width: Math.max(260, el.clientWidth - 8), height: 150 }; }

  function make(id, series) {
    var el = document.getElementById(id);
    if (!el) { return null; }
    var dims = size(el);
    var axis = { stroke: colour("--muted"), grid: { stroke: colour("--grid"), width: 1 },
                 ticks: { stroke: colour("--grid") } };
    return new uPlot({
      width: dims.width, height: dims.height, legend: { show: false },
      cursor: { points: { size: 5 } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.15)]; } } },
      axes: [axis, Object.assign({ size: 58 }, axis)],
      series: [{}].concat(series.map(function (s) {
        var bars = s[3] === "bars";
        return { label: s[0], stroke: colour(s[1]), width: bars ? 1 : 2,
                 fill: s[2] ? colour(s[2]) : undefined, spanGaps: s[3] === "gaps",
                 paths: bars ? uPlot.paths.bars({ size: [0.9, 6] }) : undefined,
                 points: { show: !bars, size: 4, fill: colour(s[1]) } };
      }))
    }, [[], ...series.map(function () { return []; })], el);
  }

  function setup() {
    charts.rps = make("chart-rps", [["served", "--c1", "--c1", "bars"], ["errors", "--c3", "--c3", "bars"]]);
    charts.tps = make("chart-tps", [["tokens", "--c2", "--c2", "bars"]]);
    charts.lat = make("chart-lat", [["p50", "--c1", null, "gaps"], ["p99", "--c2", null, "gaps"]]);
    var initial = document.getElementById("series");
    if (initial && initial.textContent.trim()) { update(initial.textContent); }
    window.addEventListener("resize", function () {
      Object.keys(charts).forEach(function (k) {
        var c = charts[k]; if (c) { c.setSize(size(c.root.parentNode)); }
      });
    });
  }

  function update(text) {
    var s;
    try { s = JSON.parse(text); } catch (e) { return; }
    var errorsPerS = s.errors.map(function (n) { return n / 10; });
    if (charts.rps) { charts.rps.setData([s.t, s.rps, errorsPerS]); }
    if (charts.tps) { charts.tps.setData([s.t, s.tps]); }
    if (charts.lat) { charts.lat.setData([s.t, s.p50, s.p99]); }
  }

  document.addEventListener("htmx:sseMessage", function (e) {
    if (e.target && e.target.id === "series") { update(e.target.textContent); }
    var dot = document.getElementById("live-dot");
    if (dot) { dot.classList.add("on"); dot.classList.remove("off"); }
  });
  document.addEventListener("htmx:sseError", function () {
    var dot = document.getElementById("live-dot");
    if (dot) { dot.classList.add("off"); dot.classList.remove("on"); }
  });
  document.addEventListener("htmx:afterRequest", function (e) {
    var form = e.detail.elt;
    if (e.detail.successful && form && form.hasAttribute && form.hasAttribute("data-reset")) {
      form.reset();
    }
  });
  document.addEventListener("click", function (e) {
    var button = e.target.closest ? e.target.closest("button[data-copy]") : null;
    if (!button) { return; }
    var text = document.getElementById(button.getAttribute("data-copy"));
    if (text && navigator.clipboard) {
      navigator.clipboard.writeText(text.textContent).then(function () { button.textContent = "Copied"; });
    }
  });
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", setup); }
  else { setup(); }
})();
