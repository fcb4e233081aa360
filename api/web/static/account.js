// The Account view: the API key (kept in this browser) and the user's details and kudos from
// GET /api/v2/find_user.
import { get, v2 } from "./api.js";
import { ANONYMOUS_KEY, apiKey, setApiKey } from "./store.js";
import { clearError, el, showError } from "./ui.js";

const input = document.getElementById("apikey");
const errorBox = document.getElementById("account-error");
const details = document.getElementById("account-details");
const whoami = document.getElementById("whoami");

export function initAccount() {
  input.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    input.value = apiKey();
    loadAccount();
  });
  document.getElementById("key-anonymous").addEventListener("click", () => {
    setApiKey(ANONYMOUS_KEY);
    input.value = apiKey();
    loadAccount();
  });
  document.getElementById("key-show").addEventListener("change", (e) => {
    input.type = e.target.checked ? "text" : "password";
  });
}

export async function loadAccount() {
  clearError(errorBox);
  try {
    const user = await get(v2("/find_user"));
    whoami.textContent = `${user.username} · ${Math.round(user.kudos)} kudos`;
    const rows = [
      ["User", user.username], ["Kudos", user.kudos.toFixed(2)],
      ["Kudos accumulated", user.kudos_details?.accumulated?.toFixed?.(2)],
      ["Kudos gifted", user.kudos_details?.gifted?.toFixed?.(2)],
      ["Kudos received", user.kudos_details?.received?.toFixed?.(2)],
      ["Images requested", user.usage?.requests], ["Megapixelsteps used", user.usage?.megapixelsteps],
      ["Images generated", user.contributions?.fulfillments],
      ["Workers", user.worker_count], ["Concurrency", user.concurrency],
      ["Trusted", user.trusted ? "yes" : "no"], ["Account age", `${Math.round(user.account_age / 86400)} days`],
    ].filter(([, v]) => v !== undefined && v !== null);
    details.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  } catch (e) {
    whoami.textContent = "";
    details.replaceChildren();
    showError(errorBox, e);
  }
}
