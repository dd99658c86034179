// One peer: its state and actions, charts of its history, its sources and drops.
"use strict";

(() => {
  const POLL = 5000;
  const name = document.body.dataset.name;
  const path = `/api/peers/${encodeURIComponent(name)}`;
  const note = document.getElementById("note");
  const time = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const date = (t) => new Date(t * 1000).toLocaleDateString([], { month: "short", day: "numeric" });

  function fill(tbody, rows) {
    const frag = document.createDocumentFragment();
    for (const cells of rows) {
      const tr = gtun.el("tr");
      for (const c of cells) tr.appendChild(gtun.el("td", {}, String(c)));
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
  }

  function render(p) {
    const now = Date.now() / 1000;
    const state = document.getElementById("state");
    state.textContent = p.enabled ? "enabled" : `disabled (${p.disabled_reason || "admin"})`;
    state.className = `badge ${p.enabled ? (p.online ? "st-online" : "st-offline") : "st-disabled"}`;
    // A [[peers]] entry is changed in its relay's config file, not here.
    const stored = p.source === "stored";
    document.getElementById("enable").disabled = p.enabled || !stored;
    document.getElementById("disable").disabled = !p.enabled || !stored;
    for (const id of ["remove", "quota", "set-quota"]) document.getElementById(id).disabled = !stored;
    const kept = document.getElementById("kept-note");
    if (kept) kept.textContent = stored ? "" : `In the [[peers]] of ${p.source === "config" ? "this relay's config file" : p.source.replace("config of ", "")}: change it there.`;
    const facts = [
      ["State", !p.enabled ? "disabled" : p.online ? "online" : "offline"],
      ["Address", [p.address, p.address6].filter(Boolean).join(", ") || "-"],
      ["Kind", p.kind || "-"],
      ["Kept", p.source],
      ["Relay", p.relay || "-"],
      ["Endpoint", p.endpoint ? `${p.endpoint} ${p.transport || ""}` : "-"],
      ["Last handshake", gtun.ago(p.last_handshake, now)],
      ["Now in / out", `${gtun.rate(p.rate_in)} / ${gtun.rate(p.rate_out)}`],
      ["Received / sent", `${gtun.bytes(p.rx_bytes)} / ${gtun.bytes(p.tx_bytes)}`],
      ["Today", `${gtun.bytes(p.today.rx)} in, ${gtun.bytes(p.today.tx)} out`],
      ["This month", `${gtun.bytes(p.month.rx + p.month.tx)}${p.quota !== null ? ` of ${gtun.bytes(p.quota)}` : ""}`],
      ["Public key", p.public_key],
    ];
    const dl = document.getElementById("facts");
    const frag = document.createDocumentFragment();
    for (const [k, v] of facts) frag.append(gtun.el("dt", {}, k), gtun.el("dd", {}, v));
    dl.replaceChildren(frag);
    const quota = document.getElementById("quota");
    if (document.activeElement !== quota) quota.value = p.quota === null ? "" : gtun.bytes(p.quota).replace(/ |iB/g, "");
    const minute = 60;
    const hour = 3600;
    const h0 = Math.floor(now / minute) * minute + minute;
    charts.draw(document.getElementById("chart-hour"), p.history.hour, h0 - hour, h0, 60, time);
    charts.draw(document.getElementById("chart-day"), p.history.day, h0 - 24 * hour, h0, 96, time);
    const d0 = Math.floor(now / hour) * hour + hour;
    charts.draw(document.getElementById("chart-month"), p.history.month, d0 - 31 * 24 * hour, d0, 31 * 4, date);
    fill(document.querySelector("#sources tbody"), p.sources.map((s) => [s.endpoint, s.transport, s.relay || "-", gtun.when(s.first_seen), gtun.when(s.last_seen)]));
    const drops = Object.entries(p.drops).filter(([, v]) => v).sort();
    fill(document.querySelector("#drops tbody"), drops.length ? drops : [["none", 0]]);
  }

  const load = () => gtun.show(path, render);

  async function act(method, suffix, body) {
    note.textContent = "";
    try {
      const answer = await gtun.api(method, path + suffix, body);
      note.textContent = answer.note || "";
      return true;
    } catch (e) {
      note.textContent = e.message;
      return false;
    } finally {
      await load();
    }
  }

  document.getElementById("enable").addEventListener("click", () => act("POST", "/enable"));
  document.getElementById("disable").addEventListener("click", () => act("POST", "/disable"));
  document.getElementById("remove").addEventListener("click", async () => {
    if (!confirm(`Remove peer ${name}? Its address is released and its configuration stops working.`)) return;
    try {
      await gtun.api("DELETE", path);
      location.href = "/";
    } catch (e) {
      note.textContent = e.message;
    }
  });
  document.getElementById("set-quota").addEventListener("click", () => {
    let quota;
    try {
      quota = gtun.parseSize(document.getElementById("quota").value);
    } catch (e) {
      note.textContent = e.message;
      return;
    }
    act("PUT", "/quota", { quota });
  });
  gtun.poll(path, render, POLL);
})();
