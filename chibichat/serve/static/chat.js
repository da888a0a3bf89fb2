// The chat page: a conversation kept in the browser, sent whole to the OpenAI-compatible endpoint
// on every turn, with the reply streamed (SSE) into its bubble. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { model: null, messages: [], busy: false, abort: null };

// The sampling settings, or null with the reason shown when a field is empty, not a number or out of
// range: such a value is refused, never clamped or replaced, so a reply is sampled as the page says.
function settings() {
  const t = $("temperature").value.trim();
  const k = $("topk").value.trim();
  const temperature = Number(t);
  const top_k = Number(k);
  let problem = null;
  if (t === "" || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
    problem = "temperature must be a number from 0 to 2" + (t ? `, got ${t}` : "");
  } else if (k === "" || !Number.isInteger(top_k) || top_k < 0 || top_k > 200) {
    problem = "top-k must be a whole number from 0 to 200" + (k ? `, got ${k}` : "");
  }
  if (problem) {
    chat.error = "Error: " + problem + " (fix it in the header, then send again)";
    render();
    announce(chat.error);
    return null;
  }
  localStorage.setItem("chibichat-settings", JSON.stringify({ temperature, top_k }));
  return { temperature, top_k };
}

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem("chibichat-settings") || "{}");
    if (typeof s.temperature === "number") $("temperature").value = s.temperature;
    if (typeof s.top_k === "number") $("topk").value = s.top_k;
  } catch (e) { /* corrupt settings: keep the defaults in the page */ }
}

// The API key (servers started with --api-key) is asked for when the server answers 401, kept for
// this browser tab only (sessionStorage) and sent as a bearer token with every API call.
function headers(extra) {
  const key = sessionStorage.getItem("chibichat-api-key");
  return key ? { ...extra, Authorization: "Bearer " + key } : { ...extra };
}

function askForKey(message) {
  $("auth").hidden = false;
  $("model").textContent = message;
  $("api-key").focus();
}

// The message list is not a live region (it is rebuilt on render and grows with every streamed
// piece): screen readers hear what happened from this status line instead, once per event.
function announce(text) {
  $("status").textContent = text;
}

// The notice (older messages dropped, a reply at its length limit) is a polite live region of its own: it
// stays in the page, collapsed by its CSS while empty, because screen readers announce changes to a live
// region that is already there, not one that appears.
// `add`: one more thing to say about this turn (its context dropped and its length reached, say), kept beside
// what is there rather than replacing it; the same text twice is said once.
function notice(text, add) {
  const now = $("notice").textContent;
  if (add && now.includes(text)) return;
  $("notice").textContent = add && now ? now + " " + text : text;
}

// `name`: the accessible name, which says which message the button acts on (a screen reader's list of
// buttons would otherwise read "Edit, Edit, Edit"); the visible label stays short.
function button(label, onClick, name) {
  const b = document.createElement("button");
  b.textContent = label;
  if (name) b.setAttribute("aria-label", name);
  b.onclick = onClick;
  b.disabled = chat.busy;
  return b;
}

// Rebuild the whole list: conversations are short and this keeps the DOM and the state in step.
function render() {
  const focused = document.activeElement;
  const box = $("messages");
  box.textContent = "";
  chat.messages.forEach((m, i) => {
    const div = document.createElement("div");
    div.className = "msg " + m.role + (m.streaming ? " streaming" : "");
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = m.content;
    div.appendChild(text);
    const actions = document.createElement("div");
    actions.className = "actions";
    const last = i === chat.messages.length - 1;
    const n = i + 1;  // messages are numbered from 1 in the accessible names
    if (m.role === "user") actions.appendChild(button("Edit", () => edit(i, div), `Edit message ${n}`));
    // A last user message has no reply: its turn failed or was stopped before any text came.
    if (m.role === "user" && last && !chat.busy) actions.appendChild(button("Retry", regenerate, `Retry message ${n}`));
    if (m.role === "assistant" && last && !m.streaming) {
      actions.appendChild(button("Regenerate", regenerate, `Regenerate reply ${n}`));
    }
    if (actions.childNodes.length) div.appendChild(actions);
    box.appendChild(div);
  });
  if (chat.error) {
    const e = document.createElement("div");
    e.className = "error";
    e.textContent = chat.error;
    box.appendChild(e);
  }
  box.scrollTop = box.scrollHeight;
  $("send").hidden = chat.busy;
  $("stop").hidden = !chat.busy;
  // Keyboard focus on a button that this render removed or hid (Send, Stop, Retry, ...) would fall to
  // the page: it goes to Stop while a reply streams, else back to the message box.
  if (focused && (!focused.isConnected || focused.hidden)) (chat.busy ? $("stop") : $("input")).focus();
}

function edit(i, div) {
  if (chat.busy) return;
  const area = document.createElement("textarea");
  area.value = chat.messages[i].content;
  area.rows = 3;
  area.setAttribute("aria-label", `Edit message ${i + 1}`);
  div.textContent = "";
  div.appendChild(area);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.appendChild(button("Send", () => {
    const text = area.value.trim();
    if (!text) return;
    const params = settings();
    if (!params) return;
    chat.messages = chat.messages.slice(0, i);  // everything after the edited message is replaced
    chat.messages.push({ role: "user", content: text });
    complete(params);
  }, `Send edited message ${i + 1}`));
  actions.appendChild(button("Cancel", render, `Cancel editing message ${i + 1}`));
  div.appendChild(actions);
  area.focus();
}

function regenerate() {
  if (chat.busy) return;
  const params = settings();
  if (!params) return;
  if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  complete(params);
}

function send() {
  const text = $("input").value.trim();
  if (!text || chat.busy || !chat.model) return;
  // The server takes user and assistant turns in turn: a second user message in a row would be refused.
  if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "user") {
    chat.error = "Error: your last message has no reply: Retry it or Edit it before sending another (or start a New chat)";
    render();
    announce(chat.error);
    return;  // the new message stays in the input
  }
  const params = settings();
  if (!params) return;  // the message stays in the input until the settings are fixed
  $("input").value = "";
  chat.messages.push({ role: "user", content: text });
  complete(params);
}

// Read an SSE body: events are separated by a blank line; TextDecoder(stream) keeps multi-byte
// characters that straddle two network chunks intact.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (event.startsWith("data: ")) yield event.slice(6);
    }
  }
}

// Stream the reply to the conversation with the sampling settings `params` (from settings()).
async function complete(params) {
  chat.error = null;
  notice("");
  const history = chat.messages.map(({ role, content }) => ({ role, content }));
  const reply = { role: "assistant", content: "", streaming: true };
  chat.messages.push(reply);
  chat.busy = true;
  chat.abort = new AbortController();
  render();
  announce("chibichat is replying…");
  const bubble = () => $("messages").querySelector(".msg.assistant.streaming .text");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: chat.model, messages: history, stream: true, truncate_history: true, ...params }),
      signal: chat.abort.signal,
    });
    if (response.status === 401) askForKey("API key required");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + response.status);
    }
    let finished = false;
    for await (const data of events(response)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      if (obj.chibichat && obj.chibichat.dropped_messages) {
        notice(`The conversation outgrew the model's context: the ${obj.chibichat.dropped_messages} oldest messages were left out.`, true);
      }
      const choice = obj.choices && obj.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        reply.content += choice.delta.content;
        const el = bubble();
        if (el) el.textContent = reply.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice && choice.finish_reason === "length") notice("The reply reached its length limit.", true);
    }
    // The server ends every reply with [DONE]: a body that ends before it is a reply cut short.
    if (!finished) throw new Error("the reply was cut off: the connection ended before the server finished it");
  } catch (e) {
    if (e.name !== "AbortError") chat.error = "Error: " + e.message;
    if (!reply.content) chat.messages.pop();
  } finally {
    const stopped = chat.abort.signal.aborted;
    reply.streaming = false;
    chat.busy = false;
    chat.abort = null;
    render();
    announce(chat.error || (stopped ? "Reply stopped" : "Reply finished"));
  }
}

async function init() {
  loadSettings();
  $("send").onclick = send;
  $("stop").onclick = () => chat.abort && chat.abort.abort();
  $("new-chat").onclick = () => { if (!chat.busy) { chat.messages = []; chat.error = null; notice(""); render(); $("input").focus(); } };
  $("input").addEventListener("keydown", (e) => {
    // isComposing: Enter that confirms a Japanese IME conversion must not send the message.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  $("auth").onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem("chibichat-api-key", $("api-key").value.trim());
    $("auth").hidden = true;
    $("input").focus();  // its focused button just hid; askForKey takes the focus back for a wrong key
    connect();
  };
  await connect();
  render();
  $("input").focus();
}

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    if (health.status === "loading") {
      $("model").textContent = "model loading…";
      setTimeout(connect, 1000);
      return;
    }
    if (health.status !== "ok") {  // a model that failed to load does not come back: stop asking, say why
      $("model").textContent = `the model failed to load: ${health.error || health.status}`;
      return;
    }
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      askForKey(sessionStorage.getItem("chibichat-api-key") ? "wrong API key" : "API key required");
      return;
    }
    const models = await response.json();
    chat.model = models.data[0].id;
    $("model").textContent = `${chat.model} · context ${health.context} tokens · ${health.workers} replica(s)`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

init();
