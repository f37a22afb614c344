// The demo chat page: one user per tab (the number is in the URL), events from the server as they happen.
"use strict";

const $ = (id) => document.getElementById(id);
const PHONE = /^\+[1-9][0-9]{6,14}$/;
const KNOWN = "wabot.demo.users";
const TYPING_POLL_MS = 300;
const MAX_MEDIA = 10;  // Twilio's limit of media on one message
const HOLD_MS = 400;  // a press longer than this is a hold: releasing sends the voice note

const pending = [];  // files chosen with the attach button, sent with the next message
let recording = null;  // { recorder, stream, chunks, started, timer } while the microphone records

function sizeLabel(bytes) {
  return bytes >= 1048576 ? `${(bytes / 1048576).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1024))} KB`;
}

function renderMedia(media) {
  // An attachment in a bubble: a thumbnail, a player, or the document's name; served by the page's own server.
  const box = document.createElement("div");
  box.className = `media ${media.kind}`;
  if (media.kind === "image" || media.kind === "sticker") {
    const image = document.createElement("img");
    image.src = media.url;
    image.alt = media.name;
    box.append(image);
  } else if (media.kind === "audio") {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.src = media.url;
    audio.title = media.name;
    box.append(audio);
  } else {
    const link = document.createElement("a");
    link.className = "doc";
    link.href = media.url;
    link.target = "_blank";
    link.textContent = `\u{1F4C4} ${media.name} · ${sizeLabel(media.bytes)}`;
    box.append(link);
  }
  return box;
}

function showPending() {
  const box = $("pending");
  box.replaceChildren(...pending.map((file, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "\u2715";
    remove.title = `Remove ${file.name}`;
    remove.addEventListener("click", () => { pending.splice(i, 1); showPending(); });
    chip.append(`${file.name} · ${sizeLabel(file.size)}`, remove);
    return chip;
  }));
  box.hidden = pending.length === 0;
}

async function sendMedia(user, files, text) {
  showError("");
  const body = new FormData();
  body.append("user", user);
  body.append("text", text);
  for (const file of files) body.append("media", file, file.name);
  try {
    const response = await fetch("/demo/send_media", { method: "POST", body });
    if (!response.ok) showError(`could not send: HTTP ${response.status} ${await response.text()}`);
  } catch (error) {
    showError(`could not send: ${error}`);
  }
}

function showRecording(on) {
  $("record").classList.toggle("recording", on);
  $("record").setAttribute("aria-label", on ? "Stop and send the voice note" : "Record a voice note");
  $("record-time").hidden = !on;
  $("record-cancel").hidden = !on;
  $("text").disabled = on;
  if (!on) $("record-time").textContent = "0:00";
}

async function startRecording() {
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("this browser cannot record audio here");
    return;
  }
  // WhatsApp's voice notes are Ogg/Opus; a browser that cannot record Ogg records WebM/Opus.
  const type = ["audio/ogg;codecs=opus", "audio/webm;codecs=opus", "audio/webm"].find(
    (t) => MediaRecorder.isTypeSupported(t)) || "";
  const state = { recorder: null, stream: null, chunks: [], started: Date.now(), timer: 0 };
  recording = state;
  showRecording(true);
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    recording = null;
    showRecording(false);
    showError(`no microphone: ${error.message || error}`);
    return;
  }
  if (recording !== state) {  // stopped while the browser was asking for the microphone
    state.stream.getTracks().forEach((track) => track.stop());
    return;
  }
  state.recorder = new MediaRecorder(state.stream, type ? { mimeType: type } : {});
  state.recorder.ondataavailable = (data) => { if (data.data.size) state.chunks.push(data.data); };
  // The clock starts when the recorder does (its start event), not when it was asked to: on a busy machine that
  // can be a good part of a second later, and the time shown should be the voice note's length.
  state.recorder.onstart = () => {
    if (recording !== state) return;  // already stopped: no clock to run
    state.started = Date.now();
    state.timer = setInterval(() => {
      const seconds = Math.floor((Date.now() - state.started) / 1000);
      $("record-time").textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
    }, 250);
  };
  state.recorder.start();
}

function stopRecording(send) {
  const state = recording;
  recording = null;
  showRecording(false);
  if (!state) return;
  clearInterval(state.timer);
  if (!state.recorder) {  // still waiting for the microphone: startRecording() releases it
    return;
  }
  state.recorder.onstop = () => {
    state.stream.getTracks().forEach((track) => track.stop());
    if (!send || !state.chunks.length) return;
    const type = state.recorder.mimeType || "audio/webm";
    const file = new File(state.chunks, `voice-note.${type.includes("ogg") ? "ogg" : "webm"}`, { type });
    sendMedia(currentUser, [file], "");
  };
  state.recorder.stop();
}

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
const currentUser = user;
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
    bubble.append(...(event.media || []).map(renderMedia), text, meta);
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
    if (pending.length) {
      // Attachments go with the text as their caption, as on WhatsApp.
      $("text").value = "";
      sendMedia(user, pending.splice(0), text);
      showPending();
      return;
    }
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

  // Attach: chosen files wait above the text box (removable) and leave with the next Send.
  $("attach-button").addEventListener("click", () => $("attach").click());
  $("attach").addEventListener("change", () => {
    for (const file of $("attach").files) {
      if (pending.length < MAX_MEDIA) pending.push(file);
      else showError(`at most ${MAX_MEDIA} attachments on one message`);
    }
    $("attach").value = "";
    showPending();
  });

  // Record: click to start and click again to send, or hold and release to send; ✕ discards.
  let pressedAt = 0;
  $("record").addEventListener("pointerdown", (down) => {
    down.preventDefault();
    $("record").setPointerCapture(down.pointerId);  // the release counts wherever the pointer has moved
    if (recording) stopRecording(true);
    else {
      pressedAt = Date.now();
      startRecording();
    }
  });
  $("record").addEventListener("pointerup", () => {
    if (recording && pressedAt && Date.now() - pressedAt > HOLD_MS) stopRecording(true);
    pressedAt = 0;
  });
  $("record").addEventListener("click", (click) => {
    if (click.detail !== 0) return;  // the keyboard's Enter or Space (a pointer was handled above)
    if (recording) stopRecording(true);
    else startRecording();
  });
  $("record-cancel").addEventListener("click", () => stopRecording(false));

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
