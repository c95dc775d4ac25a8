// The chat page: keeps the conversation, sends it whole to /v1/chat/completions with "stream": true,
// and shows the answer as its server-sent events arrive. Stop aborts the request (the server then
// stops generating); Clear starts a new conversation. Plain JS, no build step, no network but this server.
"use strict";
const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "api_key"];
let history = [];        // [{role, content}] of finished turns
let controller = null;   // the request in flight

for (const id of SETTINGS) {  // settings survive a reload
  const saved = localStorage.getItem("minigpt." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("minigpt." + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

function requestBody() {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  messages.push(...history);
  return {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
    top_k: number("top_k", (v) => parseInt(v, 10)), max_tokens: number("max_tokens", (v) => parseInt(v, 10)),
    seed: number("seed", (v) => parseInt(v, 10)),
  };
}

async function errorBody(response) {
  try { return (await response.json()).error; } catch { return { message: response.status + " " + response.statusText }; }
}

function addNote(message, text, before) {
  const note = document.createElement("span");
  note.className = "meta";
  note.textContent = text;
  before ? message.before(note) : message.appendChild(note);
}

// Server-sent events: "data: {json}\n\n" blocks, ended by "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(question) {
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const answer = addMessage("assistant streaming", "");
  answer.dataset.chunks = "0";
  let text = "", usage = null, finish = null;
  const t0 = performance.now();
  controller = new AbortController();
  setBusy(true);
  try {
    let response, dropped = 0;
    for (;;) {
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal });
      const error = response.ok ? null : await errorBody(response);
      // Too long for the context: drop the oldest question and answer, as generate_finetuned.py does.
      if (error && error.code === "context_length_exceeded" && history.length > 1) {
        history.splice(0, 2);
        dropped += 1;
        continue;
      }
      if (error) throw new Error(error.message);
      break;
    }
    if (dropped) {
      answer.dataset.dropped = String(dropped);
      addNote(answer, `(the ${dropped} oldest turn(s) were left out to fit the context)`, true);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.delta.content) {
        text += choice.delta.content;
        answer.textContent = text;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
    }
    history.push({ role: "assistant", content: text });
    answer.dataset.done = "true";
    const seconds = (performance.now() - t0) / 1000;
    if (usage) $("stats").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} new tokens in ` +
      `${seconds.toFixed(2)} s (${finish === "length" ? "stopped at max tokens" : "finished"})`;
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: the partial answer stays in the conversation
      history.push({ role: "assistant", content: text });
      answer.dataset.done = "stopped";
      addNote(answer, "(stopped)", false);
    } else {
      history.pop();  // the question was not answered: leave it out of the next prompt
      if (!text) answer.remove();
      addMessage("error", e.message);
    }
  } finally {
    answer.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("conversation").replaceChildren();
  $("stats").textContent = "";
  $("question").focus();
});

fetch("/v1/models", { headers: headers() })
  .then((r) => (r.ok ? r.json() : Promise.reject(r)))
  .then((m) => { $("model").textContent = m.data[0].id + " · context " + m.data[0].max_model_len + " tokens"; })
  .catch(() => { $("model").textContent = "(set the API key in Settings)"; });
