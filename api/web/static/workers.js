// The Workers & models view: GET /api/v2/workers and /api/v2/status/models.
import { get, v2 } from "./api.js";
import { clearError, el, fillTable, seconds, showError } from "./ui.js";

const errorBox = document.getElementById("workers-error");

export function initWorkers() {
  document.getElementById("workers-refresh").addEventListener("click", loadWorkers);
}

const modelColumns = [
  { label: "Model", value: (m) => m.name },
  { label: "Workers", value: (m) => String(m.count) },
  { label: "Jobs queued", value: (m) => String(m.jobs) },
  { label: "Queued (megapixelsteps / tokens)", value: (m) => String(m.queued) },
  { label: "ETA", value: (m) => seconds(m.eta) },
  { label: "Performance", value: (m) => String(m.performance) },
];

const workerColumns = [
  { label: "Name", value: (w) => w.name },
  { label: "Type", value: (w) => w.type },
  { label: "State", value: (w) => el("span", { class: w.online ? "ok" : "off" },
      w.maintenance_mode ? "maintenance" : w.online ? "online" : "offline") },
  { label: "Models", value: (w) => (w.models ?? []).join(", ") },
  { label: "Threads", value: (w) => String(w.threads ?? "") },
  { label: "Performance", value: (w) => w.performance ?? "" },
  { label: "Jobs done", value: (w) => String(w.requests_fulfilled ?? 0) },
  { label: "Uptime", value: (w) => seconds(w.uptime ?? 0) },
  { label: "Owner", value: (w) => w.owner ?? "" },
];

export async function loadWorkers() {
  clearError(errorBox);
  try {
    const [image, text, workers] = await Promise.all([
      get(v2("/status/models?type=image")), get(v2("/status/models?type=text")), get(v2("/workers"))]);
    fillTable(document.getElementById("image-models"), modelColumns, image, "no image models");
    fillTable(document.getElementById("text-models"), modelColumns, text, "no text models");
    fillTable(document.getElementById("worker-table"), workerColumns, workers, "no workers");
  } catch (e) {
    showError(errorBox, e);
  }
}
