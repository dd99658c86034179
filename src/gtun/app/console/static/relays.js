"use strict";

(() => {
  const POLL = 5000;
  const tbody = document.querySelector("#relays tbody");
  // Throughput from the counters' changes: another relay's come from its stats in the
  // store, written every 10 s, so a rate spans the time between two changes.
  const last = new Map(); // name -> {t, rx, tx, rateIn, rateOut}
  const STILL = 30; // seconds without a change: nothing flows

  function throughput(r, now) {
    const prev = last.get(r.name);
    if (!prev || r.rx_bytes < prev.rx || r.tx_bytes < prev.tx) {
      last.set(r.name, { t: now, rx: r.rx_bytes, tx: r.tx_bytes, rateIn: null, rateOut: null });
      return "-";
    }
    if (r.rx_bytes !== prev.rx || r.tx_bytes !== prev.tx) {
      const dt = Math.max(now - prev.t, 0.001);
      last.set(r.name, {
        t: now, rx: r.rx_bytes, tx: r.tx_bytes,
        rateIn: (r.rx_bytes - prev.rx) / dt, rateOut: (r.tx_bytes - prev.tx) / dt,
      });
    } else if (now - prev.t > STILL) {
      prev.rateIn = 0;
      prev.rateOut = 0;
    }
    const cur = last.get(r.name);
    return cur.rateIn === null ? "-" : `${gtun.rate(cur.rateIn)} / ${gtun.rate(cur.rateOut)}`;
  }

  function render(data) {
    const now = Date.now() / 1000;
    const frag = document.createDocumentFragment();
    for (const r of data.relays) {
      const tr = gtun.el("tr", { class: "relay", "data-name": r.name });
      const state = r.alive ? "alive" : "silent";
      const mesh = Object.entries(r.mesh || {}).map(([n, up]) => `${n} ${up ? "up" : "down"}`).join(", ");
      const cells = [
        [`${r.name}${r.this ? " (this one)" : ""}`, "name"],
        [r.alive ? "alive" : `silent ${r.seen_age === null ? "" : `${Math.round(r.seen_age)} s`}`, `state st-${r.alive ? "online" : "offline"}`],
        [r.endpoint || "-", "endpoint"],
        [String(r.peers), "num"],
        [String(r.handshakes), "num"],
        [gtun.bytes(r.rx_bytes), "num"],
        [gtun.bytes(r.tx_bytes), "num"],
        [throughput(r, now), "num rate"],
        [String(r.drops), "num"],
        [r.store_up === null || r.store_up === undefined ? "-" : r.store_up ? "up" : "down", "store"],
        [mesh || "-", "mesh"],
        [r.public_key || "-", "key"],
      ];
      for (const [text, cls] of cells) tr.appendChild(gtun.el("td", { class: cls }, text));
      tr.dataset.state = state;
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
  }

  gtun.poll("/api/relays", render, POLL);
})();
