/* The admin pages' live connection: one WebSocket to /ws/metrics/ per page (monitoring/live/consumers.py).
 *
 * - Messages are {"type": "sample", "data": {...}} once a second and {"type": "events", "data": [...]} when fleet
 *   events or alert changes happen; pages subscribe with PortalLive.on("sample" | "events" | "state", fn).
 * - After a server restart or a network cut it reconnects with exponential backoff (1 s doubling to 30 s, with
 *   jitter so that two hundred pages do not come back at the same instant).
 * - Close codes 4401 (not logged in) and 4403 (no permission) are final: the page says so and stops trying.
 * - While the tab is hidden the socket is closed (the server sends nothing and stops sampling if nobody else
 *   watches); it opens again when the tab is shown, with "resumed" telling how long the page was away.
 * - The element #live-status shows the state, and "stale" once no sample came for STALE_AFTER_MS.
 */
(function () {
  "use strict";

  var STALE_AFTER_MS = 3000;
  var MAX_BACKOFF_MS = 30000;
  var FINAL = {
    4401: "Not logged in (or the session ended): log in again to see live figures.",
    4403: "Your account may not view live figures (it needs the queues.view_queueoverview permission)."
  };

  function LiveConnection(url) {
    this.url = url;
    this.socket = null;
    this.listeners = {sample: [], events: [], state: [], resumed: []};
    this.attempt = 0;
    this.timer = null;
    this.state = "connecting";
    this.detail = "";
    this.lastSampleReceived = null; // Date.now() when the newest sample arrived
    this.openedAt = null; // Date.now() when the socket last opened (stale if no sample follows)
    this.disconnectedSince = null; // Date.now() when the socket last went away, until it opens again
    this.lastSample = null;
    this.hiddenSince = null;
    this.samplesReceived = 0;
    this.eventsReceived = 0;
    this.reconnectAt = null;
  }

  LiveConnection.prototype.on = function (type, listener) {
    this.listeners[type].push(listener);
    if (type === "sample" && this.lastSample) listener(this.lastSample);
    return this;
  };

  LiveConnection.prototype.emit = function (type, value) {
    this.listeners[type].forEach(function (listener) {
      try { listener(value); } catch (error) { console.error("live listener failed", error); }
    });
  };

  LiveConnection.prototype.setState = function (state, detail) {
    this.state = state;
    this.detail = detail || "";
    this.render();
    this.emit("state", {state: state, detail: this.detail});
  };

  LiveConnection.prototype.start = function () {
    var self = this;
    document.addEventListener("visibilitychange", function () { self.visibilityChanged(); });
    setInterval(function () { self.render(); }, 1000);
    if (document.hidden) {
      this.hiddenSince = Date.now();
      this.setState("paused", "tab hidden");
    } else {
      this.open();
    }
  };

  LiveConnection.prototype.open = function () {
    var self = this;
    clearTimeout(this.timer);
    this.timer = null;
    this.reconnectAt = null;
    if (this.socket) return;
    this.setState(this.attempt ? "reconnecting" : "connecting", "");
    var socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = function () {
      self.attempt = 0;
      self.openedAt = Date.now();
      var away = self.disconnectedSince ? Date.now() - self.disconnectedSince : 0;
      self.disconnectedSince = null;
      self.setState("live", "");
      if (away) self.emit("resumed", away); // a server restart or a network cut: the page may redraw the gap
    };
    socket.onmessage = function (message) {
      var payload;
      try { payload = JSON.parse(message.data); } catch (error) { return; }
      if (payload.type === "sample") {
        self.lastSampleReceived = Date.now();
        self.lastSample = payload.data;
        self.samplesReceived += 1;
        if (self.state !== "live") self.setState("live", "");
        self.emit("sample", payload.data);
      } else if (payload.type === "events") {
        self.eventsReceived += payload.data.length;
        self.emit("events", payload.data);
      }
    };
    socket.onclose = function (event) {
      if (self.socket === socket) self.socket = null;
      if (!self.disconnectedSince) self.disconnectedSince = Date.now();
      if (FINAL[event.code]) {
        self.setState("refused", FINAL[event.code]);
      } else if (document.hidden) {
        self.setState("paused", "tab hidden");
      } else {
        self.scheduleReconnect();
      }
    };
  };

  LiveConnection.prototype.scheduleReconnect = function () {
    var self = this;
    var delay = Math.min(MAX_BACKOFF_MS, 1000 * Math.pow(2, this.attempt));
    delay = Math.round(delay * (0.75 + Math.random() * 0.5));
    this.attempt += 1;
    this.reconnectAt = Date.now() + delay;
    this.setState("disconnected", "");
    this.timer = setTimeout(function () { self.open(); }, delay);
  };

  LiveConnection.prototype.visibilityChanged = function () {
    if (document.hidden) {
      this.hiddenSince = Date.now();
      clearTimeout(this.timer);
      this.timer = null;
      if (this.socket) this.socket.close(1000, "tab hidden");
      this.setState("paused", "tab hidden");
    } else if (this.state !== "refused") {
      this.hiddenSince = null;
      this.attempt = 0;
      this.open(); // "resumed" follows when it opens, with the time since the socket closed
    }
  };

  LiveConnection.prototype.stale = function () {
    var since = this.lastSampleReceived !== null ? this.lastSampleReceived : this.openedAt;
    return since !== null && Date.now() - since > STALE_AFTER_MS;
  };

  LiveConnection.prototype.render = function () {
    var element = document.getElementById("live-status");
    if (!element) return;
    var age = this.lastSampleReceived === null ? null : Math.round((Date.now() - this.lastSampleReceived) / 1000);
    var waited = this.openedAt === null ? 0 : Math.round((Date.now() - this.openedAt) / 1000);
    var text;
    var state = this.state;
    if (state === "live" && this.stale()) state = "stale";
    if (state === "live") {
      text = age === null ? "Live: waiting for the first sample" : "Live: updated " + age + " s ago";
    } else if (state === "stale") {
      text = "Stale: no update for " + (age === null ? waited : age) +
        " s (the sampler may be stopped: manage.py run_sampler)";
    } else if (state === "disconnected") {
      var wait = this.reconnectAt ? Math.max(0, Math.round((this.reconnectAt - Date.now()) / 1000)) : 0;
      text = "Disconnected" + (age !== null ? ", figures " + age + " s old" : "") + "; reconnecting in " + wait + " s";
    } else if (state === "reconnecting" || state === "connecting") {
      text = state === "connecting" ? "Connecting…" : "Reconnecting…";
    } else if (state === "paused") {
      text = "Paused while the tab is hidden";
    } else {
      text = this.detail;
    }
    element.textContent = text;
    element.setAttribute("data-state", state);
  };

  function socketUrl(configured) {
    if (configured) return configured;
    return (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + "/ws/metrics/";
  }

  var instance = null;
  window.PortalLive = {
    /* The page's connection (made and started on first use). */
    connection: function () {
      if (!instance) {
        var element = document.getElementById("live-status");
        instance = new LiveConnection(socketUrl(element ? element.getAttribute("data-url") : ""));
        instance.start();
      }
      return instance;
    },
    on: function (type, listener) { return this.connection().on(type, listener); }
  };

  /* Replaces the parts of the page named by selectors with the same parts of a fresh copy of the page, at most
   * once every minInterval ms however often it is asked (pages whose rows come from the database use it when a
   * sample or event says something changed). */
  window.PortalLive.refresher = function (selectors, minInterval) {
    var last = 0;
    var pending = null;
    var running = false;
    var again = false; // asked while a fetch was under way: what it read may predate the change
    function run() {
      pending = null;
      running = true;
      again = false;
      last = Date.now();
      fetch(window.location.href, {credentials: "same-origin", headers: {"X-Requested-With": "live-refresh"}})
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) {
          if (!html) return;
          var fresh = new DOMParser().parseFromString(html, "text/html");
          selectors.forEach(function (selector) {
            var current = document.querySelector(selector);
            var replacement = fresh.querySelector(selector);
            if (current && replacement) current.innerHTML = replacement.innerHTML;
          });
          document.dispatchEvent(new CustomEvent("portal:refreshed"));
        })
        .catch(function () {})
        .then(function () {
          running = false;
          if (again) request();
        });
    }
    function request() {
      if (running) { again = true; return; }
      if (pending) return;
      var wait = Math.max(0, last + minInterval - Date.now());
      pending = setTimeout(run, wait);
    }
    return request;
  };
})();
