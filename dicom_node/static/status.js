// Status page of a dicom-node: reads /healthz, /jobs and /studies; retries and cancels through the API.
"use strict";

const STAGES = ["receive", "wait", "queue", "load", "infer", "report", "send", "run"];
const FINAL = new Set(["done", "failed", "not_applicable", "cancelled", "superseded"]);
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("dicom-node-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("dicom-node-token", tokenInput.value));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const short = (uid) => (uid && uid.length > 22 ? uid.slice(0, 10) + "…" + uid.slice(-8) : uid || "—");
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
const seconds = (s) => (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`);

function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.classList.add("show");
  setTimeout(() => box.classList.remove("show"), 3500);
}

async function call(method, path) {
  const headers = {};
  if (tokenInput.value) headers.Authorization = `Bearer ${tokenInput.value}`;
  const response = await fetch(path, { method, headers });
  let body = {};
  try { body = await response.json(); } catch (e) { /* no body */ }
  if (!response.ok) throw new Error(`${response.status}: ${body.detail || response.statusText}`);
  return body;
}

async function act(method, path, done) {
  try {
    await call(method, path);
    toast(done);
  } catch (error) {
    toast(error.message.startsWith("401") ? "A token is required: enter it at the top" : error.message);
  }
  refresh();
}

function timings(job) {
  const t = { ...(job.timings || {}) };
  if (job.started_at && t.queue === undefined) t.queue = job.started_at - job.created_at;
  const total = STAGES.reduce((sum, s) => sum + (t[s] > 0 ? t[s] : 0), 0);
  if (!total) return el("span", { class: "muted" }, job.status === "running" ? "running…" : "—");
  const bar = el("div", { class: "bar", title: STAGES.filter((s) => t[s] !== undefined).map((s) => `${s} ${seconds(t[s])}`).join(", ") },
    STAGES.filter((s) => t[s] > 0).map((s) => el("span", { class: s, style: `width:${(100 * t[s]) / total}%` })));
  const text = el("div", { class: "timing-text" },
    STAGES.filter((s) => t[s] !== undefined).map((s) => `${s} ${seconds(t[s])}`).join(" · "));
  return el("div", {}, bar, text);
}

function outputs(job) {
  if (job.status === "done" && job.outputs) {
    const o = job.outputs;
    const parts = [];
    if (o.derived_series) parts.push(`${o.derived_series.sop_instance_uids.length} derived images: ${o.derived_series.description}`);
    for (const m of o.measurements || []) parts.push(`${m.name}${m.structure ? " (" + m.structure + ")" : ""}: ${m.value} ${m.unit}`);
    const sent = (job.deliveries || []).map((d) => `${d.destination}: ${d.state}${d.last_error ? " (" + d.last_error + ")" : ""}`);
    return el("div", { class: "reason-cell" }, parts.join("\n") || `${o.files.length} file(s)`, sent.length ? el("div", { class: "muted" }, "→ " + sent.join(", ")) : null);
  }
  return el("div", { class: "reason-cell" + (job.status === "failed" ? " bad" : "") }, job.reason || "");
}

function actions(job) {
  const buttons = [];
  if (FINAL.has(job.status) && job.series_instance_uid && job.status !== "superseded")
    buttons.push(el("button", { class: job.status === "failed" ? "retry" : "", type: "button", "data-retry": job.uid,
      onclick: () => act("POST", `/jobs/${job.uid}/retry`, `job ${short(job.uid)} queued again`) }, "Retry"));
  if (!FINAL.has(job.status))
    buttons.push(el("button", { type: "button", "data-cancel": job.uid,
      onclick: () => act("DELETE", `/jobs/${job.uid}`, `job ${short(job.uid)} cancelled`) }, "Cancel"));
  return buttons;
}

function renderCards(health, jobs, studies) {
  const count = (s) => jobs.filter((j) => j.status === s).length;
  const dead = jobs.flatMap((j) => j.deliveries || []).filter((d) => d.state === "dead").length;
  const cards = [
    ["Studies", studies.length, ""], ["Queued", health.jobs_queued, health.jobs_queued ? "warn" : ""],
    ["Running", count("running"), ""], ["Done", count("done"), "ok"],
    ["Failed", count("failed"), count("failed") ? "bad" : ""], ["Not applicable", count("not_applicable"), ""],
    ["Dead-lettered sends", dead, dead ? "bad" : ""],
  ];
  document.getElementById("cards").replaceChildren(...cards.map(([label, n, cls]) =>
    el("div", { class: `card ${cls}` }, el("div", { class: "n" }, n), el("div", { class: "l" }, label))));
}

function renderFailures(jobs) {
  const failed = jobs.filter((j) => j.status === "failed" || (j.deliveries || []).some((d) => d.state === "dead"));
  document.getElementById("failure-count").textContent = failed.length ? `(${failed.length})` : "";
  const box = document.getElementById("failures");
  if (!failed.length) { box.replaceChildren(el("div", { class: "empty" }, "No failures.")); return; }
  box.replaceChildren(...failed.map((job) => el("div", { class: "failure", "data-job": job.uid },
    el("div", { class: "what" },
      el("div", {}, el("strong", {}, job.task), " on study ", el("span", { class: "uid" }, job.study_instance_uid),
        " · job ", el("span", { class: "uid" }, short(job.uid)), " · ", when(job.finished_at), ` · attempt ${job.attempts}`),
      el("div", { class: "reason" }, job.reason || (job.deliveries || []).filter((d) => d.state === "dead").map((d) => `delivery to ${d.destination}: ${d.last_error}`).join("\n"))),
    actions(job))));
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  if (!jobs.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "empty" }, "No jobs yet."))); return; }
  body.replaceChildren(...jobs.map((job) => el("tr", { "data-job": job.uid },
    el("td", {}, el("span", { class: "uid", title: job.uid }, short(job.uid))),
    el("td", {}, job.task, Object.keys(job.options || {}).length ? el("div", { class: "muted" }, el("code", {}, JSON.stringify(job.options))) : null),
    el("td", {}, job.origin),
    el("td", {}, el("div", { class: "uid", title: job.study_instance_uid }, short(job.study_instance_uid)),
      el("div", { class: "uid muted", title: job.series_instance_uid || "" }, short(job.series_instance_uid))),
    el("td", {}, el("span", { class: `badge ${job.status}` }, job.status.replace("_", " "))),
    el("td", {}, timings(job)),
    el("td", {}, when(job.created_at)),
    el("td", {}, outputs(job)),
    el("td", {}, actions(job)))));
}

function renderStudies(studies) {
  const body = document.querySelector("#studies tbody");
  if (!studies.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No studies received yet."))); return; }
  body.replaceChildren(...studies.map((s) => el("tr", {},
    el("td", {}, el("span", { class: "uid" }, s.study_uid)), el("td", {}, s.origin || "dicom"),
    el("td", {}, el("span", { class: `badge ${s.state}` }, s.state)), el("td", {}, s.instance_count),
    el("td", {}, s.generation), el("td", {}, when(s.first_received_at)), el("td", {}, when(s.last_received_at)),
    el("td", {}, (s.jobs || []).map((j) => el("span", { class: `badge ${j.status}`, title: j.uid, style: "margin-right:4px" }, `${j.task}: ${j.status.replace("_", " ")}`))))));
}

function renderFleet(fleet) {
  const section = document.getElementById("fleet");
  section.hidden = fleet.mode !== "queue";
  if (section.hidden) return;
  const queues = Object.entries(fleet.queues).sort();
  document.querySelector("#queues tbody").replaceChildren(...(queues.length ? queues.map(([name, d]) => el("tr", {},
    el("td", {}, name), el("td", {}, d.todo), el("td", {}, d.doing), el("td", {}, d.stalled),
    el("td", {}, d.retrying), el("td", {}, d.dead)))
    : [el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No job waiting or running."))]));
  document.querySelector("#workers tbody").replaceChildren(...(fleet.workers.length ? fleet.workers.map((w) => el("tr", {},
    el("td", {}, w.id), el("td", {}, w.host || "not recorded"), el("td", {}, w.device || ""),
    el("td", {}, (w.analyses || []).join(", ")), el("td", {}, w.pid ?? ""),
    el("td", {}, w.silent ? el("span", { class: "badge failed" }, `${Math.round(w.heartbeat_age_s)} s ago (silent)`)
      : `${Math.round(w.heartbeat_age_s)} s ago`),
    el("td", {}, w.job_uid ? [el("span", { class: "uid", title: w.job_uid }, w.study_uid || w.job_uid), ` ${w.analysis || ""}`] : "idle"),
    el("td", {}, w.queue || "")))
    : [el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No worker registered."))]));
}

async function refresh() {
  const health = document.getElementById("health");
  try {
    const [h, jobs, studies, fleet] = await Promise.all([call("GET", "/healthz"), call("GET", "/jobs?limit=200"),
      call("GET", "/studies"), call("GET", "/fleet")]);
    health.textContent = `online · v${h.version} · ${h.workers_busy} busy`;
    health.className = "pill ok";
    renderCards(h, jobs.jobs, studies.studies);
    renderFailures(jobs.jobs);
    renderJobs(jobs.jobs);
    renderStudies(studies.studies);
    renderFleet(fleet);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
  } catch (error) {
    health.textContent = `unreachable: ${error.message}`;
    health.className = "pill bad";
  }
}

document.getElementById("refresh").addEventListener("click", refresh);
setInterval(() => { if (document.getElementById("auto").checked) refresh(); }, 3000);
refresh();
