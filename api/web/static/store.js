// What the page keeps in this browser (localStorage): the API key and the gallery of one's
// own recent requests. Nothing here is sent anywhere but to this cluster.
const KEY = "rayhorde.apikey";
const GALLERY = "rayhorde.gallery";
export const ANONYMOUS_KEY = "0000000000";
export const GALLERY_LIMIT = 50; // requests kept; the oldest are forgotten first

export const apiKey = () => localStorage.getItem(KEY) || ANONYMOUS_KEY;

export function setApiKey(key) {
  if (key && key !== ANONYMOUS_KEY) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

// Entries: {id, prompt, model, size, created, state, images: [{url, seed, state, model}],
// message?}. Newest first.
export function galleryEntries() {
  try {
    const entries = JSON.parse(localStorage.getItem(GALLERY) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

function saveGallery(entries) {
  localStorage.setItem(GALLERY, JSON.stringify(entries.slice(0, GALLERY_LIMIT)));
  window.dispatchEvent(new CustomEvent("gallery-changed"));
}

export function rememberRequest(entry) {
  saveGallery([entry, ...galleryEntries().filter((e) => e.id !== entry.id)]);
}

export function updateRequest(id, changes) {
  saveGallery(galleryEntries().map((e) => (e.id === id ? { ...e, ...changes } : e)));
}

export function forgetRequest(id) {
  saveGallery(galleryEntries().filter((e) => e.id !== id));
}

export function forgetAll() {
  saveGallery([]);
}
