// The ap4k web console: a small single-page app over the server's own /v1 API.
// Plain DOM, no framework and no build step; every text goes through textContent.
"use strict";

(() => {
  const TOKEN_KEY = "ap4k-console-token";
  const REFRESH_MS = 2000;
  const PAGE_SIZE = 50;
  const LIVE_STATES = ["available", "scheduled", "running", "retryable", "discarded"];
  const ALL_STATES = [...LIVE_STATES, "completed", "cancelled"];
  const FINISHED = new Set(["completed", "discarded", "cancelled"]);

  const view = document.getElementById("view");
  const updated = document.getElementById("updated");
  const autoRefresh = document.getElementById("auto-refresh");
  const flashBox = document.getElementById("flash");
  const tokenDialog = document.getElementById("token-dialog");
  const tokenInput = document.getElementById("token-input");
  const tokenError = document.getElementById("token-error");
  const signOut = document.getElementById("sign-out");
  const loadError = document.getElementById("load-error");

  // -- the API --------------------------------------------------------------------------

  // A refusal, said so that a user can act on it: the server's message, the field at fault
  // and the status; an answer that is not the API's error (a proxy's page) by its status.
  class ApiError extends Error {
    constructor(status, body, text) {
      const e = (body && body.error) || {};
      const field = e.field ? `field ${e.field}, ` : "";
      const other = text ? `: ${text.trim().split("\n")[0].slice(0, 200)}` : "";
      super(e.message ? `${e.message} (${field}HTTP ${status})` : `HTTP ${status}${other}`);
      this.status = status;
      this.code = e.code;
    }
  }

  let tokenWaiters = [];

  function askToken(message) {
    return new Promise((resolve) => {
      tokenWaiters.push(resolve);
      tokenError.hidden = !message;
      tokenError.textContent = message || "";
      if (!tokenDialog.open) {
        tokenDialog.showModal();
        tokenInput.focus();
      }
    });
  }

  document.getElementById("token-form").addEventListener("submit", () => {
    localStorage.setItem(TOKEN_KEY, tokenInput.value);
    tokenInput.value = "";
    signOut.hidden = false;
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach((resolve) => resolve());
  });
  tokenDialog.addEventListener("cancel", (event) => event.preventDefault());
  signOut.addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    signOut.hidden = true;
    render();
  });
  signOut.hidden = !localStorage.getItem(TOKEN_KEY);

  async function api(method, path, body) {
    for (;;) {
      const headers = { Accept: "application/json" };
      const token = localStorage.getItem(TOKEN_KEY);
      if (token) headers.Authorization = `Bearer ${token}`;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await response.text();
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
      if (response.status === 401) {
        await askToken(token ? "That token was refused." : "");
        continue;
      }
      if (!response.ok) throw new ApiError(response.status, data, data ? "" : text);
      return data;
    }
  }

  const enc = encodeURIComponent;
  const queuePath = (name) => `../v1/queues/${enc(name)}`;
  const schedulePath = (name) => `../v1/schedules/${enc(name)}`;

  // -- DOM helpers ----------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "class") el.className = value;
      else el.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const badge = (text, kind) => h("span", { class: `badge ${kind || text}` }, text);
  const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());

  function age(seconds) {
    if (!seconds) return "–";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
    return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
  }

  function rate(value) {
    if (value === null || value === undefined) return "–";
    return value >= 10 ? `${value.toFixed(0)}/s` : `${value.toFixed(2)}/s`;
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return h("time", { datetime: iso, title: iso }, d.toLocaleString());
  }

  function flash(message, bad) {
    flashBox.textContent = message;
    flashBox.className = bad ? "bad" : "";
    flashBox.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { flashBox.hidden = true; }, 6000);
  }

  async function act(label, fn) {
    try {
      const result = await fn();
      if (label) flash(typeof label === "function" ? label(result) : label);
    } catch (err) {
      flash(err.message, true);
    }
    await refresh();  // a refused action, too, may mean the page is stale
  }

  function table(columns, rows, emptyText) {
    const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.label)));
    const body = rows.length
      ? rows.map((row) => h("tr", { "data-id": row.id || row.name || null },
          columns.map((c) => h("td", { class: [c.num ? "num" : "", c.wrap ? "wrap" : ""].join(" ").trim() || null },
            c.cell(row)))))
      : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, emptyText || "nothing here"))];
    return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
  }

  // -- pages ----------------------------------------------------------------------------
  // Each page is {title, build(): builds the static frame once, refresh(): fills it}.

  function queuesPage() {
    const holder = h("div");
    return {
      frame: h("div", {}, h("h1", {}, "Queues"), holder),
      async refresh() {
        const data = await api("GET", "../v1/queues");
        const columns = [
          { label: "queue", cell: (q) => h("span", {}, h("a", { href: `#/queues/${enc(q.name)}` }, q.name),
              q.settings.paused ? [" ", badge("paused")] : null) },
          ...LIVE_STATES.map((s) => ({ label: s, num: true, cell: (q) => s === "discarded" && q.depth[s]
              ? h("a", { href: `#/queues/${enc(q.name)}/dead` }, num(q.depth[s])) : num(q.depth[s]) })),
          { label: "oldest available", num: true, cell: (q) => age(q.oldest_available_age_seconds) },
          { label: "delivered", num: true, cell: (q) => rate(q.rates && q.rates.delivered_per_second) },
          { label: "failed", num: true, cell: (q) => rate(q.rates && q.rates.failed_per_second) },
        ];
        holder.replaceChildren(table(columns, data.queues,
          "No queues yet: a queue springs into being with its first message."));
      },
    };
  }

  function lastAnswer(m) {
    if (m.last_status === null || m.last_status === undefined) return m.last_response_excerpt ? h("pre", { class: "excerpt" }, m.last_response_excerpt) : "–";
    return h("div", {}, h("span", { class: "status" }, `HTTP ${m.last_status}`),
      m.last_response_excerpt ? h("pre", { class: "excerpt" }, m.last_response_excerpt) : null);
  }

  function messagesTable(messages, options) {
    const columns = [];
    if (options && options.select) columns.push({ label: "", cell: (m) => options.select(m) });
    columns.push(
      { label: "id", cell: (m) => h("a", { href: `#/messages/${m.id}`, class: "mono" }, m.id) },
      { label: "state", cell: (m) => badge(m.state) },
      { label: "target", wrap: true, cell: (m) => h("span", { class: "mono" }, `${m.method} ${m.target}`) },
      { label: "attempt", num: true, cell: (m) => `${m.attempt} / ${m.max_attempts}` },
      { label: "last error", wrap: true, cell: (m) => m.last_error ? h("span", { class: "error" }, m.last_error) : "–" },
      { label: "last answer", wrap: true, cell: (m) => lastAnswer(m) },
      { label: "dedup key", wrap: true, cell: (m) => m.dedup_key || "–" },
      { label: "created", cell: (m) => when(m.created_at) },
    );
    return table(columns, messages, (options && options.empty) || "No messages.");
  }

  function settingsForm(queue, settings) {
    const fields = [
      ["max_attempts", "max attempts", "number", "1"],
      ["min_backoff_seconds", "min backoff (s)", "number", "any"],
      ["max_backoff_seconds", "max backoff (s)", "number", "any"],
      ["rate_limit_per_second", "rate limit (per s, empty: none)", "number", "any"],
      ["max_concurrency", "max concurrency (empty: none)", "number", "1"],
      ["base_url", "base URL", "text"],
      ["allowed_targets", "allowed target prefixes (comma separated)", "text"],
    ];
    const inputs = {};
    const form = h("form", { class: "settings", onsubmit: (event) => {
      event.preventDefault();
      const changes = {};
      for (const [key, , type] of fields) {
        const raw = inputs[key].value.trim();
        if (key === "allowed_targets") changes[key] = raw ? raw.split(",").map((s) => s.trim()).filter(Boolean) : [];
        else if (type === "number") changes[key] = raw === "" ? null : Number(raw);
        else changes[key] = raw === "" ? null : raw;
      }
      if (changes.max_attempts === null) delete changes.max_attempts;
      if (changes.min_backoff_seconds === null) delete changes.min_backoff_seconds;
      if (changes.max_backoff_seconds === null) delete changes.max_backoff_seconds;
      act("Settings saved.", () => api("PUT", queuePath(queue), changes));
    } });
    for (const [key, label, type, step] of fields) {
      const value = settings[key];
      inputs[key] = h("input", { type, name: key, step: step || null,
        value: Array.isArray(value) ? value.join(", ") : value === null || value === undefined ? "" : String(value) });
      form.append(h("label", {}, label, inputs[key]));
    }
    form.append(h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save settings"),
      h("span", { class: "muted" }, settings.signing_secret_set ? "  A signing secret is set." : "")));
    return form;
  }

  function queuePage(queue, params) {
    const state = params.get("state") || "";
    const after = params.get("after") || "";
    const order = params.get("order") || "newest";
    const search = params.get("q") || "";
    const stats = h("div", { class: "stats" });
    const pauseButton = h("button", { type: "button", id: "pause-button" }, "…");
    const pausedBadge = h("span");
    const tabs = h("div", { class: "tabs" });
    const list = h("div");
    const pager = h("div", { class: "pager" });
    const settingsHolder = h("div");
    let settingsShown = false;
    let paused = false;

    pauseButton.addEventListener("click", () => act(paused ? "Queue resumed." : "Queue paused.",
      () => api("PUT", queuePath(queue), { paused: !paused })));

    const link = (changes) => {
      const p = new URLSearchParams(params);
      for (const [k, v] of Object.entries(changes)) { if (v) p.set(k, v); else p.delete(k); }
      const qs = p.toString();
      return `#/queues/${enc(queue)}${qs ? `?${qs}` : ""}`;
    };

    const searchInput = h("input", { type: "search", placeholder: "message id or dedup key", value: search, name: "q" });
    const searchForm = h("form", { class: "row", onsubmit: (event) => {
      event.preventDefault();
      const value = searchInput.value.trim();
      if (/^\d+$/.test(value)) location.hash = `#/messages/${value}`;
      else location.hash = link({ q: value, after: "" });
    } }, searchInput, h("button", { type: "submit" }, "Find"));

    return {
      frame: h("div", {},
        h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Queues"), " / "),
        h("div", { class: "row between" },
          h("h1", {}, queue, " ", pausedBadge),
          h("div", { class: "row" }, h("a", { href: `#/queues/${enc(queue)}/dead` }, "Dead letters"), pauseButton)),
        stats,
        h("h2", {}, "Messages"),
        h("div", { class: "row between" }, searchForm,
          h("div", { class: "row" }, "order:",
            h("a", { href: link({ order: "newest", after: "" }), class: order === "newest" ? "active" : null }, "newest first"),
            h("a", { href: link({ order: "oldest", after: "" }), class: order === "oldest" ? "active" : null }, "oldest first"))),
        tabs, list, pager,
        h("h2", {}, "Settings"),
        h("div", { class: "card" }, settingsHolder)),
      async refresh() {
        const q = await api("GET", queuePath(queue));
        paused = q.settings.paused;
        pauseButton.textContent = paused ? "Resume" : "Pause";
        pauseButton.className = paused ? "primary" : "danger";
        pausedBadge.replaceChildren(paused ? badge("paused") : "");
        const r = q.rates || {};
        stats.replaceChildren(
          ...LIVE_STATES.map((s) => h("div", { class: "stat", "data-state": s },
            h("div", { class: "label" }, s), h("div", { class: "value" }, num(q.depth[s])))),
          h("div", { class: "stat" }, h("div", { class: "label" }, "oldest available"),
            h("div", { class: "value" }, age(q.oldest_available_age_seconds))),
          h("div", { class: "stat" }, h("div", { class: "label" }, "delivered"), h("div", { class: "value" }, rate(r.delivered_per_second))),
          h("div", { class: "stat" }, h("div", { class: "label" }, "failed"), h("div", { class: "value" }, rate(r.failed_per_second))));
        tabs.replaceChildren(
          h("a", { href: link({ state: "", after: "" }), class: state === "" ? "active" : null }, "all"),
          ...ALL_STATES.map((s) => h("a", { href: link({ state: s, after: "" }), class: state === s ? "active" : null },
            s, q.depth[s] !== undefined ? h("span", { class: "count" }, num(q.depth[s])) : null)));
        if (!settingsShown) {  // not on every refresh: it would clobber what is being typed
          settingsHolder.replaceChildren(settingsForm(queue, q.settings));
          settingsShown = true;
        }
        const p = new URLSearchParams({ limit: String(PAGE_SIZE), order });
        if (state) p.set("state", state);
        if (after) p.set("after", after);
        if (search) p.set("dedup_key", search);
        const page = await api("GET", `${queuePath(queue)}/messages?${p}`);
        list.replaceChildren(messagesTable(page.messages, { empty: search ? `No message with dedup key “${search}”.` : "No messages in this state." }));
        pager.replaceChildren(
          after ? h("a", { href: link({ after: "" }) }, "« first page") : "",
          page.next ? h("a", { href: link({ after: page.next }), id: "next-page" }, "next page »") : "");
      },
    };
  }

  function deadPage(queue, params) {
    const after = params.get("after") || "";
    const selected = new Set();
    const list = h("div");
    const pager = h("div", { class: "pager" });
    const count = h("span", { class: "muted" });
    const selectedIds = () => [...selected];
    const redriveSelected = h("button", { type: "button", class: "primary", id: "redrive-selected", disabled: true,
      onclick: () => act((r) => `Redriven: ${r.redriven}.`, async () => {
        const result = await api("POST", `${queuePath(queue)}/dead/redrive`, { ids: selectedIds() });
        selected.clear();
        return result;
      }) }, "Redrive selected");
    const purgeSelected = h("button", { type: "button", class: "danger", id: "purge-selected", disabled: true,
      onclick: () => {
        if (!confirm(`Delete ${selected.size} dead letter(s) for good?`)) return;
        act((r) => `Purged: ${r.purged}.`, async () => {
          const result = await api("DELETE", `${queuePath(queue)}/dead`, { ids: selectedIds() });
          selected.clear();
          return result;
        });
      } }, "Purge selected");
    const redriveAll = h("button", { type: "button", id: "redrive-all",
      onclick: () => act((r) => `Redriven: ${r.redriven}.`, () => api("POST", `${queuePath(queue)}/dead/redrive`)) },
      "Redrive all");
    const purgeAll = h("button", { type: "button", class: "danger", id: "purge-all", onclick: () => {
      if (!confirm(`Delete every dead letter of ${queue} for good?`)) return;
      act((r) => `Purged: ${r.purged}.`, () => api("DELETE", `${queuePath(queue)}/dead`));
    } }, "Purge all");

    const syncButtons = () => {
      redriveSelected.disabled = purgeSelected.disabled = selected.size === 0;
      count.textContent = selected.size ? `${selected.size} selected` : "";
    };

    return {
      frame: h("div", {},
        h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Queues"), " / ",
          h("a", { href: `#/queues/${enc(queue)}` }, queue), " /"),
        h("h1", {}, "Dead letters of ", queue),
        h("div", { class: "row" }, redriveSelected, purgeSelected, count, h("span", { class: "spacer" }), redriveAll, purgeAll),
        h("div", { style: "height:10px" }), list, pager),
      async refresh() {
        const p = new URLSearchParams({ limit: String(PAGE_SIZE) });
        if (after) p.set("after", after);
        const page = await api("GET", `${queuePath(queue)}/dead?${p}`);
        const ids = new Set(page.messages.map((m) => m.id));
        for (const id of [...selected]) if (!ids.has(id)) selected.delete(id);
        const all = h("input", { type: "checkbox", title: "select all", onchange: (event) => {
          for (const m of page.messages) { if (event.target.checked) selected.add(m.id); else selected.delete(m.id); }
          list.querySelectorAll("input[data-id]").forEach((box) => { box.checked = event.target.checked; });
          syncButtons();
        } });
        all.checked = page.messages.length > 0 && page.messages.every((m) => selected.has(m.id));
        const select = (m) => h("input", { type: "checkbox", "data-id": m.id, checked: selected.has(m.id),
          onchange: (event) => { if (event.target.checked) selected.add(m.id); else selected.delete(m.id); syncButtons(); } });
        const tableEl = messagesTable(page.messages, { select, empty: "No dead letters." });
        tableEl.querySelector("th").append(all);
        list.replaceChildren(tableEl);
        pager.replaceChildren(
          after ? h("a", { href: `#/queues/${enc(queue)}/dead` }, "« first page") : "",
          page.next ? h("a", { href: `#/queues/${enc(queue)}/dead?after=${page.next}` }, "next page »") : "");
        syncButtons();
      },
    };
  }

  function messagePage(id) {
    const holder = h("div");
    return {
      frame: holder,
      async refresh() {
        let m;
        try {
          m = await api("GET", `../v1/messages/${enc(id)}`);
        } catch (err) {
          if (err.status === 404) {
            holder.replaceChildren(h("h1", {}, `Message ${id}`), h("p", { class: "muted" },
              "Not found: it never existed, or it finished and was pruned after the retention period."));
            return;
          }
          throw err;
        }
        const actions = [];
        if (!FINISHED.has(m.state)) {
          actions.push(h("button", { type: "button", class: "danger", id: "cancel-message", onclick: () => {
            if (confirm(`Cancel message ${m.id}?`)) act("Message cancelled.", () => api("DELETE", `../v1/messages/${enc(m.id)}`));
          } }, "Cancel"));
        }
        if (m.state === "discarded") {
          actions.push(h("button", { type: "button", class: "primary", id: "redrive-message",
            onclick: () => act("Message redriven.", () => api("POST", `${queuePath(m.queue)}/dead/redrive`, { ids: [m.id] })) },
            "Redrive"));
        }
        const attempts = m.attempts || [];
        const attemptColumns = [
          { label: "#", num: true, cell: (a) => a.attempt },
          { label: "at", cell: (a) => when(a.at) },
          { label: "duration", num: true, cell: (a) => (a.duration_ms === null || a.duration_ms === undefined ? "–" : `${a.duration_ms.toFixed(1)} ms`) },
          { label: "outcome", cell: (a) => badge(a.outcome) },
          { label: "status", num: true, cell: (a) => a.status === null || a.status === undefined ? "–" : String(a.status) },
          { label: "error", wrap: true, cell: (a) => a.error ? h("span", { class: "error" }, a.error) : "–" },
          { label: "response (first 1 KiB)", wrap: true, cell: (a) => a.response_excerpt ? h("pre", { class: "excerpt" }, a.response_excerpt) : "–" },
          { label: "by", wrap: true, cell: (a) => h("span", { class: "mono" }, a.carrier || "–") },
        ];
        const headers = m.headers && Object.keys(m.headers).length ? JSON.stringify(m.headers, null, 2) : "(none)";
        holder.replaceChildren(
          h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Queues"), " / ",
            h("a", { href: `#/queues/${enc(m.queue)}` }, m.queue), " /"),
          h("div", { class: "row between" }, h("h1", {}, `Message ${m.id} `, badge(m.state)), h("div", { class: "row" }, actions)),
          h("div", { class: "card" }, h("dl", { class: "fields" },
            ...[
              ["target", h("span", { class: "mono" }, `${m.method} ${m.target}`)],
              ["attempt", `${m.attempt} of ${m.max_attempts}`],
              ["last error", m.last_error ? h("span", { class: "error" }, m.last_error) : "–"],
              ["priority", m.priority],
              ["dedup key", m.dedup_key || "–"],
              ["ordering key", m.ordering_key || "–"],
              ["timeout", `${m.timeout_seconds} s`],
              ["created", when(m.created_at)],
              ["scheduled for", when(m.scheduled_at)],
              ["last attempted", when(m.attempted_at)],
              ["finished", when(m.finalized_at)],
            ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
          h("h2", {}, "Attempts"),
          table(attemptColumns, attempts, "Not attempted yet."),
          h("h2", {}, "Body"),
          h("pre", { id: "message-body" }, m.body === null || m.body === undefined ? "(no body)" : JSON.stringify(m.body, null, 2)),
          h("h2", {}, "Headers"),
          h("pre", {}, headers));
      },
    };
  }

  // A schedule is saved whole (PUT takes every field): pausing puts back what GET shows, with
  // `paused` changed, so that nothing else about it changes.
  async function setPaused(name, paused) {
    const s = await api("GET", schedulePath(name));
    return api("PUT", schedulePath(name),
      { queue: s.queue, cron: s.cron, timezone: s.timezone, message: s.message, paused });
  }

  // The next fire time in the browser's zone and, where that differs, in the schedule's own.
  function nextFire(s) {
    if (!s.next_fire_at) return "–";
    const local = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (s.timezone === local) return when(s.next_fire_at);
    const there = new Date(s.next_fire_at).toLocaleString(undefined, { timeZone: s.timezone });
    return h("div", {}, when(s.next_fire_at), h("div", { class: "muted" }, `${there} ${s.timezone}`));
  }

  function schedulesPage() {
    const schedulesHolder = h("div", { id: "schedules" });
    const topicsHolder = h("div", { id: "topics" });
    const scheduleColumns = [
      { label: "schedule", cell: (s) => h("span", {}, h("span", { class: "mono" }, s.name),
          s.paused ? [" ", badge("paused")] : null) },
      { label: "queue", cell: (s) => h("a", { href: `#/queues/${enc(s.queue)}` }, s.queue) },
      { label: "cron", cell: (s) => h("code", {}, s.cron) },
      { label: "timezone", cell: (s) => s.timezone },
      { label: "target", wrap: true, cell: (s) => h("span", { class: "mono" }, `${s.message.method || "POST"} ${s.message.target}`) },
      { label: "next fire", cell: (s) => (s.paused ? h("span", { class: "muted" }, "paused") : nextFire(s)) },
      { label: "last fired", cell: (s) => when(s.last_fired_at) },
      { label: "last message", cell: (s) => (s.last_message_id
          ? h("a", { href: `#/messages/${enc(s.last_message_id)}`, class: "mono last-message" }, s.last_message_id) : "–") },
      { label: "last error", wrap: true, cell: (s) => (s.last_error ? h("span", { class: "error" }, s.last_error) : "–") },
      { label: "", cell: (s) => h("div", { class: "row nowrap" },
          h("button", { type: "button", class: s.paused ? "primary" : null, "data-action": s.paused ? "resume" : "pause",
            onclick: () => act(s.paused ? `Schedule ${s.name} resumed.` : `Schedule ${s.name} paused.`,
              () => setPaused(s.name, !s.paused)) }, s.paused ? "Resume" : "Pause"),
          h("button", { type: "button", class: "danger", "data-action": "delete", onclick: () => {
            if (confirm(`Delete schedule ${s.name}? It fires no more.`)) {
              act(`Schedule ${s.name} deleted.`, () => api("DELETE", schedulePath(s.name)));
            }
          } }, "Delete")) },
    ];
    const subscriptionColumns = (topic) => [
      { label: "subscription", cell: (sub) => h("span", { class: "mono" }, sub.name) },
      { label: "target", wrap: true, cell: (sub) => h("span", { class: "mono" }, sub.target) },
      { label: "queue", cell: (sub) => h("span", {}, h("a", { href: `#/queues/${enc(sub.queue || topic)}` }, sub.queue || topic),
          sub.queue ? null : h("span", { class: "muted" }, " (the topic's name)")) },
      { label: "headers", wrap: true, cell: (sub) => (sub.headers && Object.keys(sub.headers).length
          ? h("span", { class: "mono" }, Object.keys(sub.headers).join(", ")) : "–") },
    ];
    return {
      frame: h("div", {},
        h("h1", {}, "Schedules"),
        h("p", { class: "muted" }, "Each enqueues its message to its queue at every time its cron names, read in its time zone."),
        schedulesHolder,
        h("h1", { class: "section" }, "Topics"),
        h("p", { class: "muted" }, "A message published to a topic becomes one message per subscription."),
        topicsHolder),
      async refresh() {
        const [scheduleList, topicList] = await Promise.all([api("GET", "../v1/schedules"), api("GET", "../v1/topics")]);
        schedulesHolder.replaceChildren(table(scheduleColumns, scheduleList.schedules,
          "No schedules: PUT /v1/schedules/{name} or `ap4k schedules set` makes one."));
        topicsHolder.replaceChildren(...(topicList.topics.length
          ? topicList.topics.map((t) => h("section", { class: "card topic", "data-topic": t.name },
              h("h2", {}, h("span", { class: "mono" }, t.name), h("span", { class: "muted" },
                ` · ${t.subscriptions.length} subscription${t.subscriptions.length === 1 ? "" : "s"}`)),
              table(subscriptionColumns(t.name), t.subscriptions, "No subscriptions: what is published goes nowhere.")))
          : [h("p", { class: "empty card" }, "No topics: PUT /v1/topics/{topic} makes one.")]));
      },
    };
  }

  // -- routing and refresh --------------------------------------------------------------

  let current = null;
  let refreshing = false;
  let again = false;  // a refresh was asked for while one was in flight

  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const params = new URLSearchParams(query || "");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "queues" && parts.length === 2) return queuePage(parts[1], params);
    if (parts[0] === "queues" && parts.length === 3 && parts[2] === "dead") return deadPage(parts[1], params);
    if (parts[0] === "messages" && parts.length === 2) return messagePage(parts[1]);
    if (parts[0] === "schedules" && parts.length === 1) return schedulesPage();
    return queuesPage();
  }

  async function refresh() {
    if (!current) return;
    if (refreshing) { again = true; return; }
    refreshing = true;
    const page = current;
    try {
      await page.refresh();
      if (page === current) {
        updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
        loadError.hidden = true;
      }
      document.body.dataset.loaded = "true";
    } catch (err) {
      if (page === current) {
        // Kept on the page until a refresh succeeds (what it shows may be stale): a flash
        // passes, and a blank page would say nothing.
        loadError.textContent = `Could not load this page: ${err.message}`;
        loadError.hidden = false;
      }
    } finally {
      refreshing = false;
    }
    if (again) {
      again = false;
      await refresh();
    }
  }

  function render() {
    current = route();
    document.body.dataset.loaded = "false";
    loadError.hidden = true;
    view.replaceChildren(current.frame);
    refresh();
  }

  window.addEventListener("hashchange", render);
  setInterval(() => {
    if (autoRefresh.checked && !document.hidden && !tokenDialog.open) refresh();
  }, REFRESH_MS);
  render();
})();
