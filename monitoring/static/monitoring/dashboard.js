/* The live dashboard (/admin/dashboard/): draws the chosen range (the last hour, 6 h, 24 h or 7 days) from the
 * metric history, then adds every pushed sample (once a second) to the charts and figures, and every pushed fleet
 * event or alert change to the ticker. Choosing a range asks the history once; the push goes on as it was.
 * Charts are uPlot (vendored under static/monitoring/vendor/uplot). Needs live.js. */
(function () {
  "use strict";

  var TICKER_ROWS = 50;
  var QUEUE_COLOURS = {urgent: "#ba2121", high: "#e5862d", normal: "#417690", low: "#79aec8"};
  var root = document.getElementById("dashboard");
  var historyUrl = root.getAttribute("data-history-url");
  var queues = JSON.parse(root.getAttribute("data-queues"));
  // Over the long ranges the pushed samples are folded into one point per minute (24 h) or hour (7 days), as the
  // history there is: one point a second for a day or a week would be redrawn every second.
  var BUCKET_SECONDS = {"1h": 0, "6h": 0, "24h": 60, "7d": 3600};
  var state = {charts: {}, data: {}, samples: 0, historyLoads: 0, range: "1h", windowSeconds: 3600,
               liveBuckets: {}};
  window.portalDashboard = state;

  // --- formatting -------------------------------------------------------------------------------------------
  function dash(value) { return value === null || value === undefined; }
  function seconds(value) {
    if (dash(value)) return "–";
    return value < 1 ? Math.round(value * 1000) + " ms" : value.toFixed(value < 10 ? 2 : 1) + " s";
  }
  function bytes(value) {
    if (dash(value)) return "–";
    var units = ["B", "KiB", "MiB", "GiB"];
    var index = 0;
    while (value >= 1024 && index < units.length - 1) { value /= 1024; index += 1; }
    return value.toFixed(index ? 1 : 0) + " " + units[index];
  }
  function number(value, digits) {
    if (dash(value)) return "–";
    return digits ? value.toFixed(digits) : String(Math.round(value));
  }
  function setFigure(id, text, value) {
    var element = document.getElementById(id);
    if (!element) return;
    element.textContent = text;
    element.setAttribute("data-value", dash(value) ? "" : String(value));
  }
  function element(tag, attributes, text) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (name) { node.setAttribute(name, attributes[name]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- charts -----------------------------------------------------------------------------------------------
  var CHARTS = {
    depth: {title: "Jobs waiting, per queue", series: queues.map(function (queue) {
      return {label: queue, stroke: QUEUE_COLOURS[queue] || "#666", width: 2};
    })},
    throughput: {title: "Attempts per minute", series: [
      {label: "completed", stroke: "#2e8540", width: 2},
      {label: "failed", stroke: "#ba2121", width: 2},
      {label: "retried", stroke: "#e5862d", width: 2}]},
    timings: {title: "Processing and wait (seconds)", series: [
      {label: "processing p50", stroke: "#417690", width: 2},
      {label: "processing p95", stroke: "#205067", width: 2, dash: [6, 3]},
      {label: "wait p50", stroke: "#9b59b6", width: 2},
      {label: "wait p95", stroke: "#6c3483", width: 2, dash: [6, 3]}]},
    workers: {title: "Workers", series: [
      {label: "busy", stroke: "#e5862d", width: 2, fill: "rgba(229,134,45,0.15)"},
      {label: "idle", stroke: "#2e8540", width: 2}]}
  };

  function chartWidth(container) { return Math.max(280, container.clientWidth - 8); }

  function makeChart(name, data) {
    var container = document.getElementById("chart-" + name);
    if (state.charts[name]) state.charts[name].destroy(); // uPlot keeps its instances for resize handling
    container.innerHTML = "";
    var options = {
      title: CHARTS[name].title, width: chartWidth(container), height: 200,
      scales: {x: {time: true}, y: {range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; }}},
      series: [{}].concat(CHARTS[name].series.map(function (series) {
        return Object.assign({spanGaps: true, points: {show: false}}, series);
      })),
      axes: [{}, {size: 50}], legend: {live: true}
    };
    state.data[name] = data;
    state.charts[name] = new uPlot(options, data, container);
  }

  function fromHistory(history) {
    var times = history.times;
    var s = history.series;
    var busy = s.workers.map(function (workers, index) {
      return dash(workers) ? null : Math.round(workers * (s.busy_ratio[index] || 0));
    });
    var idle = s.workers.map(function (workers, index) { return dash(workers) ? null : workers - busy[index]; });
    return {
      depth: [times.slice()].concat(queues.map(function (queue) { return s["depth:" + queue].slice(); })),
      throughput: [times.slice(), s.completed.slice(), s.failed.slice(), s.retried.slice()],
      timings: [times.slice(), s.processing_p50.slice(), s.processing_p95.slice(), s.wait_p50.slice(),
                s.wait_p95.slice()],
      workers: [times.slice(), busy, idle]
    };
  }

  var historyRetry = 1000;

  function loadHistory() {
    var range = state.range;
    return fetch(historyUrl + "?range=" + encodeURIComponent(range),
                 {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) throw new Error("history: HTTP " + response.status);
        return response.json();
      })
      .then(function (history) {
        if (history.range !== state.range) return; // another range was chosen meanwhile: its answer draws
        state.windowSeconds = history.seconds;
        state.liveBuckets = {};
        var data = fromHistory(history);
        Object.keys(CHARTS).forEach(function (name) { makeChart(name, data[name]); });
        var ticker = document.getElementById("ticker");
        ticker.innerHTML = "";
        history.events.slice().reverse().forEach(addTickerLine);
        state.historyLoads += 1;
        root.setAttribute("data-history-loaded", String(state.historyLoads));
        root.setAttribute("data-range", history.range);
      })
      .then(function () {
        historyRetry = 1000;
        document.getElementById("dashboard-error").textContent = "";
      })
      .catch(function (error) {
        // Draw empty charts so the pushed samples still show, and try the hour again later.
        Object.keys(CHARTS).forEach(function (name) {
          if (!state.charts[name]) makeChart(name, [[]].concat(CHARTS[name].series.map(function () { return []; })));
        });
        document.getElementById("dashboard-error").textContent = "Could not load the history (" + error.message +
          "); trying again in " + Math.round(historyRetry / 1000) + " s.";
        setTimeout(loadHistory, historyRetry);
        historyRetry = Math.min(60000, historyRetry * 2);
      });
  }

  function append(name, x, values) {
    var data = state.data[name];
    if (!data) return;
    var lastX = data[0].length ? data[0][data[0].length - 1] : null;
    if (lastX !== null && x <= lastX) return; // a sample seen already (re-sent on connect), or out of order
    var bucketSeconds = BUCKET_SECONDS[state.range] || 0;
    var bucket = bucketSeconds ? Math.floor(x / bucketSeconds) : null;
    var last = data[0].length - 1;
    if (bucket !== null && state.liveBuckets[name] === bucket && last >= 0) {
      data[0][last] = x; // the same minute or hour: the newest sample stands for it
      values.forEach(function (value, index) { data[index + 1][last] = dash(value) ? null : value; });
    } else {
      data[0].push(x);
      values.forEach(function (value, index) { data[index + 1].push(dash(value) ? null : value); });
    }
    if (bucket !== null) state.liveBuckets[name] = bucket;
    var cutoff = x - state.windowSeconds;
    var drop = 0;
    while (drop < data[0].length && data[0][drop] < cutoff) drop += 1;
    if (drop) data.forEach(function (column) { column.splice(0, drop); });
    state.charts[name].setData(data);
  }

  // --- one sample -------------------------------------------------------------------------------------------
  function onSample(sample) {
    state.samples += 1;
    var x = sample.at / 1000;
    var pools = Object.keys(sample.pools).map(function (name) { return [name, sample.pools[name]]; });
    var busy = 0;
    var idle = 0;
    pools.forEach(function (pair) { busy += pair[1].busy; idle += pair[1].idle; });
    append("depth", x, queues.map(function (queue) { return sample.queues[queue].depth; }));
    append("throughput", x, [sample.throughput.completed, sample.throughput.failed, sample.throughput.retried]);
    append("timings", x, [sample.processing.p50, sample.processing.p95, sample.wait.p50, sample.wait.p95]);
    append("workers", x, [busy, idle]);

    var total = 0;
    queues.forEach(function (queue) { total += sample.queues[queue].depth || 0; });
    setFigure("figure-depth", number(total), total);
    setFigure("figure-completed", number(sample.throughput.completed, 1), sample.throughput.completed);
    setFigure("figure-failed", number(sample.throughput.failed, 1), sample.throughput.failed);
    setFigure("figure-retried", number(sample.throughput.retried, 1), sample.throughput.retried);
    setFigure("figure-processing", seconds(sample.processing.p50) + " / " + seconds(sample.processing.p95),
              sample.processing.p95);
    setFigure("figure-wait", seconds(sample.wait.p50) + " / " + seconds(sample.wait.p95), sample.wait.p95);
    setFigure("figure-redis-memory", bytes(sample.redis.used_memory) +
              (sample.redis.max_memory ? " of " + bytes(sample.redis.max_memory) : ""), sample.redis.used_memory);
    setFigure("figure-redis-clients", number(sample.redis.clients) +
              (sample.redis.max_clients ? " of " + number(sample.redis.max_clients) : ""), sample.redis.clients);
    var dispatch = sample.dispatch;
    var notes = ["mode " + dispatch.mode];
    if (sample.fallback) notes.push("FALLBACK: tasks go to the database poller");
    if (dispatch.submission_paused) notes.push("submission paused: " + dispatch.paused_reason);
    setFigure("figure-dispatch", notes.join("; "), sample.fallback ? 1 : 0);

    var health = document.getElementById("figure-health");
    health.textContent = sample.health.status;
    health.setAttribute("data-status", sample.health.status);
    var components = document.getElementById("health-components");
    components.innerHTML = "";
    Object.keys(sample.health.components).forEach(function (name) {
      var component = sample.health.components[name];
      if (component.status === "healthy") return;
      components.appendChild(element("li", {"data-status": component.status}, name + ": " + component.reason));
    });

    var queueRows = document.querySelector("#queue-table tbody");
    queueRows.innerHTML = "";
    queues.forEach(function (queue) {
      var figures = sample.queues[queue];
      var row = element("tr", {"data-queue": queue});
      [queue, number(figures.depth), number(figures.running), number(figures.dead),
       number(figures.completed_per_minute, 1)].forEach(function (text) { row.appendChild(element("td", {}, text)); });
      queueRows.appendChild(row);
    });

    var poolRows = document.querySelector("#pool-table tbody");
    poolRows.innerHTML = "";
    pools.forEach(function (pair) {
      var row = element("tr", {"data-pool": pair[0]});
      [pair[0], pair[1].busy, pair[1].idle, dash(pair[1].desired) ? "–" : pair[1].desired].forEach(function (text) {
        row.appendChild(element("td", {}, String(text)));
      });
      poolRows.appendChild(row);
    });
    if (!pools.length) {
      var empty = element("tr");
      empty.appendChild(element("td", {colspan: "4"}, "No worker is alive."));
      poolRows.appendChild(empty);
    }

    var alerts = document.getElementById("alerts-list");
    alerts.innerHTML = "";
    if (!sample.alerts.alerts.length) alerts.appendChild(element("li", {}, "No alert is firing."));
    sample.alerts.alerts.forEach(function (alert) {
      var line = element("li", {"data-severity": alert.severity});
      line.appendChild(element("a", {href: root.getAttribute("data-alert-url").replace("/0/", "/" + alert.id + "/")},
                               "[" + alert.severity + "] " + (alert.summary || alert.name) +
                               (alert.acknowledged ? " (acknowledged)" : "")));
      alerts.appendChild(line);
    });
    if (sample.alerts.more) alerts.appendChild(element("li", {}, "…and more"));
  }

  // --- the ticker -------------------------------------------------------------------------------------------
  function addTickerLine(event) {
    var ticker = document.getElementById("ticker");
    var line = element("li", {"data-source": event.source, "data-level": event.level, "data-kind": event.kind});
    var when = new Date(event.at);
    line.appendChild(element("time", {datetime: event.at}, when.toLocaleTimeString()));
    line.appendChild(document.createTextNode(" "));
    line.appendChild(element("a", {href: event.url}, event.text));
    ticker.insertBefore(line, ticker.firstChild);
    while (ticker.children.length > TICKER_ROWS) ticker.removeChild(ticker.lastChild);
  }

  // --- the range --------------------------------------------------------------------------------------------
  Array.prototype.forEach.call(document.querySelectorAll("#dashboard-range button"), function (button) {
    button.addEventListener("click", function () {
      state.range = button.getAttribute("data-range");
      Array.prototype.forEach.call(document.querySelectorAll("#dashboard-range button"), function (other) {
        other.setAttribute("aria-pressed", other === button ? "true" : "false");
      });
      loadHistory();
    });
  });

  window.addEventListener("resize", function () {
    Object.keys(state.charts).forEach(function (name) {
      var container = document.getElementById("chart-" + name);
      state.charts[name].setSize({width: chartWidth(container), height: 200});
    });
  });

  loadHistory().then(function () {
    var live = window.PortalLive.connection();
    live.on("sample", onSample);
    live.on("events", function (events) { events.forEach(addTickerLine); });
    live.on("resumed", function (away) { if (away > 60000) loadHistory(); }); // the gap is in the history
  });
})();
