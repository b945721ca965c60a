// qadapter playground: the base model and a Q-Adapter answer one prompt side by side, streamed from
// this server's own OpenAI-compatible /v1/chat/completions (server-sent events). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let baseName = null;
let controller = null;

// With `qadapter serve --api-key`, the API needs "Authorization: Bearer <key>". The page takes the key
// from the address (`/#key=...`, never sent to the server as part of the URL) or asks for it at the first
// 401, and keeps it in this tab's sessionStorage only.
const KEY_STORE = "qadapter-api-key";
(function keyFromHash() {
  const match = /(?:^#|&)key=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname);
  }
})();

function authHeaders(extra) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// fetch with the key; at a 401 ask for the key once and retry.
async function apiFetch(url, options) {
  let response = await fetch(url, { ...options, headers: authHeaders(options && options.headers) });
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key (qadapter serve --api-key):");
    if (key) {
      sessionStorage.setItem(KEY_STORE, key.trim());
      response = await fetch(url, { ...options, headers: authHeaders(options && options.headers) });
    }
  }
  return response;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

function adapterCard() {
  return models.find((m) => m.id === $("adapter").value);
}

function syncStrength() {
  const card = adapterCard();
  const usable = Boolean(card && card.qadapter && card.qadapter.strength);
  $("strength").disabled = !usable;
  $("strength-value").textContent = usable ? Number($("strength").value).toFixed(1) : "n/a";
  $("custom-title").textContent = card
    ? `Customized: ${card.id}` + (usable ? ` (strength ${Number($("strength").value).toFixed(1)})` : "")
    : "Customized";
}

async function loadModels() {
  const response = await apiFetch("/v1/models");
  const body = await response.json();
  models = body.data || [];
  const base = models.find((m) => m.qadapter && m.qadapter.kind === "base");
  baseName = base ? base.id : null;
  $("base-title").textContent = baseName ? `Base model: ${baseName}` : "Base model";
  const select = $("adapter");
  select.innerHTML = "";
  for (const m of models) {
    if (!m.qadapter || m.qadapter.kind !== "adapter") continue;
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    select.appendChild(option);
  }
  syncStrength();
  setStatus(`${models.length} models: ${models.map((m) => m.id).join(", ")}`);
}

// One streamed chat completion; calls onText(delta) per piece; resolves to {finish, usage, ttft}.
async function streamChat(payload, onText, signal) {
  const started = performance.now();
  const response = await apiFetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...payload, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const err = await response.json();
      message = err.error ? `${err.error.message}` : message;
    } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const result = { finish: null, usage: null, ttft: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return result;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) result.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (result.ttft === null) result.ttft = performance.now() - started;
            onText(text);
          }
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
      }
    }
  }
  return result;
}

function describe(result, seconds) {
  const parts = [];
  if (result.usage) parts.push(`${result.usage.completion_tokens} tokens`);
  if (result.ttft !== null) parts.push(`first token ${(result.ttft / 1000).toFixed(2)} s`);
  parts.push(`total ${seconds.toFixed(2)} s`);
  if (result.finish) parts.push(`finish: ${result.finish}`);
  return parts.join(" · ");
}

async function run(side, payload, signal) {
  const output = $(`${side}-output`);
  const meta = $(`${side}-meta`);
  output.textContent = "";
  meta.textContent = "…";
  const t0 = performance.now();
  try {
    const result = await streamChat(payload, (text) => { output.textContent += text; }, signal);
    meta.textContent = describe(result, (performance.now() - t0) / 1000);
    return true;
  } catch (err) {
    if (err.name === "AbortError") { meta.textContent = "stopped"; return false; }
    meta.textContent = `error: ${err.message}`;
    setStatus(err.message, true);
    return false;
  }
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("Type a prompt first.", true); return; }
  const card = adapterCard();
  if (!card) { setStatus("This server has no adapter to compare with.", true); return; }
  if (controller) controller.abort();
  controller = new AbortController();
  document.body.dataset.state = "running";
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("Generating…");
  const common = {
    messages: [{ role: "user", content: prompt }],
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value) || 0,
    seed: 0,
  };
  const custom = { ...common, model: card.id };
  if (card.qadapter.strength) custom.strength = Number($("strength").value);
  const [okBase, okCustom] = await Promise.all([
    run("base", { ...common, model: baseName }, controller.signal),
    run("custom", custom, controller.signal),
  ]);
  $("send").disabled = false;
  $("stop").disabled = true;
  if (okBase && okCustom) setStatus("Done.");
  document.body.dataset.state = "done";
}

$("strength").addEventListener("input", syncStrength);
$("adapter").addEventListener("change", syncStrength);
$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
loadModels().catch((err) => setStatus(`Cannot list the models: ${err.message}`, true));
