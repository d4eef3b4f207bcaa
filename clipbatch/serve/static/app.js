// clipbatch serve: the page. Plain JS, no dependencies; it talks to this server's /api only.
// Row, image and thumbnail URLs are always the ones the API returns (keys hold "/" and "#").
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const THUMB = 256;
  const state = {
    info: null,
    tables: [],
    seq: 0, // the latest search; older answers are dropped
    rerun: null, // the last search, to run again when a filter changes from the page
    queryImage: null, // object URL of the last query image
    opener: null, // the element that opened the detail panel
    detailSeq: 0,
  };

  // -- helpers ----------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const svgNS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(svgNS, tag);
    for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
    for (const child of children) el.append(child instanceof Node ? child : String(child));
    return el;
  }

  // `text` with `code` spans (the API's hints use backticks).
  function withCode(text) {
    return String(text)
      .split(/(`[^`]*`)/)
      .map((part) => (part.startsWith("`") && part.endsWith("`") ? h("code", {}, part.slice(1, -1)) : part));
  }

  function withSize(url, size) {
    return url + (url.includes("?") ? "&" : "?") + "size=" + size;
  }

  const dash = "—";
  const fmt = (value) => (value === null || value === undefined || value === "" ? dash : String(value));
  const num = (value, digits = 3) => (typeof value === "number" && isFinite(value) ? value.toFixed(digits) : dash);
  const ms = (value) => (typeof value === "number" ? (value < 10 ? value.toFixed(1) : Math.round(value)) + " ms" : dash);
  const tableName = (t) => (t ? t : "(the root)");

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function describe(response, body, text) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => {
          const where = (d.loc || []).filter((p) => p !== "body").join(".");
          return (where ? where + ": " : "") + (d.msg || JSON.stringify(d));
        })
        .join("; ");
    }
    if (response.status === 401) return "this server needs a token: open the page as /?token=<token>";
    const extra = text ? ": " + text.slice(0, 200) : "";
    return `${response.status} ${response.statusText || "error"}${extra}`;
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { credentials: "same-origin", ...options });
    } catch (err) {
      throw new ApiError(0, `the server did not answer (${err.message})`);
    }
    const type = response.headers.get("content-type") || "";
    let body = null;
    let text = "";
    if (type.includes("json")) {
      try {
        body = await response.json();
      } catch {
        body = null;
      }
    } else {
      text = await response.text();
    }
    if (!response.ok) throw new ApiError(response.status, describe(response, body, text));
    return body;
  }

  const postJSON = (path, body) =>
    api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  function showError(id, err) {
    const box = $(id);
    box.replaceChildren(
      h("strong", {}, err && err.status ? `Error ${err.status}: ` : "Error: "),
      String((err && err.message) || err),
    );
    box.hidden = false;
  }
  const hideError = (id) => {
    $(id).hidden = true;
  };

  function placeholder(text, big = "∅") {
    return h("div", { class: "placeholder", role: "img", "aria-label": text }, h("span", { class: "big" }, big), text);
  }

  function thumbnail(hit) {
    if (hit.missing) return placeholder("not in the table");
    if (hit.has_image === false || !hit.thumbnail) return placeholder("no image");
    const img = h("img", {
      class: "thumb",
      src: withSize(hit.thumbnail, THUMB),
      alt: hit.caption || hit.key,
      loading: "lazy",
      decoding: "async",
    });
    img.addEventListener("error", () => img.replaceWith(placeholder("image unavailable", "!")), { once: true });
    return img;
  }

  function badge(status) {
    return h("span", { class: "badge " + (status === "ok" ? "ok" : "bad") }, status || "?");
  }

  function hitCard(hit, { score = true } = {}) {
    const title = `${hit.key}${hit.table ? " · " + hit.table : ""}\n${hit.caption || ""}`;
    const card = h(
      "button",
      { type: "button", class: "hit", title, dataset: { key: hit.key, table: hit.table || "" } },
      thumbnail(hit),
      h(
        "span",
        { class: "hit-body" },
        h("span", { class: "caption" }, hit.caption || h("em", { class: "muted" }, "no caption")),
        state.tables.length > 1 ? h("span", { class: "part" }, tableName(hit.table)) : null,
        h(
          "span",
          { class: "hit-meta" },
          h("span", { class: "key" }, hit.key),
          hit.status && hit.status !== "ok" ? badge(hit.status) : null,
          score && typeof hit.score === "number" ? h("span", { class: "score" }, hit.score.toFixed(3)) : null,
        ),
      ),
    );
    if (hit.url) card.addEventListener("click", () => openDetail(hit.url, card));
    else card.disabled = true;
    return card;
  }

  // -- info -------------------------------------------------------------------------------
  async function loadInfo() {
    try {
      const info = await api("/api/info");
      state.info = info;
      state.tables = info.tables || [];
      renderInfo(info);
    } catch (err) {
      $("info-root").textContent = "";
      showError("info-error", err);
    }
  }

  function chip(content, cls, title) {
    return h("span", { class: "chip" + (cls ? " " + cls : ""), title }, ...[content].flat());
  }

  function renderInfo(info) {
    $("info-root").textContent = info.root;
    const m = info.model || {};
    const sha = m.checkpoint_sha256 || "";
    const precision =
      m.recorded_precision && m.recorded_precision !== m.precision
        ? `${m.precision} (recorded ${m.recorded_precision})`
        : m.precision;
    const idx = info.index || {};
    const tables = state.tables.length;
    const chips = [
      chip(
        [h("b", {}, info.rows.toLocaleString()), " rows · ", String(info.files), info.files === 1 ? " file" : " files",
          tables > 1 ? ` · ${tables} partitions` : ""],
        "",
      ),
      chip(
        [h("b", {}, m.name || "?"), h("span", { class: "mono" }, sha.slice(0, 12)),
          h("span", {}, "· " + (precision || "?")), h("span", {}, "· " + (m.preprocess || "?") + " preprocessing")],
        "",
        `model ${m.name}\ncheckpoint sha256 ${sha}\nprecision ${precision}\npreprocessing ${m.preprocess}` +
          (m.device ? `\nqueries encoded on ${m.device}` : ""),
      ),
    ];
    if (idx.kind === "knn") {
      chips.push(chip([h("b", {}, "kNN index"), idx.stale ? "stale" : "current"], idx.stale ? "warn" : "good", idx.detail));
    } else {
      chips.push(chip([h("b", {}, idx.kind || "?"), "(no kNN index)"], "", idx.detail));
    }
    $("info-chips").replaceChildren(...chips);
    document.title = `clipbatch serve · ${info.root}`;
    if (m.name) $("info-chips").dataset.model = m.name;

    const wrap = $("partition-wrap");
    if (tables > 1) {
      $("partition").replaceChildren(
        h("option", { value: "" }, "all"),
        ...state.tables.map((t) => h("option", { value: "t:" + t }, tableName(t))),
      );
      wrap.hidden = false;
    }
    if (info.limits && info.limits.max_k) $("k").max = info.limits.max_k;
    const judged = info.judgements || { scores: {}, duplicates: {} };
    const scoreNames = Object.keys(judged.scores || {});
    if (scoreNames.length) {
      $("score-names").replaceChildren(
        ...scoreNames.map((name) => {
          const s = judged.scores[name];
          return h("option", { value: `${name}>=${s.mean === null ? 0 : s.mean}` }, `${name} (${num(s.min, 2)} to ${num(s.max, 2)})`);
        }),
      );
      $("score-filter").placeholder = `${scoreNames[0]}>=value`;
      $("score-wrap").hidden = false;
    }
    const groupings = Object.keys(judged.duplicates || {});
    if (groupings.length) {
      state.grouping = groupings[0];
      $("unique-wrap").title = `${groupings[0]}: ${judged.duplicates[groupings[0]].duplicates.toLocaleString()} rows come after an earlier duplicate`;
      $("unique-wrap").hidden = false;
    }
  }

  // -- search -----------------------------------------------------------------------------
  function optionalNumber(id) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    const value = Number(raw);
    return isFinite(value) ? value : raw; // let the API say what is wrong with it
  }

  function filters() {
    const out = {};
    const status = $("status").value;
    if (status) out.statuses = [status];
    const part = $("partition").value;
    if (part.startsWith("t:") && state.tables.length > 1) out.partitions = [part.slice(2)];
    const lo = optionalNumber("min-sim");
    const hi = optionalNumber("max-sim");
    if (lo !== null) out.min_similarity = lo;
    if (hi !== null) out.max_similarity = hi;
    const scores = $("score-filter").value.split(",").map((x) => x.trim()).filter(Boolean);
    if (scores.length) out.scores = scores;
    if ($("unique").checked && state.grouping) out.unique = state.grouping;
    return out;
  }

  function k() {
    const raw = $("k").value.trim();
    if (raw === "") return 24;
    const value = Number(raw);
    return Number.isInteger(value) ? value : raw;
  }

  function setBusy(busy) {
    const button = $("search-button");
    button.disabled = busy;
    button.textContent = busy ? "Searching…" : "Search";
    $("grid").classList.toggle("loading", busy);
    $("grid").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function runSearch(request, label) {
    const seq = ++state.seq;
    hideError("search-error");
    setBusy(true);
    try {
      const data = await request();
      if (seq !== state.seq) return;
      renderResults(data, label);
    } catch (err) {
      if (seq === state.seq) showError("search-error", err);
    } finally {
      if (seq === state.seq) setBusy(false);
    }
  }

  function searchText() {
    const text = $("q").value;
    const body = { text, k: k(), ...filters() };
    state.rerun = searchText;
    return runSearch(() => postJSON("/api/search", body), { kind: "text" });
  }

  let lastFile = null;
  function searchImage(file) {
    if (!file) return;
    lastFile = file;
    const form = new FormData();
    form.append("file", file, file.name || "image");
    form.append("k", String(k()));
    const f = filters();
    if (f.statuses) form.append("statuses", f.statuses.join(","));
    if (f.partitions) form.append("partitions", f.partitions.join(","));
    // Sent for when the API takes them; checked below in case it does not yet.
    if (f.min_similarity !== undefined) form.append("min_similarity", String(f.min_similarity));
    if (f.max_similarity !== undefined) form.append("max_similarity", String(f.max_similarity));
    if (f.scores) form.append("scores", f.scores.join(","));
    if (f.unique) form.append("unique", f.unique);
    if (state.queryImage) URL.revokeObjectURL(state.queryImage);
    state.queryImage = URL.createObjectURL(file);
    state.rerun = () => searchImage(lastFile);
    return runSearch(() => api("/api/search/image", { method: "POST", body: form }), {
      kind: "image",
      range: [f.min_similarity, f.max_similarity],
    });
  }

  function moreLikeThis(row) {
    const body = { key: row.key, table: row.table, k: k(), ...filters() };
    state.rerun = () => moreLikeThis(row);
    return runSearch(() => postJSON("/api/search", body), { kind: "key", row });
  }

  // From the panel: the panel stays open, with the error, when the API refuses.
  async function moreLikeThisFromPanel(row, button, errorBox) {
    const body = { key: row.key, table: row.table, k: k(), ...filters() };
    const seq = ++state.seq;
    errorBox.hidden = true;
    button.disabled = true;
    setBusy(true);
    try {
      const data = await postJSON("/api/search", body);
      if (seq !== state.seq) return;
      hideError("search-error");
      state.rerun = () => moreLikeThis(row);
      renderResults(data, { kind: "key", row });
      closeDetail(false);
      $("results-title").scrollIntoView({ block: "start" });
    } catch (err) {
      if (seq !== state.seq) return;
      errorBox.replaceChildren(h("strong", {}, err.status ? `Error ${err.status}: ` : "Error: "), err.message);
      errorBox.hidden = false;
    } finally {
      button.disabled = false;
      if (seq === state.seq) setBusy(false);
    }
  }

  function inRange(value, lo, hi) {
    if (lo === undefined && hi === undefined) return true;
    if (typeof value !== "number") return false;
    return (lo === undefined || value >= lo) && (hi === undefined || value <= hi);
  }

  function renderResults(data, label) {
    let hits = data.hits || [];
    const notes = [];
    if (label.kind === "image") {
      const [lo, hi] = label.range;
      const kept = hits.filter((hit) => inRange(hit.similarity, lo, hi));
      if (kept.length !== hits.length) {
        notes.push(
          `${hits.length - kept.length} hit(s) outside the similarity range hidden ` +
            "(the server does not filter image queries by similarity yet)",
        );
        hits = kept;
      }
    }
    // What the query was.
    const q = data.query || {};
    const qLabel = $("query-label");
    if (label.kind === "text") {
      qLabel.replaceChildren(`for “${q.text}”`, q.truncated ? h("span", { class: "badge bad" }, "truncated") : "");
    } else if (label.kind === "image") {
      qLabel.replaceChildren(
        state.queryImage ? h("img", { src: state.queryImage, alt: "the query image" }) : "",
        `like the image ${q.image || ""}`,
        q.width ? h("span", { class: "muted" }, ` (${q.width} × ${q.height})`) : "",
      );
    } else {
      const row = label.row;
      qLabel.replaceChildren(
        "more like ",
        h("button", { type: "button", class: "link mono", onclick: (e) => openDetail(row.url, e.currentTarget) }, q.key || row.key),
        q.table ? ` in ${q.table}` : "",
      );
    }
    // How it was answered.
    const m = data.method || {};
    $("method").replaceChildren(
      ...[
        h("span", { class: "method-detail" }, ...withCode(fmt(m.detail))),
        m.stale ? h("span", { class: "stale" }, "stale index") : null,
        h("span", {}, "filter: " + fmt(m.filter)),
        h("span", {}, `encode ${ms(data.encode_ms)} · search ${ms(data.search_ms)}`),
        h("span", { class: "count" }, `${hits.length} result${hits.length === 1 ? "" : "s"}`),
        ...notes.map((n) => h("span", { class: "stale" }, n)),
      ].filter(Boolean),
    );
    const grid = $("grid");
    if (!hits.length) {
      grid.replaceChildren(h("p", { class: "empty" }, "No row matches this query and these filters."));
      return;
    }
    grid.replaceChildren(...hits.map((hit) => hitCard(hit)));
  }

  // -- the detail panel -------------------------------------------------------------------
  function field(name, value, opts = {}) {
    const dd = h("dd", { class: opts.cls, dataset: { field: opts.field || name } }, value);
    if (opts.title) dd.title = opts.title;
    return [h("dt", {}, name), dd];
  }

  function curationFields(row) {
    const selections = Object.entries(row.curation || {});
    if (!selections.length) return [];
    return [
      h("div", { class: "group" }, "curation"),
      ...selections.flatMap(([name, c]) =>
        field(
          name,
          c.keep
            ? h("span", {}, h("span", { class: "badge ok" }, "kept"), ` in shard ${c.shard}`)
            : h("span", {}, h("span", { class: "badge bad" }, "dropped"), h("ul", { class: "reasons" }, ...c.reasons.map((r) => h("li", {}, r)))),
          { field: "curation:" + name },
        ),
      ),
    ];
  }

  function judgementFields(row) {
    const scores = Object.entries(row.scores || {});
    const groups = Object.entries(row.duplicates || {});
    if (!scores.length && !groups.length) return [];
    return [
      h("div", { class: "group" }, "judgements"),
      ...scores.flatMap(([name, value]) => field(name, num(value, 4), { field: "score:" + name })),
      ...groups.flatMap(([name, g]) =>
        field(
          name,
          g.rank === 0
            ? "first of its duplicate group"
            : h("span", {}, `duplicate #${g.rank} of `, h("span", { class: "mono" }, g.group)),
          { field: "group:" + name, title: `group ${g.group}` },
        ),
      ),
    ];
  }

  function renderDetail(row) {
    $("detail-title").textContent = row.key;
    const open = row.image_sha256 && row.image
      ? h("a", { href: row.image, target: "_blank", rel: "noopener" }, "open the image")
      : null;
    const image = row.image_sha256 && row.image
      ? (() => {
          const img = h("img", { src: row.image, alt: row.caption || row.key });
          img.addEventListener(
            "error",
            () => {
              img.replaceWith(placeholder("the browser cannot show this image", "!"));
              if (open) open.remove();
            },
            { once: true },
          );
          return img;
        })()
      : placeholder(`no image (${row.status})`);
    const errorBox = h("div", { class: "notice error", role: "status", id: "detail-error", hidden: true });
    const more = h("button", { type: "button", class: "primary", id: "more-like-this" }, "More like this");
    more.addEventListener("click", () => moreLikeThisFromPanel(row, more, errorBox));
    const run = row.run || {};
    const size = row.width && row.height ? `${row.width} × ${row.height} px` : dash;
    const sha = row.checkpoint_sha256 || "";
    $("detail-body").replaceChildren(
      h("div", { class: "detail-image" }, image),
      h("p", { class: "detail-caption", dataset: { field: "caption" } }, row.caption || h("em", { class: "muted" }, "no caption")),
      h(
        "div",
        { class: "actions" },
        more,
        open,
      ),
      errorBox,
      h(
        "dl",
        { class: "fields" },
        ...field("status", badge(row.status)),
        row.error ? field("error", row.error, { cls: "err" }) : [],
        ...field("key", h("span", { class: "mono" }, row.key)),
        ...field("partition", tableName(row.table), { field: "table" }),
        ...field("file", `${fmt(row.file)}, row ${fmt(row.row)}`),
        ...field("similarity", num(row.similarity, 4)),
        ...judgementFields(row),
        ...curationFields(row),
        h("div", { class: "group" }, "source"),
        ...field("object", h("span", { class: "mono" }, fmt(row.source_uri)), { field: "source_uri" }),
        ...field("member", h("span", { class: "mono" }, fmt(row.source_member)), { field: "source_member" }),
        ...field("version", h("span", { class: "mono" }, fmt(row.source_version)), { field: "source_version" }),
        ...field("kind", fmt(row.source_kind), { field: "source_kind" }),
        h("div", { class: "group" }, "image"),
        ...field("sha256", h("span", { class: "mono" }, fmt(row.image_sha256)), { field: "image_sha256" }),
        ...field("size", size),
        h("div", { class: "group" }, "model and run"),
        ...field("model", fmt(row.model)),
        ...field("checkpoint", h("span", { class: "mono" }, sha ? sha.slice(0, 16) + "…" : dash), { title: sha }),
        ...field("run", h("span", { class: "mono" }, fmt(run.run_id)), { field: "run_id" }),
        ...field("flow run", fmt(run.flow_run_name), { field: "flow_run_name" }),
        ...field("deployment", fmt(run.deployment)),
        ...field("written at", fmt(run.written_at), { field: "written_at" }),
      ),
    );
  }

  async function openDetail(url, opener) {
    const seq = ++state.detailSeq;
    state.opener = opener || document.activeElement;
    document.querySelectorAll(".hit.current").forEach((el) => el.classList.remove("current"));
    if (opener && opener.classList && opener.classList.contains("hit")) opener.classList.add("current");
    $("detail-title").textContent = "Row";
    $("detail-body").replaceChildren(h("p", { class: "muted" }, "loading…"));
    $("detail").hidden = false;
    $("backdrop").hidden = false;
    $("detail-close").focus();
    try {
      const row = await api(url);
      if (seq === state.detailSeq) renderDetail(row);
    } catch (err) {
      if (seq !== state.detailSeq) return;
      const box = h("div", { class: "notice error", role: "status" });
      $("detail-body").replaceChildren(box);
      box.append(h("strong", {}, err.status ? `Error ${err.status}: ` : "Error: "), err.message);
    }
  }

  function closeDetail(restoreFocus = true) {
    $("detail").hidden = true;
    $("backdrop").hidden = true;
    if (restoreFocus && state.opener && document.contains(state.opener)) state.opener.focus();
  }

  // -- the overview -----------------------------------------------------------------------
  async function loadOverview() {
    try {
      renderOverview(await api("/api/overview"));
    } catch (err) {
      $("by-status").replaceChildren();
      showError("overview-error", err);
    }
  }

  function renderOverview(o) {
    const counts = Object.entries(o.by_status || {});
    const max = Math.max(1, ...counts.map(([, n]) => n));
    $("by-status").replaceChildren(
      ...counts.map(([status, n]) =>
        h(
          "li",
          { dataset: { status } },
          h("span", { class: "label", title: status }, status),
          h("span", { class: "track" }, h("span", { class: "fill" + (status === "ok" ? "" : " bad"), style: `width:${(100 * n) / max}%` })),
          h("span", { class: "count" }, n.toLocaleString()),
        ),
      ),
    );
    if (!counts.length) $("by-status").replaceChildren(h("li", { class: "muted" }, "no rows"));
    // The status filter offers every status the table has.
    const select = $("status");
    const have = new Set([...select.options].map((opt) => opt.value));
    for (const [status] of counts) if (!have.has(status)) select.append(h("option", { value: status }, status));

    renderHistogram(o.similarity || {});

    const parts = Object.entries(o.by_partition || {});
    if (parts.length > 1) {
      const totals = parts.map(([, by]) => Object.values(by).reduce((a, b) => a + b, 0));
      const most = Math.max(1, ...totals);
      $("by-partition").replaceChildren(
        ...parts.map(([name, by], i) => {
          const total = totals[i];
          const ok = by.ok || 0;
          const failed = Object.entries(by).filter(([st, n]) => st !== "ok" && n);
          const title = `${tableName(name)}: ` + Object.entries(by).map(([st, n]) => `${n} ${st}`).join(", ");
          return h(
            "li",
            { dataset: { table: name }, title },
            h("span", { class: "label mono" }, tableName(name)),
            h(
              "span",
              { class: "track stack" },
              h("span", { class: "fill", style: `width:${(100 * ok) / most}%` }),
              h("span", { class: "fill bad", style: `width:${(100 * (total - ok)) / most}%` }),
            ),
            h("span", { class: "count" }, total.toLocaleString()),
            failed.length
              ? h("span", { class: "sub" }, failed.map(([st, n]) => `${n} ${st}`).join(" · "))
              : null,
          );
        }),
      );
      $("by-partition-wrap").hidden = false;
    }

    const failed = o.failed || [];
    const total = o.failed_total ?? failed.length;
    $("failed-title").textContent =
      total > failed.length ? `Failed rows (${failed.length} of ${total.toLocaleString()})` : `Failed rows (${total})`;
    if (!failed.length) {
      $("failed").replaceChildren(h("li", { class: "muted" }, "none: every row is ok"));
      return;
    }
    $("failed").replaceChildren(
      ...failed.map((row) => {
        const button = h(
          "button",
          { type: "button", dataset: { key: row.key } },
          h("span", { class: "row1" }, badge(row.status), h("span", { class: "mono" }, row.key),
            row.table ? h("span", { class: "muted" }, row.table) : null),
          row.error ? h("span", { class: "err" }, row.error) : null,
          row.caption ? h("span", { class: "cap" }, row.caption) : null,
        );
        button.addEventListener("click", () => openDetail(row.url, button));
        return h("li", {}, button);
      }),
    );
  }

  function renderHistogram(sim) {
    const box = $("histogram");
    const edges = (sim.histogram && sim.histogram.edges) || [];
    const counts = (sim.histogram && sim.histogram.counts) || [];
    if (!counts.length || edges.length !== counts.length + 1) {
      box.replaceChildren(h("p", { class: "muted" }, "no row has a caption–image similarity"));
      return;
    }
    const W = 320, H = 120, top = 14, bottom = 18, left = 2, right = 2;
    const plotH = H - top - bottom;
    const max = Math.max(1, ...counts);
    const bw = (W - left - right) / counts.length;
    const lo = edges[0], hi = edges[edges.length - 1];
    const x = (v) => left + ((v - lo) / (hi - lo || 1)) * (W - left - right);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "histogram of caption–image similarity" });
    counts.forEach((n, i) => {
      const bh = (n / max) * plotH;
      const rect = s("rect", {
        class: "bar",
        x: (left + i * bw + 0.5).toFixed(2),
        y: (top + plotH - bh).toFixed(2),
        width: Math.max(bw - 1, 0.5).toFixed(2),
        height: Math.max(bh, n ? 1 : 0).toFixed(2),
      });
      rect.append(s("title", {}, `${edges[i].toFixed(3)} to ${edges[i + 1].toFixed(3)}: ${n} row${n === 1 ? "" : "s"} (click: filter to this range)`));
      rect.addEventListener("click", () => {
        $("min-sim").value = edges[i].toFixed(4);
        $("max-sim").value = edges[i + 1].toFixed(4);
        if (state.rerun) state.rerun();
      });
      svg.append(rect);
    });
    svg.append(s("line", { x1: left, x2: W - right, y1: top + plotH + 0.5, y2: top + plotH + 0.5, stroke: "#c8cfd8" }));
    svg.append(s("text", { class: "axis", x: left, y: H - 3 }, lo.toFixed(3)));
    svg.append(s("text", { class: "axis", x: W - right, y: H - 3, "text-anchor": "end" }, hi.toFixed(3)));
    svg.append(s("text", { class: "axis", x: left, y: 10 }, `max ${max}`));
    if (typeof sim.mean === "number") {
      const mx = x(sim.mean);
      svg.append(s("line", { class: "mean", x1: mx, x2: mx, y1: top - 2, y2: top + plotH }));
      svg.append(s("text", { class: "axis", x: mx, y: H - 3, "text-anchor": "middle" }, `mean ${sim.mean.toFixed(3)}`));
    }
    box.replaceChildren(
      svg,
      h("div", { class: "hist-note" }, `${(sim.rows || 0).toLocaleString()} rows with a similarity; click a bar to filter the results to its range.`),
    );
  }

  // -- duplicates -------------------------------------------------------------------------
  async function loadDuplicates() {
    const box = $("dups");
    try {
      const d = await api("/api/duplicates");
      if (!d.available || !d.available.length) {
        box.replaceChildren(h("p", { class: "muted hint" }, "No near-duplicate pairs yet: ", ...withCode(d.hint || "run `clipbatch dedup ROOT`"), "."));
        return;
      }
      const pairs = d.pairs || [];
      const head = h(
        "p",
        { class: "muted" },
        `${pairs.length} pair${pairs.length === 1 ? "" : "s"} at cosine ≥ ${d.threshold}`,
        d.available.length > 1 ? ` (thresholds written: ${d.available.join(", ")})` : "",
      );
      if (!pairs.length) {
        box.replaceChildren(head);
        return;
      }
      const grid = h("div", { class: "pairs" });
      const pairCard = (p) =>
        h(
          "div",
          { class: "pair" },
          h("div", { class: "pair-cos" }, "cosine ", h("b", {}, num(p.cosine, 4))),
          h("div", { class: "pair-sides" }, hitCard(p.a, { score: false }), hitCard(p.b, { score: false })),
        );
      const FIRST = 6;
      grid.append(...pairs.slice(0, FIRST).map(pairCard));
      const more =
        pairs.length > FIRST
          ? h("button", { type: "button", class: "link more-pairs" }, `show all ${pairs.length} pairs`)
          : null;
      if (more) {
        more.addEventListener("click", () => {
          grid.append(...pairs.slice(FIRST).map(pairCard));
          more.remove();
        });
      }
      box.replaceChildren(head, grid, more || "");
    } catch (err) {
      const note = h("div", { class: "notice error" });
      box.replaceChildren(note);
      note.append(h("strong", {}, err.status ? `Error ${err.status}: ` : "Error: "), err.message);
    }
  }

  // -- wiring -----------------------------------------------------------------------------
  function wire() {
    $("search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      searchText();
    });
    const drop = $("drop");
    const file = $("file");
    drop.addEventListener("click", () => file.click());
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        file.click();
      }
    });
    file.addEventListener("change", () => {
      if (file.files && file.files[0]) searchImage(file.files[0]);
      file.value = "";
    });
    ["dragenter", "dragover"].forEach((type) =>
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      }),
    );
    ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const dropped = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
      if (dropped) searchImage(dropped);
      else showError("search-error", new Error("drop an image file (not a link or text)"));
    });
    // A file dropped beside the zone must not make the browser leave the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    $("clear-filters").addEventListener("click", () => {
      $("status").value = "";
      $("partition").value = "";
      $("min-sim").value = "";
      $("max-sim").value = "";
      $("score-filter").value = "";
      $("unique").checked = false;
      if (state.rerun) state.rerun();
    });
    $("detail-close").addEventListener("click", () => closeDetail());
    $("backdrop").addEventListener("click", () => closeDetail());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !$("detail").hidden) closeDetail();
    });
  }

  wire();
  loadInfo();
  loadOverview();
  loadDuplicates();
})();
