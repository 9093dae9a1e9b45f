// The labeling screen. Keyboard first; the next task is claimed while the person works on the
// current one, and a submitted label waits a few seconds in the browser so U can take it back.
"use strict";

(function () {
  const root = document.getElementById("labeler");
  if (!root) return;
  const config = JSON.parse(root.dataset.config);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const undoMs = config.undo_seconds * 1000;
  // Leases are extended only for a person who is still there: one who left lets them lapse.
  const activeWindowMs = config.idle_seconds * 1000;
  const extendBelowMs = 120 * 1000;
  const emptyRetryMs = 10 * 1000;
  // ?mode=second: only second opinions are claimed.
  const secondOnly = Boolean(config.second_opinions_only);
  const nothingWaits = (secondOnly ? "No second opinion" : "No task")
    + " is waiting in this project right now. This page looks again every 10 seconds.";
  const $ = (id) => document.getElementById(id);
  const els = {
    meta: $("task-meta"), kind: $("task-kind"), synthetic: $("task-synthetic"), external: $("task-external"),
    text: $("task-text"), suggestion: $("suggestion"), suggestionLabel: $("suggestion-label"),
    suggestionConfidence: $("suggestion-confidence"), filter: $("label-filter"), confirm: $("confirm"),
    skip: $("skip"), undoBar: $("undo-bar"), undoText: $("undo-text"), undo: $("undo"), notice: $("notice"),
    empty: $("empty"), emptyText: $("empty-text"), showSkipped: $("show-skipped"), help: $("help"),
    progressLabels: $("progress-labels"), progressSpi: $("progress-spi"),
  };
  const buttons = Array.from(document.querySelectorAll("#labels button.label"));
  const byKey = new Map(buttons.filter((b) => b.dataset.key).map((b) => [b.dataset.key, b]));

  let current = null; // {task, shownAt, spent}: the task on screen
  const ahead = []; // tasks claimed in advance, not shown yet
  let claiming = null; // the claim in flight, if any
  let drained = false; // the queue answered empty: wait before asking again
  // The review service never hands a person a task they skipped, unless asked: the person asked
  // (the "show the tasks I skipped" button), until they skip again or nothing is left.
  let withSkipped = false;
  let pending = null; // {entry, label, spent, timer, ticker, deadline}: submitted, not yet sent
  let selected = -1;
  let clockOffset = 0; // server clock minus ours, for lease deadlines
  let lastActivity = Date.now();

  // --- talking to the app ----------------------------------------------------------------------

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (_) { /* an empty or non-JSON answer */ }
    if (response.status === 401) {
      window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
      throw new Error("Your session has ended.");
    }
    if (!response.ok) {
      const error = new Error(data.message || "The server answered " + response.status + ".");
      error.status = response.status;
      error.kind = data.error;
      throw error;
    }
    if (data.server_ms) clockOffset = data.server_ms - Date.now();
    return data;
  }

  function lastWords(path, body) {
    // Leaving the page: a keepalive request outlives it (and, unlike sendBeacon, carries headers).
    fetch(path, {
      method: "POST",
      credentials: "same-origin",
      keepalive: true,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    }).catch(() => { /* the page is gone; the lease lapses on its own */ });
  }

  function showProgress(progress) {
    if (!progress) return;
    els.progressLabels.textContent = progress.labels;
    els.progressSpi.textContent = Number(progress.seconds_per_item).toFixed(1);
  }

  function notify(message) {
    els.notice.textContent = message;
    els.notice.hidden = !message;
  }

  // --- the queue -------------------------------------------------------------------------------

  function claim() {
    if (claiming) return claiming;
    const body = {};
    if (secondOnly) body.second_opinions_only = true;
    if (withSkipped) body.include_skipped = true;
    claiming = api("/api/projects/" + encodeURIComponent(config.project_id) + "/next", body)
      .then((data) => {
        if (data.task) {
          ahead.push({ task: data.task, shownAt: 0, spent: 0 });
        } else {
          drained = true;
          withSkipped = false;
          els.showSkipped.hidden = !data.skipped_before;
          els.emptyText.textContent = data.skipped_before
            ? "Nothing new is waiting for you in this project. Tasks you skipped go to others, and come back to you only if you ask."
            : nothingWaits;
          setTimeout(() => { drained = false; if (!current) advance(); else fillAhead(); }, emptyRetryMs);
        }
      })
      .catch((error) => {
        notify(error.message);
        drained = true;
        setTimeout(() => { drained = false; if (!current) advance(); }, emptyRetryMs);
      })
      .finally(() => { claiming = null; });
    return claiming;
  }

  function fillAhead() {
    if (!drained && ahead.length === 0 && !claiming) claim();
  }

  async function advance() {
    if (ahead.length === 0 && !drained) await claim();
    if (current) return; // an undo brought a task back meanwhile
    const entry = ahead.shift();
    if (!entry) {
      show(null);
      return;
    }
    show(entry);
    fillAhead();
  }

  function show(entry) {
    current = entry;
    select(-1);
    if (els.filter) { els.filter.value = ""; filterLabels(); }
    buttons.forEach((b) => b.classList.remove("suggested"));
    if (!entry) {
      els.meta.hidden = true;
      els.text.textContent = "";
      els.suggestion.hidden = true;
      els.empty.hidden = false;
      root.classList.add("idle");
      return;
    }
    root.classList.remove("idle");
    els.empty.hidden = true;
    const task = entry.task;
    entry.shownAt = Date.now();
    els.meta.hidden = false;
    els.kind.textContent = task.kind;
    els.kind.classList.toggle("warn", task.round >= 1);
    els.synthetic.hidden = !task.synthetic;
    els.external.textContent = task.external_id;
    els.text.textContent = task.text;
    root.dataset.taskId = task.task_id;
    if (task.suggestion) {
      els.suggestionLabel.textContent = task.suggestion.label;
      els.suggestionConfidence.textContent = "(" + Math.round(task.suggestion.confidence * 100) + "% sure)";
      els.suggestion.hidden = false;
      const match = buttons.find((b) => b.dataset.name === task.suggestion.label);
      if (match) match.classList.add("suggested");
    } else {
      els.suggestion.hidden = true;
    }
  }

  // --- labels, selection, filter ---------------------------------------------------------------

  function visible() {
    return buttons.filter((b) => !b.hidden);
  }

  function select(index) {
    selected = index;
    buttons.forEach((b, i) => {
      const on = i === index;
      b.classList.toggle("selected", on);
      b.setAttribute("aria-selected", on ? "true" : "false");
      if (on) b.scrollIntoView({ block: "nearest" });
    });
  }

  function moveSelection(step) {
    const shown = visible();
    if (shown.length === 0) return;
    const at = shown.findIndex((b) => Number(b.dataset.index) === selected);
    const next = at < 0 ? (step > 0 ? 0 : shown.length - 1) : (at + step + shown.length) % shown.length;
    select(Number(shown[next].dataset.index));
  }

  function filterLabels() {
    const words = els.filter.value.trim().toLowerCase();
    buttons.forEach((b) => {
      b.hidden = words !== "" && !b.dataset.name.toLowerCase().includes(words)
        && !(b.title || "").toLowerCase().includes(words);
    });
    const shown = visible();
    if (!shown.some((b) => Number(b.dataset.index) === selected)) {
      select(shown.length ? Number(shown[0].dataset.index) : -1);
    }
  }

  // --- submit, undo, skip ----------------------------------------------------------------------

  function confirm() {
    if (!current) return;
    if (selected < 0) {
      notify("Pick a label first (its key, a click, or the arrow keys).");
      return;
    }
    notify("");
    if (pending) send(pending); // the previous label's undo window closes early
    const entry = current;
    const label = buttons[selected].dataset.name;
    const spent = entry.spent + (Date.now() - entry.shownAt) / 1000;
    const deadline = Date.now() + undoMs;
    pending = { entry: entry, label: label, spent: spent, deadline: deadline };
    pending.timer = setTimeout(() => send(pending), undoMs);
    pending.ticker = setInterval(showUndo, 250);
    showUndo();
    current = null;
    advance();
  }

  function showUndo() {
    if (!pending) {
      els.undoBar.hidden = true;
      return;
    }
    const left = Math.max(0, Math.ceil((pending.deadline - Date.now()) / 1000));
    els.undoText.textContent = "Labeled “" + pending.label + "” · sent in " + left + " s";
    els.undoBar.hidden = false;
  }

  function closeUndo(p) {
    clearTimeout(p.timer);
    clearInterval(p.ticker);
    if (pending === p) pending = null;
    showUndo();
  }

  async function send(p, retried) {
    closeUndo(p);
    const task = p.entry.task;
    try {
      const data = await api("/api/tasks/" + encodeURIComponent(task.task_id) + "/submit", {
        lease_id: task.lease_id, label: p.label, seconds_spent: Math.round(p.spent * 10) / 10,
      });
      showProgress(data.progress);
    } catch (error) {
      if (!retried && (error.status === undefined || error.status === 503)) {
        setTimeout(() => send(p, true), 2000);
        return;
      }
      notify("The label for item " + task.external_id + " was not saved: " + error.message);
    }
  }

  function undo() {
    if (!pending) return;
    const p = pending;
    closeUndo(p);
    // The task shown meanwhile goes back to the front of the line, untouched.
    if (current) {
      current.spent += (Date.now() - current.shownAt) / 1000;
      ahead.unshift(current);
    }
    p.entry.spent = p.spent;
    show(p.entry);
    select(buttons.findIndex((b) => b.dataset.name === p.label));
    notify("Undone: “" + p.label + "” was not sent.");
  }

  async function skip() {
    if (!current) return;
    const task = current.task;
    current = null;
    withSkipped = false;
    notify("");
    const skipped = api("/api/tasks/" + encodeURIComponent(task.task_id) + "/skip", {
      lease_id: task.lease_id, project_id: task.project_id,
    })
      .then((data) => showProgress(data.progress))
      .catch((error) => notify("Skipping item " + task.external_id + " failed: " + error.message));
    // The task claimed ahead is on screen at once; the next claim waits until the skip is
    // recorded, so that an empty answer knows to offer the skipped task back.
    const next = ahead.shift();
    if (next) show(next);
    await skipped;
    drained = false;
    if (current) fillAhead();
    else await advance();
  }

  // --- leases ----------------------------------------------------------------------------------

  function leaseLeft(task) {
    return task.lease_expires_unix_ms - (Date.now() + clockOffset);
  }

  function drop(entry) {
    const at = ahead.indexOf(entry);
    if (at >= 0) ahead.splice(at, 1);
  }

  async function keepLeases() {
    const present = Date.now() - lastActivity < activeWindowMs && !document.hidden;
    const entries = [current, ...ahead].filter(Boolean);
    for (const entry of entries) {
      const task = entry.task;
      const left = leaseLeft(task);
      if (left <= 0 && entry !== current) {
        // A task claimed ahead whose lease ran out is someone else's now.
        drop(entry);
        fillAhead();
      } else if (left < extendBelowMs && present) {
        try {
          const data = await api("/api/tasks/" + encodeURIComponent(task.task_id) + "/extend", { lease_id: task.lease_id });
          task.lease_expires_unix_ms = data.lease_expires_unix_ms;
        } catch (error) {
          if (entry === current) notify("This task's lease has expired: it went back to the queue. Skip it (S) to go on.");
          else drop(entry);
        }
      }
    }
  }

  // --- keyboard and mouse ----------------------------------------------------------------------

  function toggleHelp(open) {
    els.help.hidden = open === undefined ? !els.help.hidden : !open;
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (!els.help.hidden) {
      if (key === "Escape" || key === "?") { toggleHelp(false); event.preventDefault(); }
      return;
    }
    if (els.filter && event.target === els.filter) {
      if (key === "Escape") { els.filter.value = ""; filterLabels(); els.filter.blur(); event.preventDefault(); }
      else if (key === "Enter") { confirm(); els.filter.blur(); event.preventDefault(); }
      else if (key === "ArrowDown") { moveSelection(1); event.preventDefault(); }
      else if (key === "ArrowUp") { moveSelection(-1); event.preventDefault(); }
      return;
    }
    const tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    const lower = key.length === 1 ? key.toLowerCase() : key;
    let handled = true;
    if (key === "?") toggleHelp(true);
    else if (key === "Enter") confirm();
    else if (lower === "s") skip();
    else if (lower === "u") undo();
    else if (key === "/" && els.filter) els.filter.focus();
    else if (key === "ArrowDown" || key === "ArrowRight") moveSelection(1);
    else if (key === "ArrowUp" || key === "ArrowLeft") moveSelection(-1);
    else if (key === "Escape") select(-1);
    else if (byKey.has(lower) && current) select(Number(byKey.get(lower).dataset.index));
    else handled = false;
    if (handled) event.preventDefault();
  }

  function onActivity() {
    lastActivity = Date.now();
  }

  document.addEventListener("keydown", (event) => { onActivity(); onKey(event); });
  ["mousedown", "mousemove", "wheel", "touchstart", "scroll"].forEach((name) =>
    document.addEventListener(name, onActivity, { passive: true }));
  buttons.forEach((b) => {
    b.addEventListener("click", () => { if (current) select(Number(b.dataset.index)); });
    b.addEventListener("dblclick", () => { if (current) { select(Number(b.dataset.index)); confirm(); } });
  });
  els.confirm.addEventListener("click", confirm);
  els.skip.addEventListener("click", skip);
  els.undo.addEventListener("click", undo);
  els.showSkipped.addEventListener("click", () => {
    els.showSkipped.hidden = true;
    withSkipped = true;
    drained = false;
    advance();
  });
  $("help-open").addEventListener("click", () => toggleHelp(true));
  $("help-close").addEventListener("click", () => toggleHelp(false));
  if (els.filter) els.filter.addEventListener("input", filterLabels);

  window.addEventListener("pagehide", () => {
    // A label in its undo window is sent now; the tasks held go back to the queue at once
    // instead of when their leases run out.
    if (pending) {
      const p = pending;
      closeUndo(p);
      lastWords("/api/tasks/" + encodeURIComponent(p.entry.task.task_id) + "/submit", {
        lease_id: p.entry.task.lease_id, label: p.label, seconds_spent: Math.round(p.spent * 10) / 10,
      });
    }
    const held = ahead.splice(0);
    if (current) held.push(current);
    for (const entry of held) {
      lastWords("/api/tasks/" + encodeURIComponent(entry.task.task_id) + "/release", { lease_id: entry.task.lease_id });
    }
  });

  window.addEventListener("pageshow", (event) => {
    // Back from the browser's page cache: the tasks this page held were given back on the way out.
    if (event.persisted) window.location.reload();
  });

  setInterval(keepLeases, 15 * 1000);
  advance();
})();
