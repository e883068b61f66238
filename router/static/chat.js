// llm-fleet's chat page (router/chat_ui.py). Plain JavaScript, no dependency.
// Every URL is relative: the page calls its own origin only. Model output is rendered
// by building DOM nodes with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const modelSelect = $("model");
  const modeSelect = $("mode");
  const keyInput = $("api-key");
  const conversation = $("conversation");
  const errorBox = $("error");
  const promptInput = $("prompt");
  const sendButton = $("send");
  const stopButton = $("stop");
  const KEY_STORAGE = "llm-fleet-api-key";
  const REFRESH_MS = 5000;

  const chat = { messages: [], controller: null };
  let defaults = {}; // model id -> {temperature, top_p, max_tokens}, from api/llms

  keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    refresh();
  });

  function headers(json) {
    const sent = json ? { "Content-Type": "application/json" } : {};
    const key = keyInput.value.trim();
    if (key) sent.Authorization = `Bearer ${key}`;
    return sent;
  }

  // source "models": the model list's own refusal, cleared once the list loads again
  // (a corrected key); any other error stays until the next question.
  function showError(text, source = "request") {
    errorBox.textContent = text;
    errorBox.dataset.source = source;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    delete errorBox.dataset.source;
    errorBox.hidden = true;
  }

  // The gateway's own message for a refused request, with its Retry-After.
  async function refusal(response) {
    let text = `${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        text = `${response.status}: ${body.error.message}`;
      }
    } catch (_) {
      text = `${response.status} ${response.statusText}`;
    }
    const retry = response.headers.get("Retry-After");
    return retry ? `${text} (retry after ${retry} s)` : text;
  }

  // --- models and the fleet ---------------------------------------------------------

  // Both lists are fetched before the page changes, so the picker and the controls'
  // defaults appear in one step: a control set by hand once the model is listed is
  // never overwritten by defaults arriving later.
  async function loadModels() {
    const [response, llms] = await Promise.all([
      fetch("v1/models", { headers: headers(false) }),
      fetch("api/llms", { headers: headers(false) }),
    ]);
    if (!response.ok) {
      showError(await refusal(response), "models");
      return;
    }
    const models = (await response.json()).data || [];
    const listed = llms.ok ? (await llms.json()).models || [] : [];
    if (errorBox.dataset.source === "models") clearError();
    const chosen = modelSelect.value;
    modelSelect.replaceChildren(
      ...models.map((model) => {
        const option = document.createElement("option");
        option.value = model.id;
        option.textContent = `${model.id} (${model.status || "?"})`;
        option.dataset.state = model.status || "unknown";
        return option;
      }),
    );
    if (models.some((model) => model.id === chosen)) modelSelect.value = chosen;
    showModelState();
    if (llms.ok) {
      const known = {};
      for (const model of listed) known[model.id] = model;
      const first = Object.keys(defaults).length === 0;
      defaults = known;
      if (first) applyDefaults();
    }
  }

  function showModelState() {
    const option = modelSelect.selectedOptions[0];
    const state = option ? option.dataset.state : "";
    const shown = $("model-state");
    shown.textContent = state;
    shown.className = `state state-${state}`;
  }

  // The controls show the chosen model's configured defaults; empty: the engine's.
  function applyDefaults() {
    const model = defaults[modelSelect.value];
    const given = (model && model.defaults) || {};
    $("temperature").value = given.temperature ?? "";
    $("top-p").value = given.top_p ?? "";
    $("max-tokens").value = given.max_tokens ?? "";
    if (model) modeSelect.value = model.generate_route === "completions" ? "completion" : "chat";
  }

  // /health/live has /health/ready's per-model body, always with a 200: the 503 of a
  // fleet still loading would be a browser console error on every refresh.
  async function loadFleet() {
    const response = await fetch("health/live");
    const body = await response.json();
    const rows = Object.entries(body.models || {}).map(([id, model]) => {
      const row = document.createElement("tr");
      const replicas = model.replicas || {};
      const cells = [id, model.state, replicas.running, replicas.starting, replicas.min, replicas.max];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value === null || value === undefined ? "–" : String(value);
        row.append(cell);
      }
      row.children[1].className = `state-${model.state}`;
      if (model.reason) row.title = model.reason;
      return row;
    });
    $("fleet-rows").replaceChildren(...rows);
    const waiting = Object.values(body.models || {}).filter(
      (model) => model.required_for_readiness && model.state !== "ready",
    );
    $("fleet-status").textContent = waiting.length ? `not ready: ${waiting.length} model(s) starting or failed` : "ready";
  }

  async function refresh() {
    try {
      await loadModels();
      await loadFleet();
    } catch (error) {
      showError(`the gateway did not answer: ${error}`);
    }
  }

  modelSelect.addEventListener("change", () => {
    showModelState();
    applyDefaults();
  });

  // --- markdown, safely: DOM nodes and textContent only --------------------------------

  function inline(parent, text) {
    const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
    let last = 0;
    for (const match of text.matchAll(pattern)) {
      parent.append(document.createTextNode(text.slice(last, match.index)));
      const token = match[0];
      let node;
      if (token.startsWith("`")) {
        node = document.createElement("code");
        node.textContent = token.slice(1, -1);
      } else if (token.startsWith("**")) {
        node = document.createElement("strong");
        node.textContent = token.slice(2, -2);
      } else {
        node = document.createElement("em");
        node.textContent = token.slice(1, -1);
      }
      parent.append(node);
      last = match.index + token.length;
    }
    parent.append(document.createTextNode(text.slice(last)));
  }

  function list(tag, lines, marker) {
    const node = document.createElement(tag);
    for (const line of lines) {
      const item = document.createElement("li");
      inline(item, line.replace(marker, ""));
      node.append(item);
    }
    return node;
  }

  function renderMarkdown(target, text) {
    const nodes = [];
    text.split("```").forEach((part, index) => {
      if (index % 2 === 1) {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        code.textContent = part.replace(/^[^\n]*\n/, ""); // the fence's language tag
        pre.append(code);
        nodes.push(pre);
        return;
      }
      for (const block of part.split(/\n{2,}/)) {
        if (!block.trim()) continue;
        const lines = block.split("\n").filter((line) => line.trim());
        if (lines.every((line) => /^\s*[-*] /.test(line))) {
          nodes.push(list("ul", lines, /^\s*[-*] /));
        } else if (lines.every((line) => /^\s*\d+[.)] /.test(line))) {
          nodes.push(list("ol", lines, /^\s*\d+[.)] /));
        } else if (/^#{1,6} /.test(block)) {
          const heading = document.createElement("h4");
          inline(heading, block.replace(/^#{1,6} /, ""));
          nodes.push(heading);
        } else {
          const paragraph = document.createElement("p");
          block.split("\n").forEach((line, at) => {
            if (at > 0) paragraph.append(document.createElement("br"));
            inline(paragraph, line);
          });
          nodes.push(paragraph);
        }
      }
    });
    target.replaceChildren(...nodes);
  }

  // --- the conversation ---------------------------------------------------------------

  function addTurn(who, text) {
    const turn = document.createElement("div");
    turn.className = `turn ${who}`;
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who;
    const body = document.createElement("div");
    body.className = "body";
    renderMarkdown(body, text);
    turn.append(label, body);
    conversation.append(turn);
    conversation.scrollTop = conversation.scrollHeight;
    return turn;
  }

  function numberOf(id, parse) {
    const raw = $(id).value.trim();
    return raw === "" ? undefined : parse(raw);
  }

  function requestFor(text) {
    const model = modelSelect.value;
    const options = {
      temperature: numberOf("temperature", Number),
      top_p: numberOf("top-p", Number),
      max_tokens: numberOf("max-tokens", (raw) => Number.parseInt(raw, 10)),
    };
    const common = { model, stream: true, stream_options: { include_usage: true }, ...options };
    if (modeSelect.value === "completion") {
      return { url: "v1/completions", body: { ...common, prompt: text } };
    }
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }] : [];
    return { url: "v1/chat/completions", body: { ...common, messages: messages.concat(chat.messages) } };
  }

  // The SSE frames of a streamed answer, as parsed JSON, until [DONE].
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function showStats(started, first, ended, tokens) {
    if (first === null) {
      $("stats").textContent = "";
      return;
    }
    const ttft = Math.round(first - started);
    const seconds = (ended - first) / 1000;
    const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
    $("stats").textContent = `time to first token ${ttft} ms · ${tokens} tokens · ${rate} tokens/s`;
  }

  async function send(event) {
    event.preventDefault();
    const text = promptInput.value;
    if (!text.trim() || chat.controller !== null || !modelSelect.value) return;
    clearError();
    const chatMode = modeSelect.value === "chat";
    if (chatMode) chat.messages.push({ role: "user", content: text });
    const { url, body } = requestFor(text);
    promptInput.value = "";
    addTurn("user", text);
    const reply = addTurn("assistant", "");
    reply.dataset.state = "streaming";
    const answer = reply.querySelector(".body");
    const controller = new AbortController();
    chat.controller = controller;
    sendButton.disabled = true;
    stopButton.disabled = false;
    const started = performance.now();
    let first = null;
    let generated = "";
    let pieces = 0;
    let usage = null;
    try {
      const response = await fetch(url, {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        showError(await refusal(response));
        reply.remove();
        if (chatMode) chat.messages.pop();
        return;
      }
      for await (const chunk of events(response)) {
        if (chunk.error) {
          showError(chunk.error.message);
          continue;
        }
        if (chunk.usage) usage = chunk.usage;
        const choice = (chunk.choices || [])[0];
        const piece = choice ? (choice.delta ? choice.delta.content : choice.text) : null;
        if (piece) {
          if (first === null) first = performance.now();
          pieces += 1;
          generated += piece;
          renderMarkdown(answer, generated);
          conversation.scrollTop = conversation.scrollHeight;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") {
        reply.dataset.stopped = "true";
      } else {
        showError(`the request failed: ${error}`);
      }
    } finally {
      if (chatMode && generated) chat.messages.push({ role: "assistant", content: generated });
      reply.dataset.state = "done";
      chat.controller = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
      const tokens = usage ? usage.completion_tokens : pieces;
      showStats(started, first, performance.now(), tokens);
    }
  }

  $("ask").addEventListener("submit", send);
  promptInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (chat.controller !== null) chat.controller.abort();
  });
  $("clear").addEventListener("click", () => {
    chat.messages = [];
    conversation.replaceChildren();
    $("stats").textContent = "";
    clearError();
  });

  refresh();
  setInterval(refresh, REFRESH_MS);
})();
