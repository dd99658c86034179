"use strict";

(() => {
  const POLL = 5000;
  const tbody = document.querySelector("#relays tbody");

  function render(data) {
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

  async function poll() {
    try {
      render(await gtun.api("GET", "/api/relays"));
      gtun.showError("");
      gtun.ready();
    } catch (e) {
      gtun.showError(e.message);
    } finally {
      setTimeout(poll, POLL);
    }
  }

  poll();
})();
