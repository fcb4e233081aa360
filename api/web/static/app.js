// The page's entry point: tabs (kept in the URL's #hash) and each view's first load. When
// everything the first view needs has loaded, <html data-ready="true"> is set (tests and
// the page-load figure wait on it).
import { initAccount, loadAccount } from "./account.js";
import { initChat } from "./chat.js";
import { initGallery } from "./gallery.js";
import { initGenerate } from "./generate.js";
import { initWorkers, loadWorkers } from "./workers.js";
import { showError } from "./ui.js";

const TABS = ["generate", "gallery", "chat", "workers", "account"];
const onShow = { workers: loadWorkers, account: loadAccount };

function show(tab) {
  if (!TABS.includes(tab)) tab = "generate";
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  for (const name of TABS) document.getElementById(name).hidden = name !== tab;
  onShow[tab]?.();
}

async function start() {
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.addEventListener("click", () => { location.hash = button.dataset.tab; });
  }
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  initAccount();
  initGallery();
  initWorkers();
  show(location.hash.slice(1));
  const results = await Promise.allSettled([initGenerate(loadAccount), initChat(), loadAccount()]);
  for (const r of results) {
    if (r.status === "rejected") showError(document.getElementById("generate-error"), r.reason);
  }
  performance.mark("ready");
  document.documentElement.dataset.ready = "true";
}

start();
