// The peers page: the table is built once and its cells updated in place every
// POLL ms, rows keyed by name, so that 1,000 peers stay cheap; each row keeps the
// last SPARK rate samples for its sparkline (client side only).
"use strict";

(() => {
  const POLL = 2000;
  const SPARK = 60;
  const W = 120;
  const H = 24;
  const rows = new Map();
  const tbody = document.querySelector("#peers tbody");
  const filter = document.getElementById("filter");

  function makeRow(p) {
    const tr = gtun.el("tr", { class: "peer", "data-name": p.name });
    const cells = {};
    for (const c of ["name", "address", "state", "relay", "endpoint", "handshake", "rate", "today", "month", "graph"]) {
      cells[c] = gtun.el("td", { class: c });
      tr.appendChild(cells[c]);
    }
    const link = gtun.el("a", { class: "peer-link", href: `/peer/${encodeURIComponent(p.name)}` }, p.name);
    cells.name.appendChild(link);
    const spark = gtun.svg("svg", { class: "spark", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
    const lineIn = gtun.svg("polyline", { class: "in", points: "" });
    const lineOut = gtun.svg("polyline", { class: "out", points: "" });
    spark.append(lineIn, lineOut);
    cells.graph.appendChild(spark);
    return { tr, cells, lineIn, lineOut, ins: [], outs: [], key: "" };
  }

  function points(values, max) {
    const step = W / (SPARK - 1);
    const off = SPARK - values.length;
    let s = "";
    for (let i = 0; i < values.length; i += 1) {
      const y = H - 1 - (values[i] / max) * (H - 2);
      s += `${((off + i) * step).toFixed(1)},${y.toFixed(1)} `;
    }
    return s;
  }

  function update(r, p, now) {
    const c = r.cells;
    r.tr.dataset.rx = String(p.rx_bytes);
    r.tr.dataset.tx = String(p.tx_bytes);
    gtun.set(c.address, [p.address, p.address6].filter(Boolean).join(", ") || "-");
    const state = !p.enabled ? "disabled" : p.online ? "online" : "offline";
    gtun.set(c.state, state);
    const cls = `state st-${state}`;
    if (c.state.className !== cls) c.state.className = cls;
    c.state.title = p.enabled ? p.kind || "" : `disabled (${p.disabled_reason || "admin"})`;
    gtun.set(c.relay, p.relay || "-");
    gtun.set(c.endpoint, p.endpoint ? `${p.endpoint}${p.transport ? ` ${p.transport}` : ""}` : "-");
    gtun.set(c.handshake, gtun.ago(p.last_handshake, now));
    gtun.set(c.rate, `${gtun.rate(p.rate_in)} / ${gtun.rate(p.rate_out)}`);
    gtun.set(c.today, `${gtun.bytes(p.today.rx)} / ${gtun.bytes(p.today.tx)}`);
    let month = `${gtun.bytes(p.month.rx + p.month.tx)}`;
    if (p.quota !== null && p.quota !== undefined) month += ` of ${gtun.bytes(p.quota)}`;
    gtun.set(c.month, month);
    r.ins.push(p.rate_in);
    r.outs.push(p.rate_out);
    if (r.ins.length > SPARK) {
      r.ins.shift();
      r.outs.shift();
    }
    const max = Math.max(1, ...r.ins, ...r.outs);
    r.lineIn.setAttribute("points", points(r.ins, max));
    r.lineOut.setAttribute("points", points(r.outs, max));
  }

  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    for (const r of rows.values()) {
      const text = `${r.tr.dataset.name} ${r.cells.address.textContent}`.toLowerCase();
      r.tr.hidden = q !== "" && !text.includes(q);
    }
  }

  function render(data) {
    const seen = new Set();
    let added = false;
    let online = 0;
    for (const p of data.peers) {
      seen.add(p.name);
      let r = rows.get(p.name);
      if (!r) {
        r = makeRow(p);
        rows.set(p.name, r);
        added = true;
      }
      update(r, p, data.time);
      if (p.online) online += 1;
    }
    for (const [name, r] of rows) {
      if (!seen.has(name)) {
        r.tr.remove();
        rows.delete(name);
      }
    }
    if (added) {
      const frag = document.createDocumentFragment();
      for (const p of data.peers) frag.appendChild(rows.get(p.name).tr);
      tbody.appendChild(frag);
      applyFilter();
    }
    gtun.set(document.getElementById("summary"), `${data.peers.length} peers, ${online} online`);
  }


  filter.addEventListener("input", applyFilter);
  gtun.poll("/api/peers", render, POLL);
})();
