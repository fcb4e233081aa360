// Small DOM helpers shared by the views.

// el("p", {class: "muted"}, "text", child): an element with attributes and children. Text is
// always set as text, never parsed as HTML (prompts and worker names are not trusted).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function showError(node, error) {
  node.textContent = error?.message ?? String(error);
  node.hidden = false;
}

export function clearError(node) {
  node.textContent = "";
  node.hidden = true;
}

// A table from rows of objects: columns [{label, value: row => text or node}].
export function fillTable(table, columns, rows, empty = "none") {
  const head = el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c.label))));
  const body = el("tbody", {}, rows.length
    ? rows.map((row) => el("tr", {}, columns.map((c) => el("td", {}, c.value(row) ?? ""))))
    : el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, empty)));
  table.replaceChildren(head, body);
}

// An image's src from what the API gives: a URL (r2) or base64 WebP.
export const imageSrc = (img) =>
  /^(https?:|\/)/.test(img) ? img : `data:image/webp;base64,${img}`;

export const seconds = (s) => (s >= 120 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);
