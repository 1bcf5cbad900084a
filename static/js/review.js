// Review pages. Work mode: keyboard shortcuts, an idempotency key and handling time per displayed item,
// a lease keep-alive, and retries of a verdict whose request failed (same key, so it is applied once).
// Queue page: row selection for bulk verdicts. Everything it needs is in the markup (no inline script).
(() => {
  "use strict";
  const RENEW_EVERY_MS = 60_000;
  const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000, 15000];
  let shownAt = performance.now();
  // The verdict request in flight or being retried: {path, values, attempt}.
  let pending = null;
  let retryTimer = null;

  function newKey() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    // crypto.randomUUID needs a secure context; getRandomValues does not.
    const bytes = window.crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const byId = (id) => document.getElementById(id);
  const currentItem = () => byId("review-item");

  // One persistent live region says what changed (the swapped-in region itself is not announced whole).
  function announce(root) {
    const box = byId("sr-announce");
    if (!box || !root) return;
    const notice = root.querySelector("#status-line .notice");
    const title = root.querySelector("h2");
    box.textContent = [notice && notice.textContent, title && title.textContent].filter(Boolean).join(" ").trim();
  }

  // Called for every item put on screen (first load and each htmx swap): a fresh key and clock.
  function prepareItem() {
    const item = currentItem();
    const empty = byId("review-empty");
    if (item && !item.dataset.prepared) {
      item.dataset.prepared = "1";
      announce(item);
      shownAt = performance.now();
      const keyInput = item.querySelector("input[name=idempotency_key]");
      if (keyInput) keyInput.value = newKey();
      item.focus({ preventScroll: true });
      window.scrollTo({ top: 0 });
    } else if (!item && empty && !empty.dataset.prepared) {
      empty.dataset.prepared = "1";
      announce(empty);
      empty.focus({ preventScroll: true });
    }
  }

  function csrfToken() {
    try {
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || "";
    } catch (_err) {
      return "";
    }
  }

  function showBox(id, text) {
    const box = byId(id);
    if (!box) return;
    box.textContent = text;
    box.hidden = !text;
  }

  function renewLease() {
    const item = currentItem();
    if (!item || !item.dataset.renewUrl || document.hidden) return;
    fetch(item.dataset.renewUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
    }).then((response) => {
      if (response.status === 409) {
        showBox("lease-warning", "Your claim on this item has expired; it may be given to someone else. Skip to get a fresh one.");
      } else if (response.ok) {
        showBox("lease-warning", "");
      }
    }).catch(() => { /* offline: the next ping retries; the lease outlives one missed ping */ });
  }

  function toggleHelp() {
    const dialog = byId("keys-help");
    if (!dialog) return;
    if (dialog.open) dialog.close();
    else dialog.showModal();
  }

  function isTyping(target) {
    if (!target || !(target instanceof Element)) return false;
    return target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName);
  }

  function click(selector) {
    const button = document.querySelector(selector);
    if (button && !button.disabled) {
      // A key pressed in the instant after a swap can beat htmx's processing of the new form; without
      // it the click would submit natively and reload the page. Processing twice is harmless.
      if (window.htmx) window.htmx.process(button.closest("form") || button);
      button.click();
      return true;
    }
    return false;
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || isTyping(event.target)) return;
    if (!byId("review-slot")) return;  // not the work page
    const dialog = byId("keys-help");
    if (event.key === "?") {
      event.preventDefault();
      toggleHelp();
      return;
    }
    if ((dialog && dialog.open) || pending) return;  // one answer at a time, retries included
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (key === "u") {
      if (click("#undo-button")) event.preventDefault();
      return;
    }
    if (!currentItem()) return;
    if (/^[1-9]$/.test(key)) {
      if (click(`#verdict-form button[data-key="${key}"]`)) event.preventDefault();
    } else if (key === "Enter") {
      // A focused button, link or disclosure keeps its own Enter behaviour.
      if (event.target instanceof Element && event.target.closest("button, a, summary")) return;
      const label = currentItem().dataset.predictedLabel;
      if (label && click(`#verdict-form button[data-label="${CSS.escape(label)}"]`)) event.preventDefault();
    } else if (key === "s") {
      if (click("#skip-button")) event.preventDefault();
    } else if (key === "e") {
      if (click("#escalate-button")) event.preventDefault();
    }
  });

  // --- Verdicts that survive a dropped connection ---------------------------------------------------

  function isVerdictRequest(detail) {
    // After a swap the form is gone and htmx reports on an ancestor: the request's own config still
    // names the element that sent it.
    const config = detail.requestConfig || detail;
    const elt = config.elt || detail.elt;
    const path = config.path || detail.path || "";
    if (elt && elt.id === "verdict-form") {
      // Skip and escalate buttons live in the same form but post elsewhere.
      return /\/verdict\/$/.test(path);
    }
    return Boolean(pending && pending.retrying && elt && elt.id === "review-slot" && path === pending.path);
  }

  document.addEventListener("htmx:configRequest", (event) => {
    const detail = event.detail;
    if (!detail.elt || detail.elt.id !== "verdict-form" || !/\/verdict\/$/.test(detail.path)) return;
    const form = detail.elt;
    if (!form.dataset.handlingMs) {
      form.dataset.handlingMs = String(Math.max(0, Math.round(performance.now() - shownAt)));
    }
    detail.parameters.handling_ms = form.dataset.handlingMs;
    const values = {};
    const source = detail.formData || detail.parameters;
    if (source && typeof source.forEach === "function") {
      source.forEach((value, name) => { values[name] = value; });
    }
    values.handling_ms = form.dataset.handlingMs;
    pending = { path: detail.path, values, attempt: 0, retrying: false };
  });

  function scheduleRetry(reason) {
    if (!pending) return;
    const delay = RETRY_DELAYS_MS[Math.min(pending.attempt, RETRY_DELAYS_MS.length - 1)];
    pending.attempt += 1;
    showBox("retry-status", `${reason} Your verdict is kept and will be sent again in ${Math.round(delay / 1000)} s (attempt ${pending.attempt}).`);
    window.clearTimeout(retryTimer);
    retryTimer = window.setTimeout(() => {
      if (!pending) return;
      pending.retrying = true;
      showBox("retry-status", "Sending your verdict again…");
      // The same values, so the same idempotency key: the server records the verdict at most once.
      window.htmx.ajax("POST", pending.path, {
        source: byId("review-slot"), target: "#review-slot", swap: "innerHTML", values: pending.values,
      });
    }, delay);
  }

  const onFailure = (reason) => (event) => {
    if (isVerdictRequest(event.detail)) scheduleRetry(reason);
  };
  document.addEventListener("htmx:sendError", onFailure("The connection dropped."));
  document.addEventListener("htmx:timeout", onFailure("The server did not answer in time."));
  document.addEventListener("htmx:responseError", (event) => {
    const status = event.detail.xhr ? event.detail.xhr.status : 0;
    if (status >= 500 && isVerdictRequest(event.detail)) {
      scheduleRetry(`The server answered ${status}.`);
    } else if (isVerdictRequest(event.detail)) {
      pending = null;  // a 4xx will not get better by repeating it
      showBox("retry-status", "");
    }
  });
  document.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.successful && isVerdictRequest(event.detail)) {
      pending = null;
      window.clearTimeout(retryTimer);
      showBox("retry-status", "");
      showBox("htmx-error", "");
    }
  });

  // --- Queue page: selection for bulk verdicts ------------------------------------------------------

  function updateSelection() {
    const boxes = Array.from(document.querySelectorAll("#queue-table .row-select"));
    const chosen = boxes.filter((b) => b.checked).length;
    const count = byId("bulk-count");
    if (count) count.textContent = `${chosen} selected`;
    const all = byId("select-all");
    if (all) {
      all.checked = boxes.length > 0 && chosen === boxes.length;
      all.indeterminate = chosen > 0 && chosen < boxes.length;
    }
  }

  document.addEventListener("change", (event) => {
    const target = event.target;
    if (!(target instanceof HTMLInputElement)) return;
    if (target.id === "select-all") {
      document.querySelectorAll("#queue-table .row-select").forEach((b) => { b.checked = target.checked; });
      updateSelection();
    } else if (target.classList.contains("row-select")) {
      updateSelection();
    }
  });

  document.addEventListener("click", (event) => {
    const cancel = event.target instanceof Element && event.target.closest("[data-bulk-cancel]");
    if (cancel) {
      event.preventDefault();
      const panel = byId("bulk-panel");
      if (panel) panel.replaceChildren();
    }
  });

  // A retry after a dropped connection must resend the same key: only a new item gets a new one.
  document.addEventListener("htmx:afterSettle", () => {
    prepareItem();
    updateSelection();
  });
  document.addEventListener("DOMContentLoaded", () => {
    prepareItem();
    updateSelection();
    const helpButton = byId("keys-help-button");
    if (helpButton) helpButton.addEventListener("click", toggleHelp);
    if (byId("review-slot")) window.setInterval(renewLease, RENEW_EVERY_MS);
  });
})();
