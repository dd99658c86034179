"use strict";

(() => {
  const box = document.getElementById("doctor");
  const rerun = document.getElementById("rerun");

  function render(data) {
    const frag = document.createDocumentFragment();
    if (data.error) frag.appendChild(gtun.el("p", { class: "error" }, data.error));
    for (const c of data.checks) {
      const div = gtun.el("div", { class: `check ${c.ok ? "ok" : "problem"}` });
      div.appendChild(gtun.el("span", { class: "verdict" }, c.ok ? "OK" : "PROBLEM"));
      div.appendChild(gtun.el("span", { class: "what" }, c.check));
      div.appendChild(gtun.el("span", { class: "detail" }, c.detail));
      if (c.fix) div.appendChild(gtun.el("code", { class: "fix" }, c.fix));
      frag.appendChild(div);
    }
    box.replaceChildren(frag);
    gtun.set(document.getElementById("doctor-ran"), `ran ${gtun.when(data.ran)}`);
  }

  async function load(fresh) {
    rerun.disabled = true;
    await gtun.show(`/api/doctor${fresh ? "?fresh=1" : ""}`, render);
    rerun.disabled = false;
  }

  rerun.addEventListener("click", () => load(true));
  load(false);
})();
