// Bar charts of a peer's history as SVG: rx and tx side by side per bar, buckets
// summed into at most `bars` bars.
"use strict";

const charts = (() => {
  const H = 160;
  const TOP = 14;
  const BOTTOM = 16;

  function bucketize(buckets, start, end, bars) {
    const width = (end - start) / bars;
    const rx = new Array(bars).fill(0);
    const tx = new Array(bars).fill(0);
    for (const [t, r, x] of buckets) {
      const i = Math.floor((t - start) / width);
      if (i >= 0 && i < bars) {
        rx[i] += r;
        tx[i] += x;
      }
    }
    return { rx, tx, width };
  }

  function label(text, x, y, anchor) {
    const t = gtun.svg("text", { x, y, "text-anchor": anchor || "start", class: "label" });
    t.textContent = text;
    return t;
  }

  function draw(svgNode, buckets, start, end, bars, stamp) {
    // Drawn at the element's own width, so that the labels keep their shape.
    const W = Math.max(200, Math.round(svgNode.getBoundingClientRect().width) || 600);
    svgNode.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const { rx, tx } = bucketize(buckets, start, end, bars);
    const max = Math.max(1, ...rx, ...tx);
    const slot = W / bars;
    const bw = Math.max(0.5, slot / 2 - 0.5);
    const plot = H - TOP - BOTTOM;
    while (svgNode.firstChild) svgNode.removeChild(svgNode.firstChild);
    svgNode.appendChild(gtun.svg("line", { x1: 0, y1: H - BOTTOM, x2: W, y2: H - BOTTOM, class: "axis" }));
    let total = 0;
    for (let i = 0; i < bars; i += 1) {
      total += rx[i] + tx[i];
      for (const [v, cls, dx] of [[rx[i], "rx", 0], [tx[i], "tx", bw]]) {
        if (!v) continue;
        const h = Math.max(1, (v / max) * plot);
        const rect = gtun.svg("rect", {
          x: (i * slot + dx).toFixed(1), y: (H - BOTTOM - h).toFixed(1),
          width: bw.toFixed(1), height: h.toFixed(1), class: cls,
        });
        const tip = gtun.svg("title");
        tip.textContent = `${stamp(start + (i * (end - start)) / bars)}: ${cls === "rx" ? "in" : "out"} ${gtun.bytes(v)}`;
        rect.appendChild(tip);
        svgNode.appendChild(rect);
      }
    }
    svgNode.appendChild(label(`max ${gtun.bytes(max)} per bar`, 2, 11));
    svgNode.appendChild(label(`total ${gtun.bytes(total)}`, W - 2, 11, "end"));
    svgNode.appendChild(label(stamp(start), 2, H - 3));
    svgNode.appendChild(label(stamp(end), W - 2, H - 3, "end"));
  }

  return { draw };
})();
