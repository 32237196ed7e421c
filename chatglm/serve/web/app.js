"use strict";
// The chat page: streams /v1/chat/completions (server-sent events over fetch) and keeps the conversation here.

const $ = (id) => document.getElementById(id);
let history = [];       // finished turns as OpenAI messages
let controller = null;  // aborts the answer being streamed (the server then frees its slot)

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
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
    return `<pre><code${cls}>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
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

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history, {role: "user", content: text});
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.dataset.state = "streaming";
  setBusy(true);
  controller = new AbortController();
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({messages, stream: true, temperature: number("temperature"), top_p: number("top_p"),
                            max_tokens: Math.round(number("max_tokens")) || undefined}),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error?.message || `HTTP ${res.status}`);
    }
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
    if (div.isConnected) history.push({role: "user", content: text}, {role: "assistant", content: answer});
    div.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: keep what was said, unless the conversation was cleared
      if (div.isConnected) history.push({role: "user", content: text}, {role: "assistant", content: answer});
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

$("clear").addEventListener("click", () => {
  controller?.abort();
  history = [];
  $("messages").replaceChildren();
});

fetch("/v1/models", {headers: headers()}).then((r) => r.ok ? r.json() : null).then((body) => {
  if (!body?.data?.length) return;
  $("model").textContent = body.data[0].id;
  $("max_tokens").max = body.data[0].max_model_len;
}).catch(() => {});
