// relay console: live regions and "select all". Loaded from relay itself (the CSP allows no inline script).
"use strict";

// An element with data-refresh="URL" has its content replaced by GET URL (an HTML fragment) every
// data-every milliseconds, so lists and timelines stay current without reloading the page. A 401 means
// the session ended: reload, which leads to the login page.
function startRefresh(el) {
  const every = Number(el.dataset.every || 2000);
  const tick = async () => {
    if (!document.hidden && !el.contains(document.activeElement)) {
      try {
        const response = await fetch(el.dataset.refresh, {credentials: "same-origin", cache: "no-store"});
        if (response.status === 401) { window.location.reload(); return; }
        if (response.ok) { el.innerHTML = await response.text(); }
      } catch (e) { /* relay restarting: try again next tick */ }
    }
    window.setTimeout(tick, every);
  };
  window.setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(startRefresh);
  document.querySelectorAll("[data-select-all]").forEach((box) => {
    box.addEventListener("change", () => {
      const name = box.dataset.selectAll;
      box.form.querySelectorAll(`input[type=checkbox][name="${name}"]`).forEach((item) => { item.checked = box.checked; });
    });
  });
});
