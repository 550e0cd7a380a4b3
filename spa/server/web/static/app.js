// The dashboard's only script (served by the application itself; no CDN).
// Lease countdowns tick every second; the lease table refreshes from
// /api/leases every two seconds, so a grant appears without a reload.
// Cells are filled with textContent, never HTML.
"use strict";
(function () {
  const table = document.getElementById("leases");
  if (!table) return;
  const body = table.querySelector("tbody");
  const empty = document.getElementById("no-leases");
  const count = document.getElementById("count-leases");
  // the server's clock minus ours, so a skewed browser still counts right
  let skew = parseFloat(table.dataset.now) - Date.now() / 1000;

  function left(expires) {
    return Math.max(0, Math.round(expires - (Date.now() / 1000 + skew)));
  }
  function format(s) {
    const m = Math.floor(s / 60), r = s % 60;
    return m > 0 ? m + " min " + String(r).padStart(2, "0") + " s" : r + " s";
  }
  function tick() {
    for (const cell of body.querySelectorAll("td.countdown")) {
      const s = left(parseFloat(cell.dataset.expires));
      cell.textContent = s > 0 ? format(s) : "closing";
      cell.classList.toggle("soon", s <= 10);
    }
  }
  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }
  function render(data) {
    skew = data.now - Date.now() / 1000;
    const rows = [];
    for (const lease of data.leases) {
      const row = document.createElement("tr");
      cell(row, lease.address);
      cell(row, lease.service);
      cell(row, lease.clients.join(", "));
      const td = cell(row, "");
      td.className = "countdown";
      td.dataset.expires = String(lease.expires);
      rows.push(row);
    }
    body.replaceChildren(...rows);
    if (empty) empty.hidden = rows.length > 0;
    if (count) count.textContent = String(rows.length);
    tick();
  }
  async function refresh() {
    try {
      const answer = await fetch("/api/leases", { credentials: "same-origin" });
      if (answer.status === 401) { window.location = "/login"; return; }
      if (answer.ok) render(await answer.json());
    } catch (e) { /* the server restarts: try again next time */ }
  }
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, 2000);
})();
