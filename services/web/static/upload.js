// The upload form with a progress bar. The same multipart post as without scripts (the CSRF token
// still its first part: FormData keeps the form's order), sent with XMLHttpRequest because only
// its upload.onprogress reports the bytes sent; the server's answer, the result page, then
// replaces this one. The server reads the file as it stores it, batch by batch, so the bytes
// sent also tell how far the items got. Without this script the form posts as usual.
"use strict";

(function () {
  if (typeof FormData === "undefined" || !window.XMLHttpRequest || !window.DOMParser) return;

  function size(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " kB";
    return (bytes / (1024 * 1024)).toFixed(1) + " MB";
  }

  function show(state, loaded, total, text) {
    // Looked up each time: the page is replaced once the answer comes.
    const box = document.getElementById("upload-progress");
    if (!box) return;
    const bar = document.getElementById("upload-bar");
    box.hidden = false;
    box.dataset.state = state;
    bar.max = Math.max(total, 1);
    bar.value = Math.min(loaded, bar.max);
    document.getElementById("upload-progress-text").textContent = text;
  }

  function replacePage(html) {
    // Parsed, not written: scripts of a parsed document never run, so nothing binds twice.
    const page = new DOMParser().parseFromString(html, "text/html");
    document.title = page.title;
    document.body.replaceWith(document.adoptNode(page.body));
  }

  // On the document, not the form: the result page brings a new form, and it works the same way.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || form.id !== "upload-form") return;
    const input = form.elements.namedItem("file");
    const file = input && input.files && input.files[0];
    if (!file) return; // the browser's own "required" message
    event.preventDefault();
    const limit = Number(form.dataset.maxBytes || 0);
    if (limit && file.size > limit) {
      show("failed", 0, file.size, file.name + " is " + size(file.size) + ": uploads here are limited to "
        + size(limit) + ". Use `tandem ingest` for it.");
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const xhr = new XMLHttpRequest();
    let total = file.size;
    show("sending", 0, total, "Sending " + file.name + "…");
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      total = e.total;
      show("sending", e.loaded, total, size(e.loaded) + " of " + size(total) + " sent");
    });
    xhr.upload.addEventListener("load", () => {
      show("finishing", total, total, "All " + size(total) + " sent; the last items are being stored…");
    });
    xhr.addEventListener("load", () => {
      const answered = new URL(xhr.responseURL || form.action, window.location.href);
      if (answered.pathname !== new URL(form.action).pathname) {
        window.location.assign(answered.href); // redirected: the session ended, log in again
        return;
      }
      replacePage(xhr.responseText);
      if (xhr.status === 200) show("done", total, total, file.name + ": " + size(file.size) + " sent · done");
    });
    xhr.addEventListener("error", () => {
      button.disabled = false;
      show("failed", 0, total, "The connection was lost during the upload. Items stored before it count as "
        + "duplicates when you upload the file again.");
    });
    xhr.open("POST", form.action);
    xhr.send(new FormData(form));
  });
})();
