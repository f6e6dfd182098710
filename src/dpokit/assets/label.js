// dpokit label: shows the next unlabelled pair and posts the choice. Every text goes in with
// textContent (never parsed as HTML): prompts and completions are untrusted.
"use strict";

const KEYS = { "1": "left", "2": "right", t: "tie", s: "skip" };
let current = null;
let busy = false;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function show(state) {
  current = state.pair;
  text("progress", `${state.labelled} of ${state.total} labelled — saved to ${state.file}`);
  const warnings = document.getElementById("warnings");
  warnings.replaceChildren(...state.warnings.map((w) => {
    const item = document.createElement("li");
    item.textContent = w;
    return item;
  }));
  document.getElementById("pair").hidden = current === null;
  document.getElementById("done").hidden = current !== null;
  if (current === null) {
    text("done", `All ${state.total} pairs are labelled. The labels are in ${state.file}.`);
    return;
  }
  document.getElementById("pair").dataset.pairId = current.id;
  document.getElementById("pair").dataset.index = String(current.index);
  text("prompt", current.prompt);
  text("left", current.left);
  text("right", current.right);
  window.scrollTo(0, 0);
}

function fail(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

async function call(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const answer = await response.json();
  if (!response.ok) {
    throw new Error(answer.error || `HTTP ${response.status}`);
  }
  return answer;
}

async function choose(choice) {
  if (busy || current === null) {
    return;
  }
  busy = true;
  try {
    show(await call("/api/label", { id: current.id, choice: choice }));
    document.getElementById("error").hidden = true;
  } catch (error) {
    fail(`Not saved: ${error.message}`);
  } finally {
    busy = false;
  }
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) {
    return;
  }
  const choice = KEYS[event.key.toLowerCase()];
  if (choice !== undefined) {
    event.preventDefault();
    choose(choice);
  }
});

document.querySelectorAll("button[data-choice]").forEach((button) => {
  button.addEventListener("click", () => choose(button.dataset.choice));
});

call("/api/next").then(show).catch((error) => fail(`Could not load the next pair: ${error.message}`));
