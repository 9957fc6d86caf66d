// Live overview: re-fetch the server-rendered fragment every few seconds while the tab
// is visible. No inline script anywhere, so the Content-Security-Policy can forbid it.
"use strict";
(function () {
  var live = document.querySelector("[data-live]");
  if (!live) return;
  var url = live.getAttribute("data-live");
  var every = 2000;
  function refresh() {
    if (document.hidden) return;
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { live.innerHTML = html; live.removeAttribute("data-stale"); })
      .catch(function () { live.setAttribute("data-stale", "true"); });
  }
  setInterval(refresh, every);
})();
