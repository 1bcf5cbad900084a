// Policy editor: live slider read-outs, the mode switch, and picking a band from the curve.
// No inline script (CSP): everything hangs off ids and data-* attributes in the page.
(() => {
  "use strict";

  function formatValue(input, output) {
    const v = parseFloat(input.value);
    if (Number.isNaN(v)) return;
    if (output.dataset.format === "pct") {
      output.textContent = `${(v * 100).toFixed(1)}%`;
    } else {
      output.textContent = v.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
    }
  }

  function syncOutputs(root) {
    root.querySelectorAll("input[type=range]").forEach((input) => {
      const output = document.getElementById(`${input.id}-out`);
      if (output) formatValue(input, output);
    });
  }

  function syncMode(form) {
    const checked = form.querySelector("input[name=mode]:checked");
    const mode = checked ? checked.value : "threshold";
    form.querySelectorAll("[data-mode]").forEach((box) => {
      box.hidden = box.dataset.mode !== mode;
    });
  }

  function pickThreshold(form, value) {
    const threshold = form.querySelector("input[name=mode][value=threshold]");
    if (threshold) threshold.checked = true;
    form.querySelectorAll("input[type=checkbox][name^=auto_]").forEach((box) => { box.checked = true; });
    form.querySelectorAll("input[type=range][name^=thr_]").forEach((input) => { input.value = value; });
    syncMode(form);
    syncOutputs(form);
    // Tell htmx (listening on the form) that the candidate changed.
    form.dispatchEvent(new Event("change", { bubbles: true }));
  }

  function init() {
    const form = document.getElementById("policy-form");
    if (!form) return;
    syncMode(form);
    syncOutputs(form);
    form.addEventListener("input", (event) => {
      const input = event.target;
      if (input.type === "range") {
        const output = document.getElementById(`${input.id}-out`);
        if (output) formatValue(input, output);
      }
      if (input.name === "mode") syncMode(form);
    });
    form.addEventListener("change", (event) => {
      if (event.target && event.target.name === "mode") syncMode(form);
    });
    document.addEventListener("click", (event) => {
      const point = event.target.closest ? event.target.closest("[data-threshold]") : null;
      if (!point) return;
      event.preventDefault();
      pickThreshold(form, point.dataset.threshold);
    });
  }

  document.addEventListener("htmx:responseError", (event) => {
    const box = document.getElementById("htmx-error");
    if (!box) return;
    box.hidden = false;
    box.textContent = `The what-if could not be computed (${event.detail.xhr.status}).`;
  });
  document.addEventListener("htmx:afterSwap", () => {
    const box = document.getElementById("htmx-error");
    if (box) box.hidden = true;
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
