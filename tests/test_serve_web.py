"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)."""

import shutil

import pytest

pytest.importorskip("fastapi")

from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402


@pytest.mark.slow
def test_chat_page_streams_an_answer_in_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/fetch_serve_assets.sh)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg = ServeConfig(model="fake:20", max_seq_len=4096)
    backend = build_backend(cfg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,700"):
        opts.add_argument(arg)
    with ServerThread(backend, cfg) as s:
        browser = webdriver.Chrome(service=Service(driver_bin), options=opts)
        try:
            browser.set_page_load_timeout(30)
            browser.get(s.url + "/")
            assert "lmstack chat" in browser.title
            max_tokens = browser.find_element(By.ID, "max_tokens")
            max_tokens.clear()
            max_tokens.send_keys("30")
            browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
            browser.find_element(By.ID, "send").click()
            answer = browser.find_element(By.ID, "answer-1")
            # Streaming: the answer is visible while it is still growing (30 tokens at 20 ms a step).
            WebDriverWait(browser, 20, poll_frequency=0.02).until(lambda d: 0 < len(answer.text) < 30)
            stats = browser.find_element(By.ID, "stats")
            WebDriverWait(browser, 20).until(lambda d: stats.get_attribute("data-done") == "1")
            assert len(answer.text) == 30 and answer.text.isalpha()
            assert "30 tokens" in stats.text and "tokens/s" in stats.text
            shot = tmp_path / "chat.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        finally:
            browser.quit()
