// The macmesh dashboard: polls /dashboard/api/state and draws it; the chat box streams from
// /v1/chat/completions. Same-origin requests only (the browser resends the API key it was
// asked for, if any). No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const GiB = 1024 ** 3;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function gib(bytes) { return (bytes / GiB).toFixed(1) + " GiB"; }
function layers(s) { return s.end_layer - s.start_layer === 1 ? `layer ${s.start_layer}` : `layers ${s.start_layer}–${s.end_layer - 1}`; }

function drawNodes(nodes) {
  const box = $("nodes");
  box.replaceChildren(...nodes.map((n) => {
    const used = Math.max(n.memory_total_bytes - n.memory_available_bytes, 0);
    const pct = n.memory_total_bytes ? Math.round((100 * used) / n.memory_total_bytes) : 0;
    return el("div", { class: "card node", "data-node": n.node_id },
      el("h3", {}, n.name, " ", el("span", { class: `state-${n.state}` }, `● ${n.state}`)),
      el("div", { class: "muted" }, `${n.address} · ${n.chip || "unknown chip"}`),
      el("div", { class: "bar", title: `${pct}% used` }, el("div", { class: "mem-used", style: `width:${pct}%` })),
      el("div", { class: "mem-text" }, `${gib(used)} used of ${gib(n.memory_total_bytes)} · ${gib(n.memory_available_bytes)} free`));
  }));
}

function drawInstances(instances) {
  const box = $("instances");
  if (!instances.length) {
    box.replaceChildren(el("p", { class: "muted" }, "Nothing is launched: macmesh launch MODEL"));
    return;
  }
  box.replaceChildren(...instances.map((inst) => {
    const stages = [];
    inst.stages.forEach((s, i) => {
      if (i) stages.push(el("span", { class: "arrow" }, "→"));
      stages.push(el("div", { class: "stage" }, el("b", {}, s.name), el("span", { class: "muted" }, layers(s))));
    });
    const acceptance = inst.acceptance == null ? "–" : `${Math.round(inst.acceptance * 100)}%`;
    return el("div", { class: "card instance", "data-instance": inst.instance_id },
      el("div", { class: "head" },
        el("h3", {}, inst.model),
        el("span", { class: `badge engine-${inst.engine}` }, inst.engine),
        el("span", { class: `state-${inst.state}` }, inst.state),
        el("span", {}, el("span", { class: "num tps" }, inst.recent_generation_tps.toFixed(1)), " tok/s"),
        el("span", {}, "acceptance ", el("span", { class: "num acceptance" }, acceptance))),
      el("div", { class: "reason" }, inst.engine_reason),
      el("div", { class: "pipeline" }, ...stages));
  }));
  // The chat box can address a model (the cluster picks an instance) or one instance.
  const select = $("chat-model");
  const choices = [...new Set(instances.map((i) => i.model))].map((m) => [m, `${m} (any instance)`]);
  for (const i of instances) choices.push([i.instance_id, `${i.instance_id} · ${i.engine}`]);
  const current = select.value;
  if (choices.map((c) => c[0]).join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
    select.replaceChildren(...choices.map(([value, label]) => el("option", { value }, label)));
    if (choices.some((c) => c[0] === current)) select.value = current;
  }
}

async function refresh() {
  try {
    const reply = await fetch("/dashboard/api/state", { cache: "no-store" });
    const state = await reply.json();
    if (!state.ok) throw new Error(state.error || `HTTP ${reply.status}`);
    drawNodes(state.nodes);
    drawInstances(state.instances);
    const up = state.nodes.filter((n) => n.state === "up").length;
    $("summary").textContent = `${up}/${state.nodes.length} nodes up · ${state.instances.length} instance(s)`;
    $("summary").className = "muted";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (err) {
    $("summary").textContent = `cannot reach the cluster: ${err.message}`;
    $("summary").className = "error";
  }
}

async function chat(event) {
  event.preventDefault();
  const prompt = $("chat-input").value.trim();
  const model = $("chat-model").value;
  if (!prompt || !model) return;
  const log = $("chat-log");
  log.append(el("div", { class: "msg user" }, prompt));
  const answer = el("div", { class: "msg assistant" });
  const text = el("span", { class: "text" });
  answer.append(text);
  log.append(answer);
  $("chat-send").disabled = true;
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, stream: true, max_tokens: Number($("chat-max").value) || 64,
                             messages: [{ role: "user", content: prompt }] }),
    });
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const line of events) {
        const data = line.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) text.textContent += choice.delta.content || "";
        if (chunk.macmesh) {
          const s = chunk.macmesh;
          const mtp = s.engine === "native_mtp" ? ` · acceptance ${Math.round(s.acceptance_rate * 100)}%` : "";
          answer.append(el("div", { class: "stats" },
            `${s.engine} · ${s.generation_tokens} tokens · ${s.tps.toFixed(1)} tok/s${mtp}`));
        }
      }
    }
    refresh();
  } catch (err) {
    answer.append(el("div", { class: "error" }, err.message));
  } finally {
    $("chat-send").disabled = false;
  }
}

$("chat").addEventListener("submit", chat);
refresh();
setInterval(refresh, 2000);
