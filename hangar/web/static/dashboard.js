/* hangar dashboard: the live event stream and the usage charts (uPlot). No build step. */
(function () {
  "use strict";

  var MAX_EVENTS = 200;
  var PALETTE = ["#3558d6", "#1f8a4c", "#b7791f", "#c0392b", "#6a3fd0", "#138496", "#7d8797", "#d63384"];

  function text(tag, cls, value) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    node.textContent = value;
    return node;
  }

  function clock(ms) {
    var d = new Date(ms);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map(function (n) {
      return String(n).padStart(2, "0");
    }).join(":");
  }

  function startEvents() {
    var list = document.getElementById("events");
    var badge = document.getElementById("live-state");
    if (!list || !window.EventSource) return;
    var source = new EventSource(list.dataset.stream);
    source.onopen = function () { badge.textContent = "live"; badge.classList.add("on"); };
    source.onerror = function () { badge.textContent = "reconnecting"; badge.classList.remove("on"); };
    source.addEventListener("end", function () { source.close(); badge.textContent = "ended"; badge.classList.remove("on"); });
    source.addEventListener("machine", function (message) {
      var event = JSON.parse(message.data);
      var item = document.createElement("li");
      item.dataset.machine = event.machine_id;
      item.appendChild(text("span", "time", clock(event.timestamp)));
      var what = document.createElement("span");
      what.className = "what";
      what.appendChild(text("span", "mono", event.machine_id));
      what.title = "app " + event.app + ", " + event.source;
      what.appendChild(document.createTextNode(" " + event.machine_name + " · " + event.type + " "));
      what.appendChild(text("span", "badge state-" + event.status, event.status));
      item.appendChild(what);
      list.insertBefore(item, list.firstChild);
      while (list.children.length > MAX_EVENTS) list.removeChild(list.lastChild);
      document.body.dispatchEvent(new CustomEvent("machine-event"));
    });
  }

  var charts = {};

  function draw(id, x, series, unit, empty) {
    var node = document.getElementById(id);
    if (!node || !window.uPlot) return;
    var names = Object.keys(series);
    var data = [x].concat(names.map(function (name) { return series[name]; }));
    var opts = {
      width: Math.max(300, node.clientWidth),
      height: 220,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max, 1e-6) * 1.15]; } } },
      axes: [{ stroke: "#6b7585", grid: { stroke: "#eef1f6" } },
             { stroke: "#6b7585", grid: { stroke: "#eef1f6" }, size: 60,
               values: function (u, splits) { return splits.map(function (v) { return v < 0.01 && v > 0 ? v.toExponential(1) : +v.toFixed(3); }); } }],
      series: [{}].concat(names.map(function (name, i) {
        var color = PALETTE[i % PALETTE.length];
        return { label: name, stroke: color, fill: color + "22", width: 2, points: { show: false },
                 value: function (u, v) { return v == null ? "-" : v.toFixed(4) + " " + unit; } };
      }))
    };
    if (charts[id]) charts[id].destroy();
    node.textContent = "";
    if (!names.length) { node.appendChild(text("p", "muted", empty)); return; }
    charts[id] = new uPlot(opts, data, node);
  }

  function loadUsage(windowName) {
    var section = document.getElementById("usage");
    if (!section) return;
    fetch(section.dataset.source + "?window=" + encodeURIComponent(windowName), { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (body) {
        draw("chart-gpu", body.x, body.gpu_hours, "GPU-h", "no GPU machine ran in this window");
        draw("chart-orgs", body.x, body.machine_hours, "h", "no machine ran in this window");
        draw("chart-cost", body.x, body.cost, body.currency, "nothing to bill in this window");
        section.dataset.loaded = windowName;
      });
  }

  function startUsage() {
    var section = document.getElementById("usage");
    if (!section) return;
    var current = "1h";
    section.querySelectorAll("button.window").forEach(function (button) {
      if (button.classList.contains("on")) current = button.dataset.window;
      button.addEventListener("click", function () {
        section.querySelectorAll("button.window").forEach(function (b) { b.classList.remove("on"); });
        button.classList.add("on");
        current = button.dataset.window;
        loadUsage(current);
      });
    });
    loadUsage(current);
    setInterval(function () { loadUsage(current); }, 30000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    startEvents();
    startUsage();
  });
})();
