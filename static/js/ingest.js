// Upload progress for forms marked data-upload-progress (htmx posts them; the CSP forbids inline JS).
// Once the file is up, the batch page takes over: it polls the batch's counts and progress with htmx.
function uploadForm(event) {
  return event.target.closest ? event.target.closest("form[data-upload-progress]") : null;
}

function megabytes(bytes) {
  return (bytes / (1024 * 1024)).toFixed(1) + " MB";
}

document.addEventListener("htmx:xhr:progress", (event) => {
  const form = uploadForm(event);
  if (!form || !event.detail.lengthComputable || !event.detail.total) return;
  const bar = form.querySelector("progress");
  const text = form.querySelector(".upload-progress-text");
  const percent = Math.round((100 * event.detail.loaded) / event.detail.total);
  if (bar) {
    bar.hidden = false;
    bar.value = percent;
  }
  if (text) {
    text.hidden = false;
    text.textContent = percent >= 100
      ? "Uploaded; checking the file…"
      : "Uploading " + megabytes(event.detail.loaded) + " of " + megabytes(event.detail.total) + " (" + percent + "%)";
  }
});

document.addEventListener("htmx:beforeRequest", (event) => {
  const form = uploadForm(event);
  const button = form ? form.querySelector("button[type=submit]") : null;
  if (button) button.disabled = true;
});

document.addEventListener("htmx:afterRequest", (event) => {
  // A refused file comes back as the form with its errors (a fresh element); a network error leaves
  // the old one: give its button back.
  const form = uploadForm(event);
  const button = form ? form.querySelector("button[type=submit]") : null;
  if (button && !event.detail.successful) button.disabled = false;
});
