// The endpoint's page (app/gateway/page.py). No data without a token; the token lives in this tab's sessionStorage
// only (never a URL, a cookie or a log). Everything shown comes from the gateway's own routes.
"use strict";

const KEY = "clearml-sglang-token";
const $ = (id) => document.getElementById(id);
let timer = null;
let previous = {};  // endpoint -> [completion_tokens, time]: tokens per second between two refreshes
let lang = "curl";
let controller = null;
let history = [];  // the conversation so far: {role, content}, sent whole with each new message

function token() { return sessionStorage.getItem(KEY); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + token() });
  return fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return response.status + ": " + body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

function show(signedIn) {
  $("signin").hidden = signedIn;
  $("deployment").hidden = !signedIn;
  $("links").hidden = !signedIn;
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (timer) clearInterval(timer);
  timer = null;
  $("models").querySelector("tbody").replaceChildren();
  $("model").replaceChildren();
  renderKey(null);
  show(false);
  $("signin-error").hidden = !message;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    td.appendChild(span);
  } else {
    td.textContent = text;
  }
  return td;
}

function number(value) { return value === null || value === undefined ? "–" : String(Math.round(value)); }

function count(value) { return Number(value || 0).toLocaleString("en-US"); }

// Each limit of the caller's key in words; one the page does not know yet is shown as its name and value.
const LIMITS = new Map([
  ["rpm", (v) => count(v) + (v === 1 ? " request/min" : " requests/min")],
  ["tpm", (v) => count(v) + (v === 1 ? " token/min" : " tokens/min")],
  ["concurrent", (v) => count(v) + " at once"],
  ["max_tokens", (v) => "max_tokens " + count(v)],
  ["priority", (v) => "priority " + count(v)],
  ["models", (v) => "models: " + ([].concat(v).join(", ") || "none")],
]);

function limitWords(limits) {
  const words = [];
  for (const [name, value] of Object.entries(limits || {})) {
    if (value === null || value === undefined) continue;
    const word = LIMITS.get(name);
    words.push(word ? word(value) : name + " " + (Array.isArray(value) ? value.join(", ") : String(value)));
  }
  return words;
}

function item(text, className) {
  const li = document.createElement("li");
  li.textContent = text;
  if (className) li.className = className;
  return li;
}

// The caller's own key (null: none, or signed out): its name, limits and usage, never its token.
function renderKey(key) {
  $("key").hidden = !key;
  $("key-name").textContent = key ? key.name : "";
  const words = key ? limitWords(key.limits) : [];
  const items = words.map((text) => item(text));
  if (key && !items.length) items.push(item("no limits", "muted"));
  $("key-limits").replaceChildren(...items);
  const usage = (key && key.usage) || {};
  for (const [id, value] of [["key-requests", usage.requests], ["key-rate-limited", usage.rate_limited],
                             ["key-errors", usage.errors], ["key-prompt-tokens", usage.prompt_tokens],
                             ["key-completion-tokens", usage.completion_tokens],
                             ["key-in-flight", key && key.in_flight]]) {
    $(id).textContent = key ? count(value) : "";
  }
}

function render(status) {
  const now = Date.now() / 1000;
  const body = $("models").querySelector("tbody");
  const rows = [];
  const labels = [...$("models").querySelectorAll("thead th")].map((th) => th.textContent);
  for (const model of status.models) {
    const tr = document.createElement("tr");
    tr.dataset.model = model.id;
    const name = document.createElement("td");
    const label = document.createElement("span");  // (one box: the phone's layout puts it beside its column's name)
    label.textContent = model.id;
    if (model.parent) {
      const base = document.createElement("small");
      base.className = "muted";
      base.textContent = "adapter of " + model.parent;
      label.append(document.createElement("br"), base);
    }
    name.appendChild(label);
    tr.appendChild(name);
    tr.appendChild(cell(model.state, "state state-" + model.state));
    tr.appendChild(cell(model.context ? count(model.context) : "–"));
    const counters = model.parent ? null : status.endpoints[model.id];
    if (counters) {
      const last = previous[model.id];
      const rate = last && now > last[1] ? (counters.completion_tokens - last[0]) / (now - last[1]) : null;
      previous[model.id] = [counters.completion_tokens, now];
      for (const value of [counters.requests, rate === null ? null : Math.max(0, rate), counters.latency_p50_ms,
                           counters.latency_p95_ms, counters.ttft_p50_ms]) tr.appendChild(cell(number(value)));
    } else {
      for (let i = 0; i < 5; i++) tr.appendChild(cell("—"));  // (counted with its base model)
    }
    [...tr.children].forEach((td, i) => { td.dataset.label = labels[i]; });
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $("in-flight").textContent = String(status.in_flight);
  renderKey(status.key || null);
  const select = $("model");
  const ids = status.models.map((m) => m.id);
  if ([...select.options].map((o) => o.value).join() !== ids.join()) {
    const chosen = select.value;
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(chosen)) select.value = chosen;
    snippet();
  }
  const link = $("task-link");
  const url = /^https?:\/\//.test(status.task_url || "") ? status.task_url : null;  // (a link, never a script)
  link.hidden = !url;
  if (url) link.href = url;
}

async function refresh() {
  let response;
  try {
    response = await api("/ui/api/status");
  } catch (e) {
    return;  // the endpoint is unreachable for now: keep what is shown
  }
  if (response.status === 401) { signOut("That token was refused: " + (await errorText(response))); return; }
  if (response.ok) render(await response.json());
}

async function signIn(value) {
  sessionStorage.setItem(KEY, value);
  const response = await api("/ui/api/status");
  if (!response.ok) { signOut("That token was refused: " + (await errorText(response))); return; }
  $("signin-error").hidden = true;
  show(true);
  render(await response.json());
  $("prompt").focus();  // (the next thing to do: write a message)
  timer = setInterval(refresh, 2000);
}

// What Send sends: the system prompt, the conversation so far and the message being written.
function request() {
  const system = $("system").value.trim();
  return {
    model: $("model").value,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history,
               { role: "user", content: $("prompt").value }],
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value),
    stream: $("stream").checked,
  };
}

// Copy `text`, then say so beside the button (`status`): "Copied", or how to copy by hand where the browser
// refuses (a page served over plain HTTP from another host has no clipboard API).
async function copy(text, status) {
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = "Copied";
  } catch (e) {
    status.textContent = "Select it and press Ctrl+C to copy";
  }
  setTimeout(() => { status.textContent = ""; }, 2000);
}

function snippet() {
  const body = request();
  const shown = $("include-token").checked ? token() : "YOUR_TOKEN";
  const base = location.origin;
  const json = JSON.stringify(body, null, 1).replace(/\n\s*/g, " ");  // one line that wraps between values
  let text;
  if (lang === "curl") {
    text = "curl " + base + "/v1/chat/completions" + (body.stream ? " -N" : "") + " \\\n" +
      "  -H 'Authorization: Bearer " + shown + "' -H 'Content-Type: application/json' \\\n" +
      "  -d '" + json.replace(/'/g, "'\\''") + "'";
  } else if (lang === "python") {
    text = "from openai import OpenAI\n\nclient = OpenAI(base_url=" + JSON.stringify(base + "/v1") + ", api_key=" +
      JSON.stringify(shown) + ")\nanswer = client.chat.completions.create(\n    model=" + JSON.stringify(body.model) +
      ",\n    messages=" + JSON.stringify(body.messages) + ",\n    max_tokens=" + body.max_tokens +
      ", temperature=" + body.temperature + ", stream=" + (body.stream ? "True" : "False") + ",\n)\n" +
      (body.stream ? "for chunk in answer:\n    print(chunk.choices[0].delta.content or \"\", end=\"\")\n"
                   : "print(answer.choices[0].message.content)\n");
  } else {
    text = "const response = await fetch(" + JSON.stringify(base + "/v1/chat/completions") + ", {\n" +
      "  method: \"POST\",\n  headers: {Authorization: \"Bearer " + shown + "\", \"Content-Type\": \"application/json\"},\n" +
      "  body: JSON.stringify(" + json + "),\n});\n" +
      (body.stream ? "for await (const part of response.body.pipeThrough(new TextDecoderStream())) console.log(part);\n"
                   : "console.log((await response.json()).choices[0].message.content);\n");
  }
  $("snippet").textContent = text;
}

function turn(who, text) {
  const p = document.createElement("p");
  p.className = "turn";
  const b = document.createElement("b");
  b.textContent = who;
  const span = document.createElement("span");
  span.textContent = text;
  p.append(b, span);
  $("chat").appendChild(p);
  return span;
}

async function send() {
  const body = request();
  const asked = $("prompt").value;
  if (!asked.trim() || controller) return;
  $("play-error").hidden = true;
  turn("You:", asked);
  const out = turn(body.model + ":", "");
  $("prompt").value = "";
  snippet();
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("prompt").focus();  // (where the user writes the next message)
  const started = performance.now();
  let first = null;
  let pieces = 0;
  const stats = (tokens) => {
    const now = performance.now();
    const ttft = first === null ? "–" : Math.round(first - started) + " ms";
    // a stream's rate over the pieces after the first (the first's time is its TTFT); a whole answer's over all
    const rate = body.stream ? (pieces > 1 && now - first > 100 ? (pieces - 1) / ((now - first) / 1000) : null)
                             : (tokens && now > started ? tokens / ((now - started) / 1000) : null);
    $("answer-stats").textContent = "TTFT " + ttft + " · " + (rate === null ? "–" : rate.toFixed(1)) + " tokens/s";
  };
  let answered = false;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    if (!body.stream) {
      const answer = await response.json();
      first = performance.now();
      out.textContent = answer.choices[0].message.content || "";
      stats((answer.usage && answer.usage.completion_tokens) || 0);
    } else {
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const events = buffer.split("\n\n");
        buffer = events.pop();
        for (const event of events) {
          const data = event.replace(/^data: /, "");
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            pieces += 1;
            out.textContent += delta.content;
            stats();
          }
        }
      }
      stats();
    }
    answered = true;
  } catch (e) {
    if (e.name === "AbortError") {
      answered = out.textContent !== "";  // what came before Stop stays in the conversation
      turn("", "(stopped)");
    } else {
      $("play-error").textContent = String(e.message || e);
      $("play-error").hidden = false;
      out.closest(".turn").remove();
      $("chat").lastElementChild.remove();  // the message goes back to the box, to send again
      $("prompt").value = asked;
    }
  } finally {
    if (answered) history.push({ role: "user", content: asked }, { role: "assistant", content: out.textContent });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("prompt").focus();
    snippet();
  }
}

function clear() {
  if (controller) controller.abort();
  history = [];
  $("chat").replaceChildren();
  $("answer-stats").textContent = "";
  $("play-error").hidden = true;
  $("prompt").focus();
  snippet();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (value) signIn(value);
  });
  $("forget").addEventListener("click", () => signOut(""));
  for (const id of ["model", "max-tokens", "temperature", "stream", "include-token", "prompt", "system"]) {
    $(id).addEventListener("input", snippet);
    $(id).addEventListener("change", snippet);
  }
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => {
      lang = tab.dataset.lang;
      for (const other of document.querySelectorAll("[role=tab]")) other.setAttribute("aria-selected", String(other === tab));
      snippet();
    });
  }
  $("base-url").textContent = location.origin + "/v1";
  $("copy-base").addEventListener("click", () => copy($("base-url").textContent, $("copied-base")));
  $("copy").addEventListener("click", () => copy($("snippet").textContent, $("copied")));
  $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", clear);
  if (token()) signIn(token()); else show(false);
});
