// cldlr reading app: one reader, two rounds, answers kept in this browser's localStorage, exported as CSV.
// Everything runs inside this file; the page's Content-Security-Policy forbids any network request.
(() => {
  "use strict";
  const S = JSON.parse(document.getElementById("study-data").textContent);
  const DAY_MS = 86400000, IDLE_MS = 180000, TICK_MS = 1000;
  const COLUMNS = ["reader", "round", "case", "malignant", "birads4", "likelihood", "confidence", "seconds", "comment"];
  const NUMBER = /^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$/;
  const $ = (id) => document.getElementById(id);
  const nowIso = () => new Date().toISOString();
  const storageKey = (r) => "cldlr-reader:" + S.study + ":" + S.reader + ":round" + r;

  function load(r) {
    let state = null;
    try { state = JSON.parse(window.localStorage.getItem(storageKey(r)) || "null"); } catch (e) { state = null; }
    if (!state || typeof state !== "object" || typeof state.answers !== "object" || state.answers === null) {
      state = { started: null, completed: null, answers: {}, position: 0, clock_back: 0, last_seen: 0 };
    }
    return state;
  }
  const rounds = { 1: load(1), 2: load(2) };

  function status(text) { $("status").textContent = text; }
  function save(r) {
    const st = rounds[r];
    if (Date.now() < (st.last_seen || 0) - 60000) st.clock_back = (st.clock_back || 0) + 1;  // the clock was set back
    st.last_seen = Math.max(st.last_seen || 0, Date.now());
    try {
      window.localStorage.setItem(storageKey(r), JSON.stringify(st));
      status("saved in this browser " + new Date().toLocaleTimeString());
    } catch (e) {
      status("could not save in this browser: press Export reads now");
    }
  }

  const sections = new Map();
  document.querySelectorAll("#cases section.case").forEach((s) => sections.set(s.dataset.case, s));
  const order = (r) => S.orders[String(r)];
  const answerOf = (r, c) => (rounds[r].answers[c] = rounds[r].answers[c] || { ms: 0 });
  function complete(a) {
    return !!a && (a.malignant === "0" || a.malignant === "1") && ["4a", "4b", "4c"].includes(a.birads4)
      && Number.isInteger(a.likelihood) && a.likelihood >= 0 && a.likelihood <= 100;
  }
  const answered = (r) => order(r).filter((c) => complete(rounds[r].answers[c])).length;
  function unlockTime() {
    return rounds[1].completed ? Date.parse(rounds[1].completed) + S.washout_days * DAY_MS : null;
  }
  function round2Open() {
    return !!rounds[1].completed && (!!rounds[2].started || !!rounds[2].unlocked_by || Date.now() >= unlockTime());
  }

  // ------------------------------------------------------------------ overview
  function renderOverview() {
    for (const row of document.querySelectorAll("table.rounds tr[data-round]")) {
      const r = Number(row.dataset.round), st = rounds[r], n = order(r).length, k = answered(r);
      let text;
      if (st.completed) text = "finished " + new Date(st.completed).toLocaleString();
      else if (r === 2 && !rounds[1].completed) text = "locked: finish round 1 first";
      else if (r === 2 && !round2Open()) text = "opens " + new Date(unlockTime()).toLocaleString();
      else text = st.started ? "in progress" : "not started";
      row.querySelector(".r-status").textContent = text;
      row.querySelector(".r-progress").textContent = k + " / " + n;
      const open = row.querySelector(".r-open"), finish = row.querySelector(".r-finish");
      open.disabled = r === 2 && !round2Open();
      open.textContent = st.completed ? "Review" : (st.started ? "Continue" : "Start");
      finish.hidden = !!st.completed;
      finish.disabled = k < n || !st.started;
    }
    $("unlock").hidden = !(rounds[1].completed && !round2Open() && S.unlock_hash);
    $("overview").hidden = false;
    $("reading").hidden = true;
  }

  function finishRound(r) {
    if (answered(r) < order(r).length || rounds[r].completed) return;
    rounds[r].completed = nowIso();
    save(r);
    renderOverview();
  }

  async function unlock() {
    const code = $("unlock-code").value.toUpperCase().replace(/[^A-Z0-9]/g, "");
    const message = $("unlock-message");
    if (!window.crypto || !window.crypto.subtle) {
      message.textContent = "this browser cannot check codes in a local file; ask the coordinator";
      return;
    }
    const digest = await window.crypto.subtle.digest("SHA-256", new TextEncoder().encode(S.study + ":" + S.reader + ":" + code));
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    if (hex !== S.unlock_hash) { message.textContent = "that code does not match"; return; }
    rounds[2].unlocked_by = "code";
    rounds[2].unlocked_at = nowIso();
    save(2);
    message.textContent = "";
    renderOverview();
  }

  // ------------------------------------------------------------------ reading
  let current = null;  // {round, index}
  const form = $("case-form");
  const radios = (name) => Array.from(form.querySelectorAll('input[name="' + name + '"]'));

  function openRound(r) {
    if (r === 2 && !round2Open()) return;
    const st = rounds[r];
    if (!st.started && !st.completed) {
      st.started = nowIso();
      if (r === 2 && !st.unlocked_by) st.unlocked_by = S.washout_days > 0 ? "washout" : "no washout";
      save(r);
    }
    const n = order(r).length;
    const first = order(r).findIndex((c) => !complete(st.answers[c]));
    showCase(r, st.completed ? 0 : Math.min(Number(st.position) || 0, first < 0 ? n - 1 : first));
  }

  function showCase(r, index) {
    leaveCase();
    const c = order(r)[index], st = rounds[r], a = answerOf(r, c), locked = !!st.completed;
    current = { round: r, index: index };
    lastTick = performance.now();
    st.position = index;
    const section = sections.get(c);
    $("case-slot").appendChild(section);
    section.hidden = false;
    section.querySelectorAll(".ai-panel").forEach((p) => { p.hidden = r !== 2; });
    $("case-title").textContent = "Round " + r + " · case " + (index + 1) + " of " + order(r).length + " · " + c;
    $("progress-bar").style.width = (100 * answered(r) / order(r).length).toFixed(1) + "%";
    const before = rounds[1].answers[c];
    const box = $("round1-answer");
    box.hidden = !(S.show_round1 && r === 2 && complete(before));
    if (!box.hidden) {
      box.textContent = "Your round-1 answer: " + (before.malignant === "1" ? "malignant" : "benign") + ", BI-RADS "
        + before.birads4 + ", likelihood " + before.likelihood + "%.";
    }
    radios("malignant").forEach((el) => { el.checked = el.value === a.malignant; });
    radios("birads4").forEach((el) => { el.checked = el.value === a.birads4; });
    $("likelihood").value = Number.isInteger(a.likelihood) ? String(a.likelihood) : "";
    $("likelihood-range").value = Number.isInteger(a.likelihood) ? String(a.likelihood) : "50";
    $("comment").value = a.comment || "";
    form.querySelectorAll("input, textarea").forEach((el) => { el.disabled = locked; });
    $("next").textContent = locked ? "Next" : "Save and next";
    $("previous").disabled = index === 0;
    $("form-message").textContent = locked ? "This round is finished; its answers are locked." : "";
    $("overview").hidden = true;
    $("reading").hidden = false;
    save(r);
    window.scrollTo(0, 0);
  }

  function leaveCase() {
    if (!current) return;
    accrue();
    const c = order(current.round)[current.index], section = sections.get(c);
    section.hidden = true;
    $("cases").appendChild(section);
    save(current.round);
    current = null;
  }

  function recordInput() {
    if (!current || rounds[current.round].completed) return;
    const a = answerOf(current.round, order(current.round)[current.index]);
    const checked = (name) => { const el = radios(name).find((x) => x.checked); return el ? el.value : undefined; };
    a.malignant = checked("malignant");
    a.birads4 = checked("birads4");
    const text = $("likelihood").value.trim();
    a.likelihood = /^\d{1,3}$/.test(text) && Number(text) <= 100 ? Number(text) : undefined;
    a.comment = $("comment").value;
    a.saved = nowIso();
    save(current.round);
  }

  function next() {
    const r = current.round, st = rounds[r], c = order(r)[current.index];
    if (!st.completed) {
      recordInput();
      const a = st.answers[c], missing = [];
      if (a.malignant === undefined) missing.push("the decision");
      if (a.birads4 === undefined) missing.push("the BI-RADS category");
      if (a.likelihood === undefined) missing.push("a likelihood 0–100");
      if (missing.length) { $("form-message").textContent = "Please give " + missing.join(", ") + "."; return; }
    }
    const n = order(r).length;
    if (current.index + 1 < n) { showCase(r, current.index + 1); return; }
    const open = order(r).findIndex((x) => !complete(st.answers[x]));
    if (open >= 0 && !st.completed) { showCase(r, open); return; }
    leaveCase();
    renderOverview();
  }

  // ------------------------------------------------------------------ reading time: active time on a case
  // The time since the last accrual counts for the case on screen if the page was visible, focused and in use;
  // a gap longer than two ticks (the computer slept, the tab was frozen) counts as two ticks at most.
  let lastTick = performance.now(), lastActivity = Date.now(), ticks = 0;
  let focused = typeof document.hasFocus === "function" ? document.hasFocus() : true;
  function accrue() {
    const t = performance.now(), dt = Math.min(t - lastTick, 2 * TICK_MS);
    lastTick = t;
    if (!current || rounds[current.round].completed || document.visibilityState !== "visible" || !focused
        || Date.now() - lastActivity > IDLE_MS) return;
    const a = answerOf(current.round, order(current.round)[current.index]);
    a.ms = (a.ms || 0) + dt;
  }
  window.addEventListener("focus", () => { accrue(); focused = true; lastActivity = Date.now(); });
  window.addEventListener("blur", () => { accrue(); focused = false; });
  ["pointerdown", "pointermove", "keydown", "wheel", "input", "scroll", "touchstart"].forEach((type) =>
    window.addEventListener(type, () => { lastActivity = Date.now(); }, { passive: true, capture: true }));
  document.addEventListener("visibilitychange", () => { accrue(); if (current) save(current.round); });
  window.setInterval(() => {
    accrue();
    if (current && ++ticks % 5 === 0) save(current.round);
  }, TICK_MS);

  // ------------------------------------------------------------------ export
  function cell(value) {
    let text = value === undefined || value === null ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(text) && !NUMBER.test(text)) text = "'" + text;  // no spreadsheet formulas
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }
  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], { type: type }));
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 60000);
  }
  function exportReads() {
    if (current) { accrue(); save(current.round); }
    const lines = [COLUMNS.join(",")];
    const log = { format: "cldlr-reader-log/1", study: S.study, reader: S.reader, packet_created: S.created,
      washout_days: S.washout_days, show_round1: S.show_round1, exported_at: nowIso(),
      user_agent: navigator.userAgent, rounds: {} };
    let total = 0;
    for (const r of [1, 2]) {
      const st = rounds[r];
      for (const c of order(r)) {
        const a = st.answers[c];
        if (!complete(a)) continue;
        lines.push([S.reader, r, c, a.malignant, a.birads4, a.likelihood, "", ((a.ms || 0) / 1000).toFixed(1),
          a.comment || ""].map(cell).join(","));
        total += 1;
      }
      log.rounds[String(r)] = { started: st.started, completed: st.completed, answered: answered(r),
        cases: order(r).length, order: order(r), unlocked_by: st.unlocked_by || null,
        unlocked_at: st.unlocked_at || null, clock_set_back: st.clock_back || 0 };
    }
    const stem = "reads_" + S.study + "_" + S.reader;
    download(stem + ".csv", "\ufeff" + lines.join("\r\n") + "\r\n", "text/csv;charset=utf-8");
    download(stem + ".log.json", JSON.stringify(log, null, 2) + "\n", "application/json");
    $("export-message").textContent = "saved " + stem + ".csv (" + total + " reads) and " + stem
      + ".log.json; send both to the coordinator. If the browser asks whether this page may save several files, allow it.";
  }

  // ------------------------------------------------------------------ wiring
  for (const row of document.querySelectorAll("table.rounds tr[data-round]")) {
    const r = Number(row.dataset.round);
    row.querySelector(".r-open").addEventListener("click", () => openRound(r));
    row.querySelector(".r-finish").addEventListener("click", () => finishRound(r));
  }
  $("unlock-button").addEventListener("click", () => { unlock(); });
  $("export").addEventListener("click", exportReads);
  $("likelihood-range").addEventListener("input", () => { $("likelihood").value = $("likelihood-range").value; recordInput(); });
  $("likelihood").addEventListener("input", () => {
    if ($("likelihood").value !== "") $("likelihood-range").value = $("likelihood").value;
    recordInput();
  });
  form.addEventListener("change", recordInput);
  $("comment").addEventListener("input", recordInput);
  form.addEventListener("submit", (event) => { event.preventDefault(); next(); });
  $("previous").addEventListener("click", () => { if (current && current.index > 0) showCase(current.round, current.index - 1); });
  $("to-overview").addEventListener("click", () => { leaveCase(); renderOverview(); });
  window.addEventListener("pagehide", () => { if (current) save(current.round); });
  renderOverview();
})();
