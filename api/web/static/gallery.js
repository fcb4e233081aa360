// The Gallery view: one's own recent requests (kept in this browser) and their images.
import { forgetAll, forgetRequest, galleryEntries } from "./store.js";
import { el } from "./ui.js";

const grid = document.getElementById("gallery-grid");
const viewer = document.getElementById("viewer");

export function initGallery() {
  window.addEventListener("gallery-changed", render);
  window.addEventListener("storage", render); // another tab of this page changed it
  document.getElementById("gallery-clear").addEventListener("click", () => {
    if (confirm("Forget every request in this gallery?")) forgetAll();
  });
  viewer.querySelector("button").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (e) => { if (e.target === viewer) viewer.close(); });
  render();
}

function open(image, entry) {
  viewer.querySelector("img").src = image.url;
  viewer.querySelector("img").alt = entry.prompt;
  viewer.querySelector("p").textContent = `${image.model ?? entry.model} · seed ${image.seed} · ${entry.prompt}`;
  viewer.showModal();
}

function render() {
  const entries = galleryEntries();
  if (!entries.length) {
    grid.replaceChildren(el("p", { class: "muted" }, "Nothing yet: the images of your requests appear here."));
    return;
  }
  grid.replaceChildren(...entries.map((entry) => {
    const images = (entry.images ?? []).filter((i) => i.url);
    return el("article", { class: "card entry", dataset: { id: entry.id, state: entry.state } },
      el("div", { class: "thumbs" }, images.length ? images.map((image) =>
        el("button", { type: "button", class: "thumb", title: `seed ${image.seed}`, onclick: () => open(image, entry) },
          el("img", { src: image.url, alt: `seed ${image.seed}`, loading: "lazy" })))
        : el("p", { class: "muted" }, entry.message ?? (entry.state === "faulted" ? "faulted" : "in progress…"))),
      el("p", { class: "prompt" }, entry.prompt),
      el("p", { class: "muted" }, `${entry.model} · ${entry.size} · ${new Date(entry.created).toLocaleString()} · ${entry.state}`),
      el("button", { type: "button", class: "secondary small", onclick: () => forgetRequest(entry.id) }, "Forget"));
  }));
}
