// The Generate view: the form (every workflow the cluster offers), submitting to
// POST /api/v2/generate/async, and each request's live progress and images.
import { ApiError, enumOf, get, post, del, v2 } from "./api.js";
import { galleryEntries, rememberRequest, updateRequest } from "./store.js";
import { clearError, el, imageSrc, seconds, showError } from "./ui.js";

const MAX_LORAS = 5;
const POLL_MS = 1000;
const FACE_FIXERS = new Set(["GFPGAN", "CodeFormers"]);
const ENDED = new Set(["done", "faulted", "cancelled"]);

const form = document.getElementById("generate-form");
const errorBox = document.getElementById("generate-error");
const jobs = document.getElementById("jobs");
const tracked = new Set();

export async function initGenerate(onFinished) {
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit(onFinished);
  });
  document.getElementById("price-button").addEventListener("click", price);
  document.getElementById("add-lora").addEventListener("click", () => addLora());
  const [models, samplers, postProcessors, alchemists] = await Promise.all([
    get(v2("/status/models?type=image")), enumOf("ImageParams", "sampler_name"),
    enumOf("ImageParams", "post_processing"), get(v2("/workers?type=interrogation"))]);
  fillModels(models);
  const sampler = document.getElementById("sampler");
  sampler.replaceChildren(...samplers.map((s) => el("option", { selected: s === "k_euler" }, s)));
  // The post-processors the cluster serves are those its alchemy workers list; with none
  // online, every one the API takes is offered (image workers may still run them).
  const served = new Set(alchemists.filter((w) => w.online).flatMap((w) => w.models ?? []));
  const offered = postProcessors.filter((name) => served.has(name));
  document.getElementById("post-processing").replaceChildren(...(offered.length ? offered : postProcessors).map((name) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", name: "post_processing", value: name }), ` ${name}`)));
  // Requests still running when the page was last closed go on being followed.
  for (const entry of galleryEntries()) {
    if (!ENDED.has(entry.state)) follow(entry, onFinished);
  }
}

function fillModels(models) {
  const select = document.getElementById("model");
  const current = select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.name, selected: m.name === current },
    `${m.name} — ${m.count} worker${m.count === 1 ? "" : "s"}, ${m.jobs} queued`)));
}

function addLora(name = "", strength = 1) {
  const rows = document.getElementById("loras");
  if (rows.children.length >= MAX_LORAS) return;
  const row = el("div", { class: "row lora" },
    el("label", {}, "Name ", el("input", { name: "lora_name", maxlength: 255, value: name, placeholder: "tiny-lora" })),
    el("label", {}, "Strength ", el("input", { name: "lora_strength", type: "number", min: -5, max: 5, step: 0.05, value: strength })),
    el("button", { type: "button", class: "secondary", onclick: () => row.remove() }, "Remove"));
  rows.append(row);
}

const readBase64 = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
  reader.onerror = () => reject(new Error(`could not read ${file.name}`));
  reader.readAsDataURL(file);
});

// The request body, as the AI Horde takes it. Values go as typed: the API checks them and
// names the field it refuses.
async function requestBody() {
  const f = new FormData(form);
  const num = (name) => Number(f.get(name));
  const prompt = String(f.get("prompt")).trim();
  const negative = String(f.get("negative")).trim();
  const params = {
    sampler_name: f.get("sampler_name"), width: num("width"), height: num("height"),
    steps: num("steps"), cfg_scale: num("cfg_scale"), n: num("n"), karras: f.has("karras"),
  };
  const seed = String(f.get("seed")).trim();
  if (seed) params.seed = seed;
  const body = { prompt: negative ? `${prompt} ### ${negative}` : prompt, models: [f.get("model")],
                 params, nsfw: f.has("nsfw"), r2: true };
  const source = f.get("source_image");
  if (source && source.size) {
    body.source_image = await readBase64(source);
    body.source_processing = f.get("source_processing");
    params.denoising_strength = num("denoising_strength");
    const mask = f.get("source_mask");
    if (mask && mask.size) body.source_mask = await readBase64(mask);
  }
  if (f.has("hires_fix")) {
    params.hires_fix = true;
    params.hires_fix_denoising_strength = num("hires_fix_denoising_strength");
  }
  const names = f.getAll("lora_name"), strengths = f.getAll("lora_strength");
  const loras = names.map((name, i) => ({ name: String(name).trim(), model: Number(strengths[i]), clip: 1 }))
    .filter((l) => l.name);
  if (loras.length) params.loras = loras;
  const post = f.getAll("post_processing");
  if (post.length) {
    params.post_processing = post;
    if (post.some((p) => FACE_FIXERS.has(p))) params.facefixer_strength = num("facefixer_strength");
  }
  if (f.has("qr_enabled")) {
    params.workflow = "qr_code";
    params.extra_texts = ["qr_code", "protocol", "module_drawer", "function_layer_prompt",
                          "x_offset", "y_offset", "qr_border"]
      .map((reference) => ({ reference, text: String(f.get(reference) ?? "").trim() }))
      .filter((t) => t.text !== "");
  }
  return body;
}

async function price() {
  clearError(errorBox);
  const out = document.getElementById("price");
  try {
    const answer = await post(v2("/generate/async"), { ...(await requestBody()), dry_run: true });
    out.textContent = `${answer.kudos} kudos`;
  } catch (e) {
    out.textContent = "";
    showError(errorBox, e);
  }
}

async function submit(onFinished) {
  clearError(errorBox);
  const button = document.getElementById("generate-button");
  button.disabled = true;
  const clickedAt = performance.now();
  performance.mark("generate-click");
  try {
    const body = await requestBody();
    const answer = await post(v2("/generate/async"), body);
    const entry = {
      id: answer.id, prompt: body.prompt, model: body.models[0], size: `${body.params.width}×${body.params.height}`,
      n: body.params.n, created: Date.now(), state: "waiting", images: [],
      warnings: (answer.warnings ?? []).map((w) => w.message),
    };
    rememberRequest(entry);
    follow(entry, onFinished, clickedAt);
  } catch (e) {
    showError(errorBox, e);
  } finally {
    button.disabled = false;
  }
}

// A request's card: its progress while it runs, its images as they finish.
function jobCard(entry) {
  const card = el("article", { class: "card job", dataset: { id: entry.id, state: entry.state } },
    el("header", {},
      el("strong", {}, entry.model), el("span", { class: "muted" }, ` ${entry.size} · ${entry.prompt}`)),
    el("progress", { max: entry.n || 1, value: 0 }),
    el("p", { class: "status muted" }, "queued"),
    entry.warnings?.length ? el("p", { class: "warning" }, entry.warnings.join("; ")) : null,
    el("div", { class: "thumbs" }),
    el("button", { type: "button", class: "secondary cancel" }, "Cancel"));
  card.querySelector(".cancel").addEventListener("click", async () => {
    try {
      await del(v2(`/generate/status/${entry.id}`));
    } catch (e) {
      showError(errorBox, e);
    }
  });
  jobs.prepend(card);
  return card;
}

function describe(check) {
  if (check.faulted) return "faulted";
  if (check.done) return "done";
  const parts = [];
  if (check.waiting) parts.push(`queue position ${check.queue_position}`, `about ${seconds(check.wait_time)} to wait`);
  if (check.processing) parts.push(`${check.processing} generating`);
  parts.push(`${check.finished} finished`);
  if (!check.is_possible) parts.push("no worker can take it right now");
  return parts.join(" · ");
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function follow(entry, onFinished, clickedAt = null) {
  if (tracked.has(entry.id)) return;
  tracked.add(entry.id);
  const card = jobCard(entry);
  const status = card.querySelector(".status");
  const thumbs = card.querySelector(".thumbs");
  const shown = new Set();
  let seen = -1;
  const showImages = (generations) => {
    for (const g of generations) {
      if (shown.has(g.id)) continue;
      shown.add(g.id);
      const img = el("img", { src: imageSrc(g.img), alt: `seed ${g.seed}`, dataset: { state: g.state } });
      img.addEventListener("load", () => {
        img.classList.add("loaded");
        if (clickedAt !== null && !card.dataset.firstImageMs) {
          card.dataset.firstImageMs = String(Math.round(performance.now() - clickedAt));
          performance.mark("first-image");
        }
      }, { once: true });
      thumbs.append(el("figure", {}, img, el("figcaption", {}, `${g.state === "ok" ? "" : g.state + " · "}seed ${g.seed}`)));
    }
    updateRequest(entry.id, { images: generations.map((g) => ({ url: /^https?:|^\//.test(g.img) ? g.img : null,
                                                                   seed: g.seed, state: g.state, model: g.model })) });
  };
  for (;;) {
    let check;
    try {
      check = await get(v2(`/generate/check/${entry.id}`));
    } catch (e) {
      if (e instanceof ApiError && e.status === 429) {
        await sleep((e.retryAfter ?? 2) * 1000);
        continue;
      }
      status.textContent = e.message;
      card.dataset.state = e.status === 404 ? "expired" : "error";
      updateRequest(entry.id, { state: card.dataset.state, message: e.message });
      break;
    }
    card.querySelector("progress").value = check.finished;
    status.textContent = describe(check);
    const ended = check.done || check.faulted;
    if (check.finished !== seen || ended) {
      seen = check.finished;
      try {
        const full = await get(v2(`/generate/status/${entry.id}`));
        showImages(full.generations);
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 429)) status.textContent = e.message;
        seen = -1; // try again next round
      }
    }
    if (ended && seen === -1) {  // the last images are still to be fetched
      await sleep(POLL_MS);
      continue;
    }
    if (ended) {
      const state = check.faulted ? "faulted" : "done";
      card.dataset.state = state;
      card.querySelector(".cancel").remove();
      updateRequest(entry.id, { state });
      onFinished?.();
      break;
    }
    await sleep(POLL_MS);
  }
}
