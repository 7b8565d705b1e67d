/* Live updates of the admin index's queue figures, the queues overview and the live workers page. Figures a sample
 * carries (jobs waiting and running, workers' state and counts) are written at once; rows that come from the
 * database (retries, dead letters, heartbeats, new or gone workers) are re-read from the page itself when a sample
 * or a fleet event says something changed, at most every few seconds (PortalLive.refresher). Needs live.js. */
(function () {
  "use strict";

  function text(node, value) { if (node && node.textContent !== value) node.textContent = value; }
  function figure(value) { return value === null || value === undefined ? "–" : String(value); }
  function bytes(value) {
    if (!value) return "";
    var units = ["bytes", "KB", "MB", "GB"];
    var index = 0;
    while (value >= 1024 && index < units.length - 1) { value /= 1024; index += 1; }
    return value.toFixed(1) + "\u00a0" + units[index];
  }

  // --- admin index: queue tiles and tasks per status ----------------------------------------------------
  var snapshot = document.getElementById("queue-snapshot");
  if (snapshot) {
    PortalLive.on("sample", function (sample) {
      Object.keys(sample.queues).forEach(function (queue) {
        text(snapshot.querySelector('[data-queue="' + queue + '"] .tile-figure'), figure(sample.queues[queue].depth));
      });
      sample.tasks.forEach(function (row) {
        text(snapshot.querySelector('[data-status="' + row.status + '"] .tile-figure a'),
             row.count + (row.more ? "+" : ""));
      });
      document.getElementById("snapshot-redis-warning").style.display = sample.redis.ok ? "none" : "";
    });
  }

  // --- queues overview --------------------------------------------------------------------------------------
  var queuesTable = document.getElementById("queues");
  if (queuesTable) {
    var refreshQueues = PortalLive.refresher(["#queues tbody"], 5000);
    var previous = null;
    PortalLive.on("sample", function (sample) {
      var changed = false;
      Object.keys(sample.queues).forEach(function (queue) {
        var figures = sample.queues[queue];
        var row = queuesTable.querySelector('tr[data-queue="' + queue + '"]');
        if (!row) return;
        text(row.querySelector("td.waiting"), figure(figures.depth));
        text(row.querySelector("td.running"), figure(figures.running));
        var before = previous && previous[queue];
        if (before && (before.completed_5m !== figures.completed_5m || before.failed_5m !== figures.failed_5m ||
                       before.dead !== figures.dead)) changed = true;
      });
      previous = sample.queues;
      if (changed) refreshQueues(); // attempts ended: retries, dead letters and the 5-minute counts moved
    });
  }

  // --- live workers -----------------------------------------------------------------------------------------
  var workersTable = document.getElementById("live-workers");
  if (workersTable) {
    var refreshWorkers = PortalLive.refresher(["#live-workers tbody", "#database-pollers-section"], 3000);
    PortalLive.on("sample", function (sample) {
      var shown = {};
      workersTable.querySelectorAll("tbody tr[data-worker]").forEach(function (row) {
        shown[row.getAttribute("data-worker")] = row;
      });
      var stale = false;
      sample.workers.forEach(function (worker) {
        var row = shown[worker.name];
        if (!row) { if (worker.alive) stale = true; return; }
        delete shown[worker.name];
        var state = row.querySelector("td.state");
        if (state && (state.getAttribute("data-state") !== (worker.alive ? worker.state : "lost"))) stale = true;
        text(row.querySelector("td.successful"), String(worker.successful));
        text(row.querySelector("td.failed"), String(worker.failed));
        text(row.querySelector("td.memory"), bytes(worker.rss));
      });
      if (Object.keys(shown).length) stale = true; // a shown worker is no longer registered
      if (stale) refreshWorkers();
    });
    PortalLive.on("events", function (events) {
      if (events.some(function (event) { return event.source === "fleet"; })) refreshWorkers();
    });
  }
})();
