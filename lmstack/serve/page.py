"""The chat page served at ``/``: one self-contained HTML document (no external assets).

It streams ``/v1/chat/completions`` over SSE with ``fetch`` and shows tokens/s; the user
picks temperature and max tokens. Kept as a Python string so it ships inside the package
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
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .75rem; min-height: 12rem; white-space: pre-wrap; }
  .user { color: #0b5394; margin: .4rem 0; } .assistant { margin: .4rem 0 1rem; }
  form { display: flex; gap: .5rem; margin-top: .75rem; } #prompt { flex: 1; padding: .4rem; }
  .opts { display: flex; gap: 1rem; margin-top: .5rem; font-size: .9rem; align-items: center; }
  .opts input { width: 5rem; } #stats { color: #666; font-size: .85rem; margin-top: .4rem; }
</style>
</head>
<body>
<h1>lmstack chat <small id="model"></small></h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="prompt" autocomplete="off" placeholder="Ask something..." required>
  <button id="send" type="submit">Send</button>
</form>
<div class="opts">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" max="4096" step="1" value="256"></label>
  <button id="reset" type="button">New chat</button>
</div>
<div id="stats"></div>
<script>
const log = document.getElementById("log"), stats = document.getElementById("stats");
let messages = [];
fetch("/v1/models").then(r => r.json()).then(j => {
  document.getElementById("model").textContent = j.data ? "(" + j.data[0].id + ")" : "";
}).catch(() => {});
document.getElementById("reset").onclick = () => { messages = []; log.textContent = ""; stats.textContent = ""; };
document.getElementById("form").onsubmit = async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("prompt"), send = document.getElementById("send");
  const text = input.value.trim();
  if (!text) return;
  input.value = ""; send.disabled = true;
  messages.push({role: "user", content: text});
  const u = document.createElement("div"); u.className = "user"; u.textContent = "> " + text; log.appendChild(u);
  const a = document.createElement("div"); a.className = "assistant"; a.id = "answer-" + messages.length;
  log.appendChild(a);
  const body = {messages, stream: true, stream_options: {include_usage: true},
                temperature: parseFloat(document.getElementById("temperature").value),
                max_tokens: parseInt(document.getElementById("max_tokens").value, 10)};
  const t0 = performance.now(); let first = null, nTok = 0, answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST",
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
          if (d) { if (first === null) first = performance.now(); answer += d; a.textContent = answer; }
        }
        const secs = (performance.now() - (first || t0)) / 1000;
        if (first !== null) stats.textContent = (answer.length ? "" : "") + "streaming...";
      }
    }
    const gen = (performance.now() - (first || t0)) / 1000;
    stats.textContent = nTok + " tokens, " + (nTok / Math.max(gen, 1e-3)).toFixed(1) + " tokens/s, first token after " +
      (((first || performance.now()) - t0) / 1000).toFixed(2) + " s";
    stats.dataset.done = "1";
    messages.push({role: "assistant", content: answer});
  } catch (e) {
    a.textContent = "error: " + e.message; stats.dataset.done = "1";
  } finally { send.disabled = false; }
};
</script>
</body>
</html>
"""
