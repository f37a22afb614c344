// The demo chat page: one user per tab (the number is in the URL), events from the server as they happen.
"use strict";

const $ = (id) => document.getElementById(id);
const PHONE = /^\+[1-9][0-9]{6,14}$/;
const KNOWN = "wabot.demo.users";
const TYPING_POLL_MS = 300;

function normalize(number) {
  // "+1 (555) 123-4567" -> "+15551234567"; a URL's "+" may have been read as a space.
  const digits = (number || "").replace(/[\s().-]/g, "");
  return /^[0-9]/.test(digits) ? "+" + digits : digits;
}

function randomUser() {
  return "+1555" + String(Math.floor(Math.random() * 1e7)).padStart(7, "0");
}

function openUser(user) {
  location.search = "?" + new URLSearchParams({ user });
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

const user = normalize(new URLSearchParams(location.search).get("user"));
if (PHONE.test(user)) start(user);
else openUser(randomUser());  // a tab without a user gets a new one

function start(user) {
  // Numbers this browser used before, offered in the user box.
  const known = new Set(JSON.parse(localStorage.getItem(KNOWN) || "[]"));
  known.add(user);
  localStorage.setItem(KNOWN, JSON.stringify([...known].slice(-20)));
  fetch("/demo/users").then((r) => r.json()).then((users) => {
    for (const number of new Set([...known, ...users])) {
      const option = document.createElement("option");
      option.value = number;
      $("known-users").append(option);
    }
  }).catch(() => {});
  $("user").value = user;
  document.title = `wabot demo · ${user}`;

  const rendered = new Set();
  function render(event) {
    if (rendered.has(event.id)) return;  // a reconnect may replay what was shown
    rendered.add(event.id);
    const bubble = document.createElement("div");
    bubble.className = `msg ${event.role} ${event.kind || ""}`;
    bubble.dataset.id = event.id;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = event.text;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = event.meta;
    if (event.tools && event.tools.length) {
      // Which tools the answer used, as the demo's simulator reports them.
      const tools = document.createElement("span");
      tools.className = "tools";
      tools.textContent = `${event.tools.length > 1 ? "tools" : "tool"}: ${event.tools.join(", ")}`;
      meta.append(" · ", tools);
    }
    bubble.append(text, meta);
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(bubble);
    if (atBottom || event.role === "user") log.scrollTop = log.scrollHeight;
  }

  // The conversation so far, then every reply and follow-up as it arrives; EventSource reconnects by itself.
  const events = new EventSource("/demo/events?" + new URLSearchParams({ user }));
  events.onmessage = (message) => render(JSON.parse(message.data));

  // WhatsApp's "typing…" and read ticks: the typing indicators the bot sent, as the demo's Twilio sink holds them.
  async function showTyping() {
    try {
      const state = await (await fetch("/demo/typing?" + new URLSearchParams({ user }))).json();
      $("typing").hidden = !state.typing;
      for (const id of state.read) {
        const meta = document.querySelector(`.msg.user[data-id="${id}"] .meta`);
        if (meta && !meta.querySelector(".read")) {
          const ticks = document.createElement("span");
          ticks.className = "read";
          ticks.title = "read";
          ticks.textContent = "✓✓";
          meta.append(" ", ticks);
        }
      }
    } catch (error) {
      // The next poll tries again (the server may be restarting).
    }
    setTimeout(showTyping, TYPING_POLL_MS);
  }
  showTyping();

  $("compose").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    $("text").value = "";
    showError("");
    try {
      const response = await fetch("/demo/send", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user, text }),
      });
      if (!response.ok) showError(`could not send: HTTP ${response.status} ${await response.text()}`);
    } catch (error) {
      showError(`could not send: ${error}`);
    }
  });

  $("user-form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    const number = normalize($("user").value);
    if (PHONE.test(number)) openUser(number);
    else showError(`${$("user").value} is not a phone number in international form, e.g. +15551234567`);
  });
  $("new-user").addEventListener("click", () => openUser(randomUser()));

  $("mode").addEventListener("change", async () => {
    const response = await fetch("/demo/mode", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ mode: $("mode").value }),
    });
    const body = await response.json();
    $("mode").value = body.mode || $("mode").value;
    $("mode-status").textContent = response.ok ? `model is ${body.mode} (for every user)` : body.detail;
  });
}
