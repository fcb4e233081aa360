// The Chat view: a conversation with a text model through the OpenAI-compatible
// /v1/chat/completions, its answer streamed into the page as it is generated.
import { get, streamChat, v2 } from "./api.js";
import { clearError, el, showError } from "./ui.js";

const log = document.getElementById("chat-log");
const text = document.getElementById("chat-text");
const send = document.getElementById("chat-send");
const stop = document.getElementById("chat-stop");
const errorBox = document.getElementById("chat-error");
let messages = [];
let running = null; // the AbortController of the answer being streamed

export async function initChat() {
  document.getElementById("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ask();
  });
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      ask();
    }
  });
  stop.addEventListener("click", () => running?.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    running?.abort();
    messages = [];
    log.replaceChildren();
  });
  const models = await get(v2("/status/models?type=text"));
  document.getElementById("chat-model").replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name)));
}

function bubble(role, content) {
  const item = el("li", { class: `message ${role}` }, el("span", { class: "role" }, role), el("div", { class: "content" }, content));
  log.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function ask() {
  const content = text.value.trim();
  if (!content || running) return;
  clearError(errorBox);
  text.value = "";
  messages.push({ role: "user", content });
  bubble("user", content);
  const answer = bubble("assistant", "");
  const out = answer.querySelector(".content");
  answer.dataset.chunks = "0";
  running = new AbortController();
  send.disabled = true;
  stop.hidden = false;
  try {
    const finish = await streamChat({
      model: document.getElementById("chat-model").value, messages,
      max_tokens: Number(document.getElementById("chat-max-tokens").value),
    }, (delta) => {
      out.textContent += delta;
      answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
    }, running.signal);
    answer.dataset.finish = finish ?? "stop";
    messages.push({ role: "assistant", content: out.textContent });
  } catch (e) {
    answer.dataset.finish = e.name === "AbortError" ? "stopped" : "error";
    if (e.name !== "AbortError") showError(errorBox, e);
    if (out.textContent) messages.push({ role: "assistant", content: out.textContent });
    else messages.pop(); // nothing came back: the question can be asked again
  } finally {
    running = null;
    send.disabled = false;
    stop.hidden = true;
  }
}
