// The three pages of the web app. Uploaded photos are previewed locally (object URLs) and sent once,
// with the request that uses them; nothing is kept after it.
"use strict";

const STATUS_EVERY_MS = 10000;
const LABELS = { tryon: "try-on", hair_transfer: "hairstyle", hair_edit: "edit" };
let config = null;

function page() {
  const name = location.pathname.replace(/^\/+|\/+$/g, "");
  return ["tryon", "hair", "edit"].includes(name) ? name : "tryon";
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  Object.entries(attributes).forEach(([key, value]) => node.setAttribute(key, value));
  children.forEach((child) => node.append(child));
  return node;
}

// A row of picture buttons; exactly one is pressed unless an upload replaced the choice.
function choices(container, items, imageUrl, pressed, onPick) {
  container.replaceChildren();
  if (items.length === 0) {
    container.append(element("span", { class: "empty" }, ["none available"]));
    return;
  }
  items.forEach((name, index) => {
    const button = element("button", {
      type: "button", class: "choice", title: name, "data-name": name,
      "aria-pressed": String(index === pressed),
    }, [element("img", { src: imageUrl(name), alt: name, loading: "lazy" })]);
    button.addEventListener("click", () => {
      select(container, name);
      onPick(name, button.querySelector("img").src);
    });
    container.append(button);
  });
}

function select(container, name) {
  container.querySelectorAll(".choice").forEach((button) => {
    button.setAttribute("aria-pressed", String(button.dataset.name === name));
  });
}

function picked(container) {
  const button = container.querySelector('.choice[aria-pressed="true"]');
  return button ? button.dataset.name : "";
}

function showError(section, message) {
  const box = section.querySelector(".error");
  box.textContent = message;
  box.hidden = !message;
}

function tooBig(file) {
  return config && file.size > config.limits.max_bytes
    ? `The photo is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${(config.limits.max_bytes / 2 ** 20).toFixed(0)} MB.`
    : "";
}

// Send a form; show progress while it runs, then the result image or a readable message.
async function submit(section, url, data, what) {
  const button = section.querySelector('button[type="submit"]');
  const progress = section.querySelector(".progress");
  const text = section.querySelector(".progress-text");
  const result = section.querySelector("img.result");
  showError(section, "");
  if (result.src.startsWith("blob:")) URL.revokeObjectURL(result.src);
  result.removeAttribute("src");
  button.disabled = true;
  progress.hidden = false;
  const started = performance.now();
  const tick = () => { text.textContent = `${what}… ${((performance.now() - started) / 1000).toFixed(0)} s`; };
  tick();
  const timer = setInterval(tick, 500);
  try {
    const response = await fetch(url, { method: "POST", body: data });
    if (!response.ok) {
      let message = `The server answered ${response.status}.`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    result.src = URL.createObjectURL(await response.blob());
    result.alt = `${what}: result`;
  } catch (error) {
    const message = error instanceof TypeError
      ? "The web app cannot be reached. Check your connection and try again."
      : error.message;
    showError(section, message);
  } finally {
    clearInterval(timer);
    progress.hidden = true;
    button.disabled = false;
  }
}

function setupTryon(section) {
  const persons = section.querySelector("#persons");
  const garments = section.querySelector("#garments");
  const upload = section.querySelector("#garment-photo");
  const personView = section.querySelector("#tryon-person");
  const garmentView = section.querySelector("#tryon-garment");
  const thumb = (kind) => (name) => `/api/catalogue/${kind}/${encodeURIComponent(name)}`;
  choices(persons, config.persons, thumb("person"), 0, (_, src) => { personView.src = src; });
  choices(garments, config.garments, thumb("garment"), 0, (_, src) => {
    upload.value = "";
    garmentView.src = src;
  });
  if (config.persons.length) personView.src = thumb("person")(config.persons[0]);
  if (config.garments.length) garmentView.src = thumb("garment")(config.garments[0]);
  upload.addEventListener("change", () => {
    const file = upload.files[0];
    if (!file) return;
    select(garments, "");
    garmentView.src = URL.createObjectURL(file);
    showError(section, tooBig(file));
  });
  section.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData();
    data.append("person", picked(persons));
    const file = upload.files[0];
    if (file) data.append("garment_photo", file);
    else data.append("garment", picked(garments));
    if (section.querySelector("#try-anyway").checked) data.append("try_anyway", "true");
    submit(section, "/api/tryon", data, "Trying on");
  });
}

// A photo field of the hair pages, built into its <fieldset data-photo="FIELD"> from the photo-field
// template: a drawn sample (sent as FIELD_sample) or an uploaded photo (sent as FIELD). A fieldset with
// data-same starts on a "Same as ..." choice that sends nothing: the server then uses another photo.
function photoField(section, field, pressed) {
  const fieldset = section.querySelector(`fieldset[data-photo="${field}"]`);
  fieldset.append(document.getElementById("photo-field").content.cloneNode(true));
  fieldset.querySelector("legend").textContent = fieldset.dataset.legend;
  fieldset.querySelector(".upload span").textContent = fieldset.dataset.upload;
  const container = fieldset.querySelector(".samples");
  container.dataset.field = field;
  const upload = fieldset.querySelector('input[type="file"]');
  upload.name = field;
  const view = section.querySelector(`img[data-preview="${field}"]`);
  const show = (src) => {
    view.closest("figure").hidden = !src;
    if (src) view.src = src;
  };
  const sample = (name) => `/api/hair/samples/${encodeURIComponent(name)}`;
  const same = fieldset.dataset.same;
  choices(container, config.hair_samples, sample, same ? -1 : pressed, (_, src) => {
    upload.value = "";
    show(src);
  });
  if (same) {
    const button = element("button", {
      type: "button", class: "choice same", "data-name": "", "aria-pressed": "true",
    }, [`Same as ${same}`]);
    button.addEventListener("click", () => {
      select(container, "");
      upload.value = "";
      show("");
    });
    container.prepend(button);
    show("");
  } else {
    show(sample(config.hair_samples[pressed]));
  }
  upload.addEventListener("change", () => {
    const file = upload.files[0];
    if (!file) return;
    select(container, null);
    show(URL.createObjectURL(file));
    showError(section, tooBig(file));
  });
  return (data) => {
    const file = upload.files[0];
    const name = picked(container);
    if (file) data.append(field, file);
    else if (name) data.append(`${field}_sample`, name);
  };
}

function setupHair(section) {
  const fields = [photoField(section, "face", 0), photoField(section, "shape", 1), photoField(section, "color", 2)];
  section.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData();
    fields.forEach((append) => append(data));
    submit(section, "/api/hair/transfer", data, "Transferring the hairstyle");
  });
}

function setupEdit(section) {
  const portrait = photoField(section, "portrait", 0);
  const direction = section.querySelector("#direction");
  const strength = section.querySelector("#strength");
  const value = section.querySelector("#strength-value");
  config.directions.forEach((name) => {
    direction.append(element("option", { value: name }, [name === "sample" ? "sample (not semantic)" : name]));
  });
  const show = () => { value.textContent = Number(strength.value).toFixed(1); };
  strength.addEventListener("input", show);
  show();
  section.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData();
    portrait(data);
    data.append("direction", direction.value);
    data.append("strength", strength.value);
    submit(section, "/api/hair/edit", data, "Editing");
  });
}

function describe(status) {
  if (!status.reachable) return ["down", `Model server unreachable (Triton at ${status.triton_url})`];
  const parts = status.ensembles.map((ensemble) => {
    const label = LABELS[ensemble.name] || ensemble.name;
    if (!ensemble.ready) return `${label}: not loaded`;
    if (!ensemble.registered_version) return `${label}: loaded (not from the registry)`;
    let text = `${label}: ${ensemble.registered_model} v${ensemble.registered_version}`;
    const production = ensemble.production_version;
    if (production && production !== ensemble.registered_version) text += ` (production is v${production}, not live yet)`;
    else if (production) text += " (production)";
    if (ensemble.random_init) text += ", random-init weights: results are noise";
    return text;
  });
  const server = status.ready ? "Model server ready" : "Model server not ready";
  return [status.ready ? "ready" : "down", [server, ...parts].join(" · ")];
}

async function refreshStatus() {
  const line = document.getElementById("status");
  try {
    const response = await fetch("/api/status");
    const [state, text] = describe(await response.json());
    line.className = `status ${state}`;
    line.textContent = text;
  } catch (_) {
    line.className = "status down";
    line.textContent = "The web app cannot be reached.";
  }
}

async function start() {
  const current = page();
  document.querySelectorAll("nav a").forEach((link) => {
    link.classList.toggle("active", link.dataset.page === current);
  });
  const section = document.getElementById(current);
  section.hidden = false;
  refreshStatus();
  setInterval(refreshStatus, STATUS_EVERY_MS);
  try {
    config = await (await fetch("/api/config")).json();
  } catch (_) {
    showError(section, "The web app cannot be reached. Reload the page to try again.");
    return;
  }
  ({ tryon: setupTryon, hair: setupHair, edit: setupEdit })[current](section);
}

start();
