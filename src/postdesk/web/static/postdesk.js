// Small progressive enhancements; every page works without them.
"use strict";

document.addEventListener("htmx:configRequest", (event) => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (meta) event.detail.headers["X-CSRF-Token"] = meta.content;
});

document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  try {
    await navigator.clipboard.writeText(source.value || source.textContent);
    button.textContent = "Copied";
  } catch (_error) {
    source.select?.();
    button.textContent = "Press Ctrl+C";
  }
});

document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

// Remote images stay blocked (no tracking pixel fires) until the agent asks for them, per message.
// The link alone reloads the message's frame with ?images=1 (it targets the frame by name); here it
// also takes the notice away. Removing the link during its own click would cancel that navigation,
// so the frame is pointed at the link's address first.
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-show-images]");
  if (!link) return;
  const frame = document.querySelector(`iframe[name="${CSS.escape(link.target)}"]`);
  if (!frame) return;
  event.preventDefault();
  frame.src = link.href;
  link.closest("p").remove();
});

// A refused draft (422) comes back with the composer and its error: show it instead of dropping it.
document.addEventListener("htmx:beforeSwap", (event) => {
  if (event.detail.xhr.status === 422) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});

// Keyboard: r / a / f / n pick the composer, Ctrl+Enter (Cmd+Enter) sends it.
document.addEventListener("keydown", (event) => {
  const typing = event.target.closest("input, textarea, select, [contenteditable]");
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter" && typing) {
    const form = typing.closest("form");
    if (form) {
      event.preventDefault();
      form.requestSubmit();
    }
    return;
  }
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const link = document.querySelector(`[data-shortcut="${event.key}"]`);
  if (link) {
    event.preventDefault();
    focusComposer = true;
    link.click();
  }
});

let focusComposer = false;
document.addEventListener("htmx:afterSettle", () => {
  if (!focusComposer) return;
  focusComposer = false;
  document.getElementById("compose-body")?.focus();
});
