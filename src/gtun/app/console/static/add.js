// Add a stock WireGuard peer: its configuration and QR code, shown once.
"use strict";

(() => {
  const error = document.getElementById("add-error");
  let url = null;

  document.getElementById("add-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("new-name").value.trim();
    const button = document.getElementById("create");
    error.textContent = "";
    button.disabled = true;
    try {
      const answer = await gtun.api("POST", "/api/peers", { name });
      document.getElementById("config").textContent = answer.config;
      const img = document.getElementById("qr");
      if (answer.qr) img.src = answer.qr;
      img.hidden = !answer.qr;
      if (url) URL.revokeObjectURL(url);
      url = URL.createObjectURL(new Blob([answer.config], { type: "text/plain" }));
      const a = document.getElementById("download");
      a.href = url;
      a.download = `${answer.name}.conf`;
      document.getElementById("add-note").textContent = answer.note || "";
      document.getElementById("result").hidden = false;
      document.getElementById("new-name").value = "";
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });

  gtun.session().then(gtun.ready, (e) => gtun.showError(e.message));
})();
