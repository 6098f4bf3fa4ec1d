// Circus dashboard: confirmations and the live log tail (pages work without this file).
"use strict";

document.addEventListener("submit", (event) => {
  const button = event.submitter;
  const question = button && button.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

// Live log: server-sent events from /build/<id>/log/stream. Each batch of lines carries
// "id: <step>:<offset>", so the browser resumes where it stopped after a dropped
// connection; "end" says the step finished (reload once the whole build did); "idle"
// says nothing runs yet (the server asks the browser to retry shortly).
function followLog(pre) {
  const base = pre.dataset.stream;
  const state = document.getElementById("log-state");
  let first = true;

  function atBottom() {
    return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  }

  function connect() {
    let url = base;
    if (first && pre.dataset.step) {
      url += "?step=" + encodeURIComponent(pre.dataset.step) +
             "&offset=" + encodeURIComponent(pre.dataset.offset || "0");
    }
    first = false;
    const source = new EventSource(url);
    source.addEventListener("step", (event) => {
      const info = JSON.parse(event.data);
      if (info.offset === 0 && pre.textContent) pre.textContent += "\n";
      if (state) state.textContent = "Following the log live.";
    });
    source.onmessage = (event) => {
      const follow = atBottom();
      pre.appendChild(document.createTextNode(event.data + "\n"));
      if (follow) pre.scrollTop = pre.scrollHeight;
    };
    source.addEventListener("idle", () => {
      if (state) state.textContent = "Waiting for the build to start…";
    });
    source.addEventListener("end", (event) => {
      source.close();
      const info = JSON.parse(event.data);
      if (info.build_finished) {
        if (state) state.textContent = "The build finished; reloading…";
        window.location.reload();
      } else {
        window.setTimeout(connect, 1000);
      }
    });
  }

  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  const pre = document.getElementById("log-text");
  if (pre && pre.dataset.stream && window.EventSource) {
    pre.scrollTop = pre.scrollHeight;
    followLog(pre);
  }
});

// Relative times ("5 min ago") stay true on a page left open; the exact time is the tooltip.
function relative(seconds) {
  const future = seconds < 0;
  seconds = Math.abs(seconds);
  if (seconds < 10) return "just now";
  for (const [unit, size] of [["day", 86400], ["h", 3600], ["min", 60], ["s", 1]]) {
    if (seconds >= size) {
      const count = Math.floor(seconds / size);
      const label = count + " " + unit + (unit === "day" && count !== 1 ? "s" : "");
      return future ? "in " + label : label + " ago";
    }
  }
  return "just now";
}

window.setInterval(() => {
  for (const element of document.querySelectorAll("time[datetime]")) {
    const moment = Date.parse(element.getAttribute("datetime"));
    if (!Number.isNaN(moment)) element.textContent = relative((Date.now() - moment) / 1000);
  }
}, 30000);
