"use strict";

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = document.getElementById("login-error");
  const button = document.getElementById("login");
  out.textContent = "";
  button.disabled = true;
  try {
    const r = await fetch("/api/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify({ password: document.getElementById("password").value }),
    });
    if (r.ok) {
      location.href = "/";
      return;
    }
    let message = `${r.status} ${r.statusText}`;
    try {
      message = (await r.json()).error || message;
    } catch (e) {
      // keep the status line
    }
    if (r.status === 429) {
      message = `Too many failed logins: wait ${r.headers.get("Retry-After") || "a while"} s.`;
    }
    out.textContent = message;
  } catch (e) {
    out.textContent = `The relay does not answer: ${e.message}`;
  } finally {
    button.disabled = false;
  }
});
