"""The web chat page in a real browser: Streamlit against the real API server, driven by headless Chromium
through Selenium. `pytest tests/test_webui.py` (needs Debian's chromium and chromedriver)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from test_serve import API_KEY, HELLO_ANSWER, ROOT, build_chat_model, start_server

from minimind.commands.serve import WEBUI, free_port

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]


@pytest.fixture
def api(tmp_path_factory):
    proc, url = start_server(build_chat_model(tmp_path_factory.getbasetemp() / "serve_chat_model"),
                             "--api-key", API_KEY)
    yield url + "/v1"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def page(api):
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(WEBUI), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--api", api, "--temperature", "0", "--max-tokens", "60"]
    env = {**os.environ, "MINIMIND_API_KEY": API_KEY}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/_stcore/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.skipif(bool(missing), reason=f"needs Debian's chromium and chromedriver (missing: {missing}); "
                    "install with `apt-get install chromium chromium-driver`")
def test_chat_page_streams_a_reply_in_chromium(page, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, nothing is downloaded.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(page)
        wait = WebDriverWait(driver, 90)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")))
        sidebar = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stSidebar']")))
        wait.until(lambda d: "parameters" in sidebar.text)
        assert "model" in sidebar.text and "Thinking" in sidebar.text and "Clear history" in sidebar.text
        box.send_keys("Hello")
        box.send_keys(Keys.ENTER)

        seen = []

        def reply(d):
            msgs = d.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")
            text = msgs[-1].text if len(msgs) >= 2 else ""
            seen.append(text)
            # "▌" is the cursor drawn while the stream runs: gone once the reply is complete
            return HELLO_ANSWER in text and "▌" not in text and text

        wait.until(reply)
        assert "Hello" in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")[0].text
        clear(driver, wait)  # the lessons were learnt as first turns: start each one afresh
        # thinking on: the reasoning lands in a collapsible "Thinking" section, the answer below it
        driver.find_element(By.XPATH, "//*[@data-testid='stSidebar']//*[text()='Thinking']").click()
        send(driver, "Why?")
        wait.until(lambda d: "That is the question." in last_reply(d) and "▌" not in last_reply(d))
        assert "Thinking" in last_reply(driver)
        expander = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")[-1].find_element(
            By.CSS_SELECTOR, "[data-testid='stExpander']")
        if "To be, or not to be." not in expander.text:
            expander.find_element(By.TAG_NAME, "summary").click()
        wait.until(lambda d: "To be, or not to be." in expander.text)
        driver.find_element(By.XPATH, "//*[@data-testid='stSidebar']//*[text()='Thinking']").click()  # off again
        clear(driver, wait)
        # a tool: the model calls the calculator, the page runs it, shows the call and feeds the result back
        tools = driver.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stMultiSelect'] input")
        tools.send_keys("calculator")
        tools.send_keys(Keys.ENTER)
        send(driver, "What is 2 + 3?")
        wait.until(lambda d: "The answer is 5." in last_reply(d) and "▌" not in last_reply(d))
        assert "Tool call: calculator" in last_reply(driver)
        shot = tmp_path / "webui.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    except Exception:
        driver.save_screenshot(str(tmp_path / "failed.png"))  # what the page showed, for the report
        print(f"page at failure: {tmp_path / 'failed.png'}\n{driver.find_element(By.TAG_NAME, 'body').text}")
        raise
    finally:
        driver.quit()


def clear(driver, wait) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, "//button[.//*[text()='Clear history']]").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']"))


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_reply(driver) -> str:
    from selenium.webdriver.common.by import By

    msgs = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")
    return msgs[-1].text if msgs else ""


def test_initial_settings_come_from_the_model_card_unless_the_page_flags_say_otherwise():
    """No browser needed: the sliders start at the model's sampling defaults (its generation_config.json, which
    the API puts on its card); a flag given to the page wins; with neither, SamplingParams' own values."""
    from minimind.generation import SamplingParams
    from minimind.serve.webui import initial_settings, page_args

    card = {"id": "m", "sampling_defaults": {"temperature": 0.3, "top_p": 0.6, "top_k": 50, "max_new_tokens": 99}}
    assert initial_settings(page_args([]), card) == {"temperature": 0.3, "top_p": 0.6, "max_tokens": 99,
                                                     "thinking": False}
    assert initial_settings(page_args([]), {**card, "thinks_by_default": True})["thinking"] is True
    flags = page_args(["--temperature", "0", "--max-tokens", "60"])
    assert initial_settings(flags, card) == {"temperature": 0.0, "top_p": 0.6, "max_tokens": 60, "thinking": False}
    plain = SamplingParams()
    assert initial_settings(page_args([]), {"id": "unreachable", "error": "x"}) == \
        {"temperature": plain.temperature, "top_p": plain.top_p, "max_tokens": plain.max_new_tokens, "thinking": False}
