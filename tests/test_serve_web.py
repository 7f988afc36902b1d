"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)."""

import asyncio
import json
import shutil

import pytest

pytest.importorskip("fastapi")

from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.events import Event  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/fetch_serve_assets.sh)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,700"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver_bin), options=opts)
    b.set_page_load_timeout(30)
    try:
        yield b
    finally:
        b.quit()


def by(kind: str):
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def wait(browser, cond, timeout=20, poll=0.02):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=poll).until(cond)


def ask(browser, text: str, max_tokens: int, system: str = ""):
    if system:
        browser.find_element(by("ID"), "system").send_keys(system)
    field = browser.find_element(by("ID"), "max_tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    browser.find_element(by("ID"), "prompt").send_keys(text)
    browser.find_element(by("ID"), "send").click()


@pytest.mark.slow
def test_chat_page_streams_an_answer_with_a_system_prompt_in_chromium(browser, tmp_path):
    log = tmp_path / "requests.jsonl"
    cfg = ServeConfig(model="fake:20", max_seq_len=4096, request_log=str(log), log_prompts=True)
    with ServerThread(build_backend(cfg), cfg) as s:
        browser.get(s.url + "/")
        assert "lmstack chat" in browser.title
        ask(browser, "What is the capital of France?", 30, system="Answer in one word.")
        answer = browser.find_element(by("ID"), "answer-1")
        # Streaming: the answer is visible while it is still growing (30 tokens at 20 ms a step).
        wait(browser, lambda d: 0 < len(answer.text) < 30)
        stats = browser.find_element(by("ID"), "stats")
        wait(browser, lambda d: stats.get_attribute("data-done") == "1")
        assert len(answer.text) == 30 and answer.text.isalpha()
        assert "30 tokens" in stats.text and "tokens/s" in stats.text
        wait(browser, lambda d: log.exists() and log.read_text().strip())
        sent = json.loads(log.read_text().splitlines()[-1])["request"]["messages"]
        assert sent == [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "What is the capital of France?"}]
        shot = tmp_path / "chat.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000


@pytest.mark.slow
def test_stop_button_aborts_the_stream_and_the_server_cancels(browser):
    cfg = ServeConfig(model="fake:20", max_seq_len=4096)
    with ServerThread(build_backend(cfg), cfg) as s:
        engine = s.backend.engine
        browser.get(s.url + "/")
        stop = browser.find_element(by("ID"), "stop")
        assert not stop.is_enabled()
        ask(browser, "Tell me everything.", 2000)
        answer = browser.find_element(by("ID"), "answer-1")
        wait(browser, lambda d: len(answer.text) >= 5)
        stop.click()
        stats = browser.find_element(by("ID"), "stats")
        wait(browser, lambda d: stats.get_attribute("data-done") == "1")
        stopped = answer.text
        assert "(stopped)" in stopped and "stopped after" in stats.text
        wait(browser, lambda d: engine.stats()["running"] == 0)  # the disconnect cancelled the generation
        assert engine.tokens_generated < 2000
        assert answer.text == stopped  # nothing was shown after the stop
        assert browser.find_element(by("ID"), "send").is_enabled() and not stop.is_enabled()


class _Canned:
    """A ``Generation`` that streams fixed text, a few characters an event."""

    prompt_tokens, tokens_after_cancel = 1, None

    def __init__(self, text: str):
        self.text, self.completion_tokens = text, 0

    async def events(self):
        for i in range(0, len(self.text), 7):
            await asyncio.sleep(0.005)
            self.completion_tokens += 1
            yield Event(0, self.text[i:i + 7], 1)
        yield Event(0, finish_reason="stop")

    def cancel(self):
        pass

    def settle(self, timeout):
        pass


class MarkdownBackend:
    """Answers every chat with ``TEXT``."""

    model_name, can_embed = "markdown", False
    TEXT = ("Here is **bold**, *italic* and `x < y`:\n\n```python\nprint(1 < 2)\n```\n\n- one\n- two\n\n"
            "<script>window.injected = 1</script> [safe](https://example.com) [unsafe](javascript:alert(1))")

    async def open(self, kind, req, request):
        return _Canned(self.TEXT)

    def stats(self):
        return {}

    def health(self, watchdog_s):
        return True, {}

    def close(self, timeout=0.0):
        pass


@pytest.mark.slow
def test_answers_are_rendered_from_markdown_safely(browser):
    with ServerThread(MarkdownBackend(), ServeConfig()) as s:
        browser.get(s.url + "/")
        ask(browser, "Show me markdown.", 100)
        stats = browser.find_element(by("ID"), "stats")
        wait(browser, lambda d: stats.get_attribute("data-done") == "1")
        answer = browser.find_element(by("ID"), "answer-1")
        code = answer.find_element(by("CSS_SELECTOR"), "pre > code.language-python")
        assert code.text == "print(1 < 2)"
        assert answer.find_element(by("TAG_NAME"), "strong").text == "bold"
        assert answer.find_element(by("TAG_NAME"), "em").text == "italic"
        assert answer.find_element(by("CSS_SELECTOR"), "p code").text == "x < y"
        assert [li.text for li in answer.find_elements(by("CSS_SELECTOR"), "ul > li")] == ["one", "two"]
        links = answer.find_elements(by("TAG_NAME"), "a")
        assert [a.get_attribute("href") for a in links] == ["https://example.com/"]
        assert "<script>window.injected = 1</script>" in answer.text  # shown as text, never run
        assert answer.find_elements(by("TAG_NAME"), "script") == []
        assert browser.execute_script("return window.injected === undefined")
        assert "[unsafe](javascript:alert(1))" in answer.text
