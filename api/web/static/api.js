// The public API as the page uses it: the AI Horde v2 under /api/v2 and the OpenAI-compatible
// /v1, same origin, with the key kept in this browser. Errors carry the API's own message.
import { apiKey } from "./store.js";

const CLIENT_AGENT = "rayhorde-web:1:local";

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(extra = {}) {
  return { apikey: apiKey(), "Client-Agent": CLIENT_AGENT, ...extra };
}

// The horde answers {message, rc}; /v1 answers {error: {message}}.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body.message ?? body.error?.message ?? message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = Number(response.headers.get("Retry-After"));
  return new ApiError(response.status, message, Number.isFinite(retry) && retry > 0 ? retry : null);
}

export async function call(method, path, body = undefined) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the cluster did not answer (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const del = (path) => call("DELETE", path);

export const v2 = (path) => `/api/v2${path}`;

// The enums the API accepts (samplers, post-processors), from its own OpenAPI schema, so the
// page offers exactly what the cluster takes.
let schema = null;
export async function openapi() {
  schema ??= await get("/api/openapi.json");
  return schema;
}

export async function enumOf(schemaName, property) {
  const doc = await openapi();
  let prop = doc.components.schemas[schemaName].properties[property];
  if (prop.items) prop = prop.items;
  if (prop.anyOf) prop = prop.anyOf.find((p) => p.enum || p.$ref || p.items) ?? prop;
  if (prop.items) prop = prop.items;
  if (prop.$ref) prop = doc.components.schemas[prop.$ref.split("/").pop()];
  return prop.enum ?? [];
}

// A streamed chat completion: calls onDelta(text) for each piece of the answer as it arrives
// (server-sent events), resolves with the finish reason.
export async function streamChat(body, onDelta, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", signal,
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ ...body, stream: true }),
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the cluster did not answer (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(502, chunk.error.message ?? "the stream failed");
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) onDelta(choice.delta.content);
        if (choice?.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}
