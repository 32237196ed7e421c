"use strict";
// The chat page. Chat mode streams /v1/chat/completions and keeps the conversation as OpenAI messages here.
// Tools and Code Interpreter modes (when the server offers them, GET /v1/agent) stream /v1/agent/chat: the server
// runs the tool calls and code cells (one kernel per conversation id) and sends them as events; the page keeps
// the ChatGLM3 history the server returns and frees the conversation's kernel on Clear, on a mode switch and
// when the page goes away.

const $ = (id) => document.getElementById(id);
let mode = "chat";
let history = [];       // Chat: finished turns as OpenAI messages; Tools / Code Interpreter: ChatGLM3 messages
let conversation = newConversation();
let controller = null;  // aborts the answer being streamed (the server then frees its slot)

function newConversation() {
  return crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + String(Date.now());
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

const PY_KEYWORDS = new Set(("False None True and as assert async await break class continue def del elif else " +
  "except finally for from global if import in is lambda nonlocal not or pass raise return try while with " +
  "yield match case").split(" "));
const PY_TOKENS = /(#[^\n]*)|("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?)|(\b\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?j?\b)|([A-Za-z_]\w*)/g;

// Python source as escaped HTML with spans for comments, strings, numbers, keywords and called names.
function highlightPython(code) {
  let out = "", last = 0;
  for (const m of code.matchAll(PY_TOKENS)) {
    out += escapeHtml(code.slice(last, m.index));
    const [text, comment, string, number, name] = m;
    let cls = comment ? "tok-comment" : string ? "tok-string" : number ? "tok-number" : "";
    if (name) cls = PY_KEYWORDS.has(name) ? "tok-keyword" : /^\s*\(/.test(code.slice(m.index + text.length)) ? "tok-call" : "";
    out += cls ? `<span class="${cls}">${escapeHtml(text)}</span>` : escapeHtml(text);
    last = m.index + text.length;
  }
  return out + escapeHtml(code.slice(last));
}

// The markdown answers need: ``` fences (an unclosed one too, while it streams) and `inline code`; all else is
// escaped text with line breaks.
function renderMarkdown(text) {
  const parts = text.split("```");
  return parts.map((part, i) => {
    if (i % 2 === 0) {  // prose; the line breaks next to a fence belong to the fence
      if (i > 0) part = part.replace(/^\n/, "");
      if (i < parts.length - 1) part = part.replace(/\n$/, "");
      return escapeHtml(part).replace(/`([^`\n]+)`/g, "<code>$1</code>").replace(/\n/g, "<br>");
    }
    const m = part.match(/^([\w+#.-]*)\n([\s\S]*)$/);
    const [lang, code] = m ? [m[1], m[2]] : ["", part];
    const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
    const body = code.replace(/\n$/, "");
    return `<pre><code${cls}>${lang === "python" ? highlightPython(body) : escapeHtml(body)}</code></pre>`;
  }).join("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  div.append(label, content);
  setContent(div, text);
  $("messages").appendChild(div);
  return div;
}

function setContent(div, text) {
  div.querySelector(".content").innerHTML = renderMarkdown(text);
  scrollDown();
}

function scrollDown() {
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function number(id) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

// Parses a text/event-stream body into the JSON of each `data:` line, up to [DONE].
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function post(path, body) {
  const res = await fetch(path, {method: "POST", headers: headers(), signal: controller.signal,
                                 body: JSON.stringify(body)});
  if (!res.ok) {
    const err = await res.json().catch(() => ({}));
    throw new Error(err.error?.message || `HTTP ${res.status}`);
  }
  return res;
}

function sampling() {
  return {temperature: number("temperature"), top_p: number("top_p"),
          max_tokens: Math.round(number("max_tokens")) || undefined};
}

async function sendChat(text, div) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history, {role: "user", content: text});
  let answer = "";
  const finish = () => {
    if (div.isConnected) history.push({role: "user", content: text}, {role: "assistant", content: answer});
  };
  try {
    const res = await post("/v1/chat/completions", {messages, stream: true, ...sampling()});
    for await (const event of events(res.body)) {
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices?.[0]?.delta || {};
      if (delta.content) answer += delta.content;
      for (const call of delta.tool_calls || []) {
        answer += "```json\n" + JSON.stringify({name: call.function.name,
                                               arguments: JSON.parse(call.function.arguments)}, null, 2) + "\n```";
      }
      setContent(div, answer);
    }
  } catch (e) {
    if (e.name === "AbortError") finish();  // stopped half-way: it stays, unless the conversation was cleared
    throw e;
  }
  finish();
}

// One collapsible block of an agent turn: a tool call, an observation, a code cell or its result.
function addBlock(div, kind, title, html, open) {
  const block = document.createElement("details");
  block.className = `block ${kind}`;
  block.open = open;
  const summary = document.createElement("summary");
  summary.textContent = title;
  const body = document.createElement("div");
  body.className = "body";
  body.innerHTML = html;
  block.append(summary, body);
  div.querySelector(".content").appendChild(block);
  scrollDown();
  return block;
}

function appendText(div, delta) {
  const content = div.querySelector(".content");
  let last = content.lastElementChild;
  if (!last || !last.classList.contains("text")) {
    last = document.createElement("div");
    last.className = "text";
    last.dataset.raw = "";
    content.appendChild(last);
  }
  last.dataset.raw += delta;
  last.innerHTML = renderMarkdown(last.dataset.raw);
  scrollDown();
}

function showEvent(div, event) {
  switch (event.type) {
    case "text":
      return appendText(div, event.delta);
    case "tool_call":
      return addBlock(div, "tool-call", `Tool call: ${event.name}`,
                      `<pre><code class="language-json">${escapeHtml(JSON.stringify(event.arguments, null, 2))}</code></pre>`,
                      false);
    case "observation":
      return addBlock(div, "observation", `Observation: ${event.name}`, `<pre>${escapeHtml(event.content)}</pre>`,
                      false);
    case "code":
      return addBlock(div, "code", "Code", `<pre><code class="language-python">${highlightPython(event.code)}</code></pre>`,
                      true);
    case "result": {
      const images = (event.images || []).map((b64) => `<img class="figure" alt="figure" src="data:image/png;base64,${b64}">`);
      const block = addBlock(div, event.error ? "result error" : "result", event.error ? "Result (error)" : "Result",
                             `<pre>${escapeHtml(event.text.replace(/^```result\n/, "").replace(/\n```$/, ""))}</pre>` +
                             images.join(""), true);
      return block;
    }
    case "error":
      throw new Error(event.message);
  }
}

async function sendAgent(text, div) {
  const res = await post("/v1/agent/chat", {conversation_id: conversation, mode, query: text, history,
                                            ...sampling()});
  for await (const event of events(res.body)) {
    if (event.type === "done") {
      if (div.isConnected) history = event.history;
      div.dataset.finish = event.finish_reason;
    } else {
      showEvent(div, event);
    }
  }
}

async function send(text) {
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.dataset.state = "streaming";
  setBusy(true);
  controller = new AbortController();
  try {
    await (mode === "chat" ? sendChat(text, div) : sendAgent(text, div));
    div.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      div.dataset.state = "stopped";
    } else {
      div.classList.add("error");
      div.dataset.state = "error";
      setContent(div, `Error: ${e.message}`);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

// Forget the conversation here, and its kernel on the server.
function release() {
  if (mode !== "chat") {
    const body = new Blob([JSON.stringify({conversation_id: conversation})], {type: "application/json"});
    const key = $("api_key").value.trim();
    if (key) {
      fetch("/v1/agent/release", {method: "POST", headers: headers(), body, keepalive: true}).catch(() => {});
    } else {
      navigator.sendBeacon("/v1/agent/release", body);
    }
  }
  conversation = newConversation();
  history = [];
}

function clear() {
  controller?.abort();
  release();
  $("messages").replaceChildren();
}

function setMode(next) {
  if (next === mode) return;
  clear();
  mode = next;
  document.body.dataset.mode = mode;
  for (const b of document.querySelectorAll("#modes button")) b.setAttribute("aria-selected", String(b.dataset.mode === mode));
}

$("settings").addEventListener("submit", (e) => e.preventDefault());

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", clear);
for (const b of document.querySelectorAll("#modes button")) b.addEventListener("click", () => setMode(b.dataset.mode));
window.addEventListener("pagehide", release);

fetch("/v1/models", {headers: headers()}).then((r) => r.ok ? r.json() : null).then((body) => {
  if (!body?.data?.length) return;
  $("model").textContent = body.data[0].id;
  $("max_tokens").max = body.data[0].max_model_len;
}).catch(() => {});

fetch("/v1/agent", {headers: headers()}).then((r) => r.ok ? r.json() : null).then((body) => {
  const modes = body?.modes || ["chat"];
  for (const b of document.querySelectorAll("#modes button")) b.hidden = !modes.includes(b.dataset.mode);
  $("modes").hidden = modes.length < 2;
  if (body?.tools?.length) {
    $("tool_list").textContent = "Tools: " + body.tools.join(", ");
    $("tool_list").hidden = false;
  }
  if (body?.sampling) {  // the model's own defaults (temperature 0: greedy); a field already edited keeps its value
    $("temperature").defaultValue = body.sampling.temperature;
    $("top_p").defaultValue = body.sampling.top_p;
  }
  document.body.dataset.modes = modes.join(" ");
}).catch(() => {});
