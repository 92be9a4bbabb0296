// Positions with live portfolio Greeks: one WebSocket (protocol v1), {"action": "positions"},
// the whole document redrawn at each push (docs/websocket-protocol.md, docs/paper-trading.md).
"use strict";

(function () {
  const cfg = JSON.parse(document.getElementById("positions-config").textContent);
  const $ = (id) => document.getElementById(id);
  const inr = new Intl.NumberFormat("en-IN", { maximumFractionDigits: 2 });
  const istTime = new Intl.DateTimeFormat("en-IN", {
    timeZone: "Asia/Kolkata", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  let attempt = 0;

  const num = (v, digits) => (v === null || v === undefined ? "—" : inr.format(Number(v.toFixed(digits))));

  function cell(tr, text, signed) {
    const td = document.createElement("td");
    td.textContent = text;
    if (signed !== undefined && signed !== null) td.className = signed < 0 ? "neg" : signed > 0 ? "pos" : "";
    tr.appendChild(td);
    return td;
  }

  function totalsRow(tbody, label, t) {
    const tr = document.createElement("tr");
    if (!t.complete) tr.className = "incomplete";
    cell(tr, label);
    cell(tr, String(t.positions));
    cell(tr, num(t.delta_rs, 2), t.delta_rs);
    cell(tr, num(t.gamma_rs, 4), t.gamma_rs);
    cell(tr, num(t.theta_rs, 2), t.theta_rs);
    cell(tr, num(t.vega_rs, 2), t.vega_rs);
    cell(tr, num(t.pnl, 2), t.pnl);
    cell(tr, "");
    tbody.appendChild(tr);
  }

  function table(headers) {
    const t = document.createElement("table");
    const head = t.createTHead().insertRow();
    headers.forEach((h) => { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); });
    return [t, t.createTBody()];
  }

  function draw(doc) {
    const totals = $("totals").tBodies[0];
    totals.replaceChildren();
    Object.entries(doc.by_underlying).forEach(([name, t]) => totalsRow(totals, name, t));
    totalsRow(totals, "all", doc.total);
    const missing = $("missing");
    missing.hidden = doc.missing.length === 0;
    missing.querySelector("ul").replaceChildren(...doc.missing.map((m) => {
      const li = document.createElement("li");
      li.textContent = `${m.tradingsymbol} (account ${m.account_id}): ${m.reason}`;
      return li;
    }));
    const box = $("accounts");
    box.replaceChildren();
    let rows = 0;
    doc.accounts.forEach((a) => {
      const h = document.createElement("h2");
      h.textContent = `${a.label}${a.is_paper ? " (paper)" : ""}`;
      box.appendChild(h);
      if (a.error) {
        const p = document.createElement("p");
        p.className = "note";
        p.textContent = a.error;
        box.appendChild(p);
      }
      const [t, body] = table(["instrument", "product", "lots", "qty", "ltp", "P&L ₹", "delta ₹", "gamma ₹", "theta ₹/day", "vega ₹/pt", ""]);
      a.positions.forEach((p) => {
        rows += 1;
        const tr = body.insertRow();
        const g = p.greeks_rs || {};
        cell(tr, `${p.exchange}:${p.tradingsymbol}`);
        cell(tr, p.product);
        cell(tr, num(p.lots, 2), p.lots);
        cell(tr, String(p.quantity));
        cell(tr, num(p.ltp, 2));
        cell(tr, num(p.pnl, 2), p.pnl);
        cell(tr, num(g.delta, 2), g.delta);
        cell(tr, num(g.gamma, 4), g.gamma);
        cell(tr, num(g.theta, 2), g.theta);
        cell(tr, num(g.vega, 2), g.vega);
        cell(tr, p.missing ? `no Greeks: ${p.missing}` : "");
      });
      box.appendChild(t);
    });
    $("empty").hidden = rows > 0;
    $("updated").textContent = "updated " + istTime.format(new Date());
  }

  function badge(state) {
    const b = $("conn-badge");
    b.className = "badge conn-" + state;
    b.textContent = state;
  }

  function connect() {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + cfg.wsPath;
    const sock = new WebSocket(url, ["tickerproj.v1"]);
    sock.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "hello") {
        attempt = 0;
        badge("open");
        sock.send(JSON.stringify({ action: "positions", id: "page" }));
      } else if (msg.type === "positions") {
        draw(msg.data);
      } else if (msg.type === "error" && msg.code === "unauthorized") {
        location.href = cfg.loginUrl;
      }
    };
    sock.onclose = () => {
      badge("closed");
      attempt += 1;
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt) * (0.5 + Math.random() / 2);
      setTimeout(connect, delay);
    };
  }

  connect();
})();
