// What every page of the console shares: the API call with the session's CSRF
// token, human units, and the nav's log-out button.
"use strict";

const gtun = (() => {
  let csrf = null;

  // A 401: the session is gone (expired, logged out, the relay restarted).
  function toLogin(r) {
    if (r.status === 401) {
      location.href = "/login";
      throw new Error("not logged in");
    }
  }

  async function session() {
    const r = await fetch("/api/session", { credentials: "same-origin" });
    toLogin(r);
    csrf = (await r.json()).csrf;
    return csrf;
  }

  async function api(method, path, body) {
    const headers = {};
    if (method !== "GET") {
      headers["X-CSRF-Token"] = csrf || (await session());
    }
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    toLogin(r);
    let data = null;
    try {
      data = await r.json();
    } catch (e) {
      data = null;
    }
    if (!r.ok) {
      throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
    }
    return data;
  }

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function bytes(n) {
    let v = Number(n) || 0;
    let i = 0;
    while (v >= 1024 && i < UNITS.length - 1) {
      v /= 1024;
      i += 1;
    }
    return i === 0 ? `${Math.round(v)} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${UNITS[i]}`;
  }

  function rate(n) {
    return `${bytes(n)}/s`;
  }

  function ago(t, now) {
    if (t === null || t === undefined) return "never";
    const s = Math.max(0, Math.round((now || Date.now() / 1000) - t));
    if (s < 120) return `${s} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  function when(t) {
    if (t === null || t === undefined) return "-";
    return new Date(t * 1000).toLocaleString();
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  function set(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function ready() {
    if (document.body.dataset.ready !== "1") performance.mark("gtun-ready"); // for bench/
    document.body.dataset.ready = "1";
  }

  function showError(message) {
    const p = document.getElementById("error");
    if (!p) return;
    p.hidden = !message;
    p.textContent = message || "";
  }

  function parseSize(text) {
    const t = text.trim().toLowerCase();
    if (t === "" || t === "none" || t === "off") return null;
    const m = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$/.exec(t);
    if (!m) throw new Error(`${text} is not a size (e.g. 50G, 500M, none)`);
    const power = "bkmgtp".indexOf(m[2] || "b");
    return Math.round(Number(m[1]) * 1024 ** power);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("logout");
    if (out) {
      out.addEventListener("click", async () => {
        try {
          await api("POST", "/api/logout");
        } finally {
          location.href = "/login";
        }
      });
    }
  });

  // GET `path` and give the answer to `render` (the page is ready after the first),
  // or show what failed.
  async function show(path, render) {
    try {
      render(await api("GET", path));
      showError("");
      ready();
    } catch (e) {
      showError(e.message);
    }
  }

  // show() every `ms`, each after the last one ended.
  function poll(path, render, ms) {
    const tick = async () => {
      await show(path, render);
      setTimeout(tick, ms);
    };
    tick();
  }

  return { api, session, bytes, rate, ago, when, el, svg, set, ready, showError, parseSize, show, poll };
})();
