// Small progressive enhancements. No inline scripts anywhere: the CSP forbids them.
document.addEventListener("htmx:responseError", (event) => {
  const box = document.getElementById("htmx-error");
  if (box) {
    box.textContent = `Request failed (${event.detail.xhr.status}). Your work was not lost; try again.`;
    box.hidden = false;
  }
});
