"""The chat page served at ``/``: one self-contained HTML document (no external assets).

It streams ``/v1/chat/completions`` over SSE with ``fetch`` and shows tokens/s; the user
picks temperature, max tokens and an optional system prompt, and can stop an answer (the
fetch is aborted, so the server cancels the generation). Answers are rendered from
markdown by ``renderMarkdown``, a small renderer written to be safe rather than complete:
the text is HTML-escaped first, then fenced code blocks, inline code, bold, italic,
headings, lists and links (``http``/``https`` only) are marked up; tables, images, nested
lists and raw HTML are left out. Kept as a Python string so it ships inside the package
without package-data rules.
"""

CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmstack chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .75rem; min-height: 12rem; }
  .user { color: #0b5394; margin: .4rem 0; white-space: pre-wrap; } .assistant { margin: .4rem 0 1rem; }
  .assistant p { margin: .3rem 0; } .assistant ul, .assistant ol { margin: .3rem 0; padding-left: 1.4rem; }
  .assistant pre { background: #f4f4f4; padding: .5rem; border-radius: 4px; overflow-x: auto; }
  .assistant code { font-family: ui-monospace, monospace; font-size: .9em; }
  .stopped { color: #999; font-size: .85rem; }
  form { display: flex; gap: .5rem; margin-top: .75rem; } #prompt { flex: 1; padding: .4rem; }
  #system { width: 100%; box-sizing: border-box; padding: .4rem; margin-bottom: .5rem; }
  .opts { display: flex; gap: 1rem; margin-top: .5rem; font-size: .9rem; align-items: center; }
  .opts input { width: 5rem; } #stats { color: #666; font-size: .85rem; margin-top: .4rem; }
</style>
</head>
<body>
<h1>lmstack chat <small id="model"></small></h1>
<input id="system" autocomplete="off" placeholder="System prompt (optional)">
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="prompt" autocomplete="off" placeholder="Ask something..." required>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<div class="opts">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" max="4096" step="1" value="256"></label>
  <button id="reset" type="button">New chat</button>
</div>
<div id="stats"></div>
<script>
// -- markdown: escape first, so nothing the model writes becomes markup of its own ------------
function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}
function inline(s) {  // s is escaped; code spans are set aside so that nothing inside them is marked up
  const codes = [];
  s = s.replace(/`([^`]+)`/g, (m, c) => { codes.push(c); return "\\u0000" + (codes.length - 1) + "\\u0000"; });
  s = s.replace(/\\[([^\\]]+)\\]\\((https?:\\/\\/[^\\s)]+)\\)/g,
                (m, text, url) => '<a href="' + url + '" rel="noopener noreferrer" target="_blank">' + text + "</a>");
  s = s.replace(/\\*\\*([^*]+)\\*\\*/g, "<strong>$1</strong>").replace(/__([^_]+)__/g, "<strong>$1</strong>");
  s = s.replace(/\\*([^*\\s][^*]*)\\*/g, "<em>$1</em>").replace(/(^|\\W)_([^_\\s][^_]*)_(?=\\W|$)/g, "$1<em>$2</em>");
  return s.replace(/\\u0000(\\d+)\\u0000/g, (m, i) => "<code>" + codes[+i] + "</code>");
}
function renderMarkdown(src) {
  const lines = escapeHtml(src.replace(/\\u0000/g, "")).split("\\n");
  let html = "", list = null, para = [];
  const flush = () => { if (para.length) { html += "<p>" + inline(para.join("<br>")) + "</p>"; para = []; } };
  const closeList = () => { if (list) { html += "</" + list + ">"; list = null; } };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\\s*```\\s*([\\w+-]*)\\s*$/);
    if (fence) {  // a code block runs to the closing fence (or, while streaming, to the end)
      flush(); closeList();
      const code = [];
      for (i++; i < lines.length && !/^\\s*```\\s*$/.test(lines[i]); i++) code.push(lines[i]);
      html += "<pre><code" + (fence[1] ? ' class="language-' + fence[1] + '"' : "") + ">" + code.join("\\n") +
              "</code></pre>";
      continue;
    }
    const item = line.match(/^\\s*([-*+]|\\d+[.)])\\s+(.*)$/);
    if (item) {
      flush();
      const kind = /\\d/.test(item[1]) ? "ol" : "ul";
      if (list !== kind) { closeList(); html += "<" + kind + ">"; list = kind; }
      html += "<li>" + inline(item[2]) + "</li>";
      continue;
    }
    closeList();
    const heading = line.match(/^(#{1,6})\\s+(.*)$/);
    if (heading) { flush(); html += "<p><strong>" + inline(heading[2]) + "</strong></p>"; continue; }
    if (!line.trim()) { flush(); continue; }
    para.push(line);
  }
  flush(); closeList();
  return html;
}

// -- the chat ---------------------------------------------------------------------------------
const log = document.getElementById("log"), stats = document.getElementById("stats");
const send = document.getElementById("send"), stop = document.getElementById("stop");
let messages = [], controller = null;
fetch("/v1/models").then(r => r.json()).then(j => {
  document.getElementById("model").textContent = j.data ? "(" + j.data[0].id + ")" : "";
}).catch(() => {});
document.getElementById("reset").onclick = () => { messages = []; log.textContent = ""; stats.textContent = ""; };
stop.onclick = () => { if (controller) controller.abort(); };
document.getElementById("form").onsubmit = async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("prompt");
  const text = input.value.trim();
  if (!text) return;
  input.value = ""; send.disabled = true; stop.disabled = false; delete stats.dataset.done;
  messages.push({role: "user", content: text});
  const u = document.createElement("div"); u.className = "user"; u.textContent = "> " + text; log.appendChild(u);
  const a = document.createElement("div"); a.className = "assistant"; a.id = "answer-" + messages.length;
  log.appendChild(a);
  const system = document.getElementById("system").value.trim();
  const body = {messages: (system ? [{role: "system", content: system}] : []).concat(messages), stream: true,
                stream_options: {include_usage: true},
                temperature: parseFloat(document.getElementById("temperature").value),
                max_tokens: parseInt(document.getElementById("max_tokens").value, 10)};
  const t0 = performance.now(); let first = null, nTok = 0, pieces = 0, answer = "";
  controller = new AbortController();
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", signal: controller.signal,
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!resp.ok) { const j = await resp.json(); throw new Error(j.error ? j.error.message : resp.status); }
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.usage) nTok = j.usage.completion_tokens;
        for (const c of j.choices || []) {
          const d = c.delta && c.delta.content;
          if (d) {
            if (first === null) first = performance.now();
            answer += d; pieces += 1; a.innerHTML = renderMarkdown(answer);
          }
        }
        if (first !== null) stats.textContent = "streaming...";
      }
    }
    const gen = (performance.now() - (first || t0)) / 1000;
    stats.textContent = nTok + " tokens, " + (nTok / Math.max(gen, 1e-3)).toFixed(1) + " tokens/s, first token after " +
      (((first || performance.now()) - t0) / 1000).toFixed(2) + " s";
    messages.push({role: "assistant", content: answer});
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: keep what came, and the turn, so the chat goes on from it
      const note = document.createElement("div"); note.className = "stopped"; note.textContent = "(stopped)";
      a.appendChild(note);
      stats.textContent = "stopped after " + pieces + " pieces";
      messages.push({role: "assistant", content: answer});
    } else {
      a.textContent = "error: " + e.message;
    }
  } finally {
    controller = null; send.disabled = false; stop.disabled = true; stats.dataset.done = "1";
  }
};
</script>
</body>
</html>
"""
