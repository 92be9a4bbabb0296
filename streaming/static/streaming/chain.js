// The live option chain: one WebSocket (protocol v1, docs/websocket-protocol.md), cells
// updated in place, every snapshots frame acknowledged after it is drawn (the server's
// credit-based flow control: a hidden or slow tab simply gets the latest state later).
// The chain's analytics (header, OI change and build-up per row) and the underlying's
// 1-minute bars come over the same socket; the charts are chain-charts.js's.
"use strict";

(function () {
  const cfg = JSON.parse(document.getElementById("chain-config").textContent);
  const $ = (id) => document.getElementById(id);
  const SIDES = ["ce", "pe"];
  // Column order per side, mirrored around the strike (calls read right-to-left).
  const FIELDS_CE = ["flags", "buildup", "oi_change", "oi", "volume", "vega", "theta", "gamma", "delta",
                     "iv", "bid", "ask", "change", "ltp"];
  const FIELDS_PE = FIELDS_CE.slice().reverse();
  const STALE_MS = 10000;
  const PING_MS = 20000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  const inr = new Intl.NumberFormat("en-IN");
  const istTime = new Intl.DateTimeFormat("en-IN", {
    timeZone: "Asia/Kolkata", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });
  const fmt = {
    ltp: (v) => v.toFixed(2),
    change: (v) => (v > 0 ? "+" : "") + v.toFixed(2),
    oi: (v) => inr.format(v),
    volume: (v) => inr.format(v),
    iv: (v) => (v * 100).toFixed(2),
    delta: (v) => v.toFixed(3),
    gamma: (v) => v.toFixed(5),
    theta: (v) => v.toFixed(2),
    vega: (v) => v.toFixed(2),
  };
  // A price with its quantity below it: the best bid or ask of the snapshot.
  const QUOTES = { bid: "bid_qty", ask: "ask_qty" };
  // Short labels keep the row narrow; the tooltip has the full name.
  const BUILDUP = {
    long_buildup: { label: "long BU", hint: "long build-up: price up, OI up" },
    short_buildup: { label: "short BU", hint: "short build-up: price down, OI up" },
    long_unwinding: { label: "long unw.", hint: "long unwinding: price down, OI down" },
    short_covering: { label: "short cov.", hint: "short covering: price up, OI down" },
  };
  // Not an engine flag: the snapshot's rest_fallback field (absent means false).
  const REST_FLAG = {
    label: "REST", failure: false, rest: true,
    hint: "polled from Kite's quote API while the stream is stalled or reconnecting",
  };
  const SUMMARY = {
    pcr_oi: (v) => v.toFixed(2),
    pcr_volume: (v) => v.toFixed(2),
    max_pain: (v) => inr.format(v),
    atm_strike: (v) => inr.format(v),
    atm_iv: (v) => (v * 100).toFixed(2) + " %",
    straddle: (v) => "₹" + v.toFixed(2),
    forward: (v) => v.toFixed(2),
    days_to_expiry: (v) => v.toFixed(v < 10 ? 2 : 1),
    lot_size: (v) => inr.format(v),
    iv_rank: (v) => v.toFixed(1),
    iv_percentile: (v) => v.toFixed(1),
    oi_change_since: (v) => istTime.format(new Date(v)).slice(0, 5) + " IST",
  };

  // token -> {row, side}; strike -> row; row = {tr, strike, cells: {ce: {...}, pe: {...}}}
  let byToken = new Map();
  let rows = [];
  let atmRow = null;
  let forward = null;
  let scrolledToAtm = false;
  let subscribedParts = [];

  const pending = new Map(); // token -> latest item not yet drawn
  let lastSeq = 0;
  let ackedSeq = 0;
  let renderScheduled = false;
  let lastDataAt = 0;
  let feedMock = null;

  const restTokens = new Set(); // tokens whose latest snapshot came from the REST fallback
  const charts = cfg.underlying && cfg.expiry ? makeCharts() : null;

  let ws = null;
  let attempt = 0;
  let reconnectTimer = null;
  let pingSentAt = 0;
  let stopped = false;

  function makeCharts() {
    if (window.echarts) return new window.ChainCharts({ expiry: cfg.expiry });
    // The table works without the charting library; say what is missing instead of breaking.
    const section = document.querySelector("section.charts");
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "The charts cannot be drawn: the server lacks static/vendor/echarts/echarts.min.js (run `make install`).";
    section.replaceChildren(p);
    const ignore = () => {};
    return {
      setQuote: ignore, setStrikes: ignore, setForward: ignore, setTermStructure: ignore,
      setSeries: ignore, addSeriesPoint: ignore, setBars: ignore, addBar: ignore, noBars: ignore,
      flush: ignore,
    };
  }

  // --- header controls --------------------------------------------------------------------

  const pickers = $("pickers");
  pickers.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => {
    // A new underlying has other expiries: let the server pick its nearest one.
    if (s.name === "underlying") pickers.elements.expiry.disabled = true;
    pickers.submit();
  }));

  function setBadge(id, cls, text, title) {
    const el = $(id);
    el.className = "badge " + cls;
    el.textContent = text;
    if (title !== undefined) el.title = title;
  }

  function showMessage(text) {
    const el = $("message");
    el.textContent = text;
    el.hidden = !text;
  }

  // --- table ------------------------------------------------------------------------------

  function buildTable(instruments, chain) {
    const body = $("chain-body");
    const strikes = new Map();
    for (const inst of instruments) {
      if ((inst.kind !== "CE" && inst.kind !== "PE") || inst.expiry !== cfg.expiry) continue;
      if (!strikes.has(inst.strike)) strikes.set(inst.strike, {});
      strikes.get(inst.strike)[inst.kind.toLowerCase()] = inst;
    }
    byToken = new Map();
    rows = [];
    atmRow = null;
    const frag = document.createDocumentFragment();
    for (const strike of [...strikes.keys()].sort((a, b) => a - b)) {
      const tr = document.createElement("tr");
      tr.dataset.strike = strike;
      const row = { tr, strike, cells: { ce: {}, pe: {} } };
      const pair = strikes.get(strike);
      const addSide = (side, fields) => {
        const inst = pair[side];
        for (const f of fields) {
          const td = document.createElement("td");
          td.dataset.side = side;
          td.dataset.field = f;
          if (f === "flags" || f === "buildup") td.className = f + " " + f + "-" + side;
          td.textContent = inst ? "" : "·";
          tr.appendChild(td);
          row.cells[side][f] = td;
        }
        if (inst) {
          byToken.set(inst.token, { row, side });
          if (!inst.streamed) {
            row.cells[side].flags.appendChild(flagBadge("not streamed",
              "no active subscription for this instrument", false));
          }
        }
      };
      addSide("ce", FIELDS_CE);
      const st = document.createElement("td");
      st.className = "strike";
      st.textContent = strike.toLocaleString("en-IN");
      tr.appendChild(st);
      addSide("pe", FIELDS_PE);
      rows.push(row);
      frag.appendChild(tr);
    }
    body.replaceChildren(frag);
    restTokens.clear();
    charts.setStrikes(rows.map((r) => r.strike));
    if (!rows.length) {
      body.innerHTML = '<tr><td colspan="29" class="empty">No options for this expiry.</td></tr>';
    }
    if (chain && chain.atm_strike != null) {
      setForward(forward ?? (chain.reference === "forward" ? chain.reference_price : null),
                 chain.atm_strike);
    }
    if (!scrolledToAtm && atmRow) {
      scrolledToAtm = true;
      atmRow.tr.scrollIntoView({ block: "center" });
    }
  }

  function flagBadge(label, hint, failure) {
    const span = document.createElement("span");
    span.className = "flag" + (failure ? " failure" : "");
    span.textContent = label;
    if (hint) span.title = hint;
    return span;
  }

  function setText(td, text) {
    if (td.textContent !== text) td.textContent = text;
  }

  function applyItem(item) {
    const where = byToken.get(item.token);
    if (item.forward != null && item.expiry === cfg.expiry) forward = item.forward;
    if (item.underlying != null) setText($("underlying-price"), item.underlying.toFixed(2));
    if (item.is_mock != null) feedMock = item.is_mock;
    if (!where) return;
    const cells = where.row.cells[where.side];
    for (const [f, qtyField] of Object.entries(QUOTES)) setQuote(cells[f], item[f], item[qtyField]);
    charts.setQuote(where.row.strike, where.side, { iv: item.iv, oi: item.oi });
    for (const f of Object.keys(fmt)) {
      const v = item[f];
      const td = cells[f];
      if (v == null || Number.isNaN(v)) {
        setText(td, "—");
        td.classList.add("na");
        continue;
      }
      td.classList.remove("na");
      if (f === "ltp") {
        const prev = parseFloat(td.dataset.value);
        if (!Number.isNaN(prev) && prev !== v) {
          td.classList.toggle("up", v > prev);
          td.classList.toggle("down", v < prev);
        }
        td.dataset.value = v;
      } else if (f === "change") {
        td.classList.toggle("up", v > 0);
        td.classList.toggle("down", v < 0);
      }
      setText(td, fmt[f](v));
    }
    const rest = item.rest_fallback === true;
    if (rest) restTokens.add(item.token);
    else restTokens.delete(item.token);
    const flagNames = (item.flags || []).concat(rest ? ["rest_fallback"] : []);
    const names = flagNames.join(",");
    const ft = cells.flags;
    if (ft.dataset.names !== names) {
      ft.dataset.names = names;
      ft.replaceChildren(...flagNames.map((n) => {
        const meta = n === "rest_fallback" ? REST_FLAG
          : cfg.flags[n] || { label: n.replaceAll("_", " "), hint: "", failure: true };
        const badge = flagBadge(meta.label, meta.hint, meta.failure);
        if (meta.rest) badge.classList.add("rest");
        return badge;
      }));
    }
  }

  function setQuote(td, price, qty) {
    if (price == null) {
      setText(td, "—");
      td.classList.add("na");
      return;
    }
    td.classList.remove("na");
    const key = price + "/" + qty;
    if (td.dataset.value === key) return;
    td.dataset.value = key;
    const q = document.createElement("small");
    q.textContent = qty == null ? "" : inr.format(qty);
    td.replaceChildren(price.toFixed(2), q);
  }

  // --- analytics --------------------------------------------------------------------------

  function applyAnalytics(msg) {
    const summary = msg.summary || {};
    document.querySelectorAll("#analytics dd[data-summary]").forEach((dd) => {
      const key = dd.dataset.summary;
      const v = summary[key];
      let text = v == null || Number.isNaN(v) ? "—" : SUMMARY[key](v);
      if (key === "forward" && v != null && summary.forward_source) {
        text += " · " + summary.forward_source;
        if (summary.forward_stale) text += " (stale)";
      }
      setText(dd, text);
      dd.classList.toggle("na", v == null);
      const box = dd.parentElement;
      if (box.classList.contains("history")) {
        box.hidden = v == null;
        box.title = summary.iv_window_days ? "over the last " + summary.iv_window_days + " days of ATM IV" : "";
      }
    });
    for (const r of msg.rows || []) {
      for (const side of SIDES) {
        const quote = r[side];
        const where = quote && byToken.get(quote.token);
        if (!where) continue;
        const cells = where.row.cells[where.side];
        setOiChange(cells.oi_change, quote.oi_change);
        setBuildup(cells.buildup, quote.buildup);
        charts.setQuote(where.row.strike, where.side, { oi_change: quote.oi_change });
      }
    }
    if (msg.term_structure) charts.setTermStructure(msg.term_structure);
    if (msg.ts != null) {
      charts.addSeriesPoint({
        ts: msg.ts, atm_iv: summary.atm_iv, straddle: summary.straddle, pcr_oi: summary.pcr_oi,
      });
    }
  }

  function setOiChange(td, v) {
    if (v == null) {
      setText(td, "—");
      td.classList.add("na");
      return;
    }
    td.classList.remove("na");
    td.classList.toggle("up", v > 0);
    td.classList.toggle("down", v < 0);
    setText(td, (v > 0 ? "+" : "") + inr.format(v));
  }

  function setBuildup(td, name) {
    if ((td.dataset.value || "") === (name || "")) return;
    td.dataset.value = name || "";
    const meta = BUILDUP[name];
    if (!meta) {
      td.replaceChildren();
      return;
    }
    const span = flagBadge(meta.label, meta.hint, false);
    span.classList.add("buildup-tag", name);
    td.replaceChildren(span);
  }

  function setForward(value, atmStrike) {
    if (value != null) setText($("forward"), value.toFixed(2));
    let best = null;
    if (atmStrike != null) {
      best = rows.find((r) => r.strike === atmStrike) || null;
    } else if (value != null && rows.length) {
      best = rows.reduce((a, r) => (Math.abs(r.strike - value) < Math.abs(a.strike - value) ? r : a));
    }
    if (best && best !== atmRow) {
      if (atmRow) atmRow.tr.classList.remove("atm");
      best.tr.classList.add("atm");
      atmRow = best;
      setText($("atm"), best.strike.toLocaleString("en-IN"));
    }
    const ref = value ?? (atmRow ? atmRow.strike : null);
    if (ref == null) return;
    for (const r of rows) {
      const callItm = r.strike < ref;
      for (const td of Object.values(r.cells.ce)) td.classList.toggle("itm", callItm);
      for (const td of Object.values(r.cells.pe)) td.classList.toggle("itm", r.strike > ref);
    }
  }

  function render() {
    renderScheduled = false;
    let latestTs = 0;
    for (const item of pending.values()) {
      applyItem(item);
      if (item.exchange_ts > latestTs) latestTs = item.exchange_ts;
    }
    pending.clear();
    if (forward != null) setForward(forward, null);
    charts.setForward(forward, atmRow ? atmRow.strike : null);
    if (latestTs) {
      setText($("updated"), istTime.format(new Date(latestTs)) + " IST");
    }
    updateFeedBadge();
    // Acknowledge only what has been drawn: the server sends more when we are ready.
    if (lastSeq > ackedSeq && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ action: "ack", seq: lastSeq }));
      ackedSeq = lastSeq;
    }
  }

  function scheduleRender() {
    if (renderScheduled) return;
    renderScheduled = true;
    // A hidden tab gets no animation frames: it stops acking and the server keeps only the
    // latest state for it, which it draws when it becomes visible again.
    requestAnimationFrame(render);
  }

  function updateFeedBadge() {
    if (!lastDataAt) {
      setBadge("feed-badge", "feed-none", "no data");
    } else if (restTokens.size && Date.now() - lastDataAt <= STALE_MS) {
      setBadge("feed-badge", "feed-rest", "REST",
               restTokens.size + " instrument(s) polled from Kite's quote API while the stream is stalled");
    } else if (Date.now() - lastDataAt > STALE_MS) {
      setBadge("feed-badge", "feed-stale", "stale", "no update for more than " + STALE_MS / 1000 + " s");
    } else if (feedMock) {
      setBadge("feed-badge", "feed-mock", "MOCK", "mock market: synthetic prices (outside market hours or demo)");
    } else {
      setBadge("feed-badge", "feed-live", "LIVE", "live prices from Kite");
    }
  }

  // --- connection -------------------------------------------------------------------------

  function connect() {
    clearTimeout(reconnectTimer);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + cfg.wsPath;
    const sock = new WebSocket(url, ["tickerproj.v1"]);
    ws = sock;
    lastSeq = 0;
    ackedSeq = 0;
    pending.clear();
    sock.onmessage = (ev) => onMessage(sock, ev);
    sock.onclose = (ev) => onClose(sock, ev);
  }

  function onMessage(sock, ev) {
    if (sock !== ws) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    switch (msg.type) {
      case "snapshots":
        for (const item of msg.data) pending.set(item.token, item);
        lastSeq = msg.seq;
        lastDataAt = Date.now();
        scheduleRender();
        break;
      case "hello":
        // The chain (its snapshots and analytics) and the underlying's bars, in one subscribe.
        sock.send(JSON.stringify({
          action: "subscribe",
          id: "chain",
          chain: { underlying: cfg.underlying, expiry: cfg.expiry, strikes_around_atm: cfg.strikesAroundAtm },
          bars: [cfg.underlying],
        }));
        break;
      case "analytics":
        if (msg.underlying === cfg.underlying && msg.expiry === cfg.expiry) applyAnalytics(msg);
        break;
      case "analytics_series":
        if (msg.underlying === cfg.underlying && msg.expiry === cfg.expiry) charts.setSeries(msg.points);
        break;
      case "bars":
        if (msg.underlying === cfg.underlying) charts.setBars(msg.bars);
        break;
      case "bar":
        if (msg.underlying === cfg.underlying) charts.addBar(msg.bar);
        break;
      case "subscribed":
        // A large reply comes in parts; the table is built from all of them.
        if (msg.id === "chain") {
          if (msg.part === 1) subscribedParts = [];
          subscribedParts.push(...msg.instruments);
          if (msg.part !== msg.parts) break;
          buildTable(subscribedParts, msg.chain);
          subscribedParts = [];
          attempt = 0;
          showMessage("");
          setBadge("conn-badge", "conn-live", "live", "connected; receiving updates");
        }
        break;
      case "pong":
        setBadge("conn-badge", "conn-live", "live", "round trip " + (Date.now() - pingSentAt) + " ms");
        break;
      case "error":
        // An underlying without an index or equity has no bars: its chart says so, the rest works.
        if (msg.code === "unknown_underlying") charts.noBars(msg.message);
        else showMessage("Server: " + msg.message + " (" + msg.code + ")");
        break;
    }
  }

  function onClose(sock, ev) {
    if (sock !== ws) return;
    ws = null;
    if (ev.code === 4401) {
      stopped = true;
      setBadge("conn-badge", "conn-closed", "signed out");
      const el = $("message");
      el.hidden = false;
      el.replaceChildren("Your session has ended. ");
      const a = document.createElement("a");
      a.href = cfg.loginUrl;
      a.textContent = "Log in again";
      el.appendChild(a);
      return;
    }
    // Exponential backoff with jitter, so a restarted server is not hit by every tab at once.
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt) * (0.5 + Math.random() / 2);
    attempt += 1;
    setBadge("conn-badge", "conn-reconnecting", "reconnecting",
             "connection lost (" + ev.code + "); retrying in " + (delay / 1000).toFixed(1) + " s");
    reconnectTimer = setTimeout(connect, delay);
  }

  function tick() {
    updateFeedBadge();
    charts.flush();
    if (ws && ws.readyState === WebSocket.OPEN && Date.now() - pingSentAt > PING_MS) {
      pingSentAt = Date.now();
      ws.send(JSON.stringify({ action: "ping", id: pingSentAt }));
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && pending.size) render();
  });
  window.addEventListener("online", () => {
    if (!ws && !stopped) connect();
  });

  if (cfg.underlying && cfg.expiry) {
    connect();
    setInterval(tick, 1000);
  }
})();
