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
MESSAGE = "[data-testid='stChatMessage']"


@pytest.fixture
def api(tmp_path_factory):
    proc, url = start_server(build_chat_model(tmp_path_factory.getbasetemp() / "serve_chat_model"),
                             "--api-key", API_KEY)
    yield url + "/v1"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def page(api):
    proc, url = start_page(api)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def start_page(api: str, max_tokens: int = 60) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(WEBUI), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--api", api, "--temperature", "0", "--max-tokens", str(max_tokens)]
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
    return proc, url


needs_chromium = pytest.mark.skipif(bool(missing), reason=f"needs Debian's chromium and chromedriver (missing: "
                                    f"{missing}); install with `apt-get install chromium chromium-driver`")


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, nothing is downloaded.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def waiter(driver):
    """Streamlit redraws elements on every rerun, so an element found a moment ago can be gone by the time its
    text is read: a wait retries its condition then instead of failing (StaleElementReferenceException)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 90, ignored_exceptions=(StaleElementReferenceException,))


@needs_chromium
def test_chat_page_streams_a_reply_in_chromium(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    driver = chromium()
    try:
        driver.get(page)
        wait = waiter(driver)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")))
        sidebar = "[data-testid='stSidebar']"
        wait.until(lambda d: "parameters" in d.find_element(By.CSS_SELECTOR, sidebar).text)
        assert all(w in driver.find_element(By.CSS_SELECTOR, sidebar).text
                   for w in ("model", "Thinking", "Clear history"))
        box.send_keys("Hello")
        box.send_keys(Keys.ENTER)

        seen = []

        def reply(d):
            msgs = d.find_elements(By.CSS_SELECTOR, MESSAGE)
            text = msgs[-1].text if len(msgs) >= 2 else ""
            seen.append(text)
            # "▌" is the cursor drawn while the stream runs: gone once the reply is complete
            return HELLO_ANSWER in text and "▌" not in text and text

        wait.until(reply)
        wait.until(lambda d: "Hello" in d.find_elements(By.CSS_SELECTOR, MESSAGE)[0].text)
        clear(driver, wait)  # the lessons were learnt as first turns: start each one afresh
        # thinking on: the reasoning lands in a collapsible "Thinking" section, the answer below it
        driver.find_element(By.XPATH, "//*[@data-testid='stSidebar']//*[text()='Thinking']").click()
        send(driver, "Why?")
        wait.until(lambda d: "That is the question." in last_reply(d) and "▌" not in last_reply(d))
        wait.until(lambda d: "Thinking" in last_reply(d))

        def expander(d):
            return d.find_elements(By.CSS_SELECTOR, MESSAGE)[-1].find_element(By.CSS_SELECTOR,
                                                                              "[data-testid='stExpander']")

        if "To be, or not to be." not in expander(driver).text:
            expander(driver).find_element(By.TAG_NAME, "summary").click()
        wait.until(lambda d: "To be, or not to be." in expander(d).text)
        driver.find_element(By.XPATH, "//*[@data-testid='stSidebar']//*[text()='Thinking']").click()  # off again
        clear(driver, wait)
        # a tool: the model calls the calculator, the page runs it, shows the call and feeds the result back
        tools = driver.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stMultiSelect'] input")
        tools.send_keys("calculator")
        tools.send_keys(Keys.ENTER)
        send(driver, "What is 2 + 3?")
        wait.until(lambda d: "The answer is 5." in last_reply(d) and "▌" not in last_reply(d))
        wait.until(lambda d: "Tool call: calculator" in last_reply(d))
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
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, MESSAGE))


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_reply(driver) -> str:
    from selenium.webdriver.common.by import By

    msgs = driver.find_elements(By.CSS_SELECTOR, MESSAGE)
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


def test_an_uploaded_image_is_sent_as_a_data_url_part():
    """No browser needed: the page's message for the API, with and without an upload."""
    from minimind.serve.images import split_images
    from minimind.serve.webui import user_message

    assert user_message("Hi") == {"role": "user", "content": "Hi"}
    m = user_message("What is it?", b"\x89PNG...", "image/png")
    assert m["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORy4uLg=="}},
                            {"type": "text", "text": "What is it?"}]
    out, found = split_images([m], vision=True)
    assert "".join(p["text"] for p in out[0]["content"]) == "<image>\nWhat is it?"  # as MiniMind-V writes it
    assert found == [("messages.0.content.0", "data:image/png;base64,iVBORy4uLg==")]


@pytest.mark.slow  # a server, a page and a browser: ~1 min on a shared 2-core machine
@needs_chromium
def test_chat_page_with_an_image_upload_in_chromium(tokenizer, tmp_path):
    """A vision model's page shows an uploader; a PNG uploaded through the file input goes with the next message
    (shown in it), and the reply is the model's greedy answer to that image and text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from test_serve_vision import GREEDY, local_answer, png, vision_model

    from minimind.checkpoint import load_model, save_model

    save_model(vision_model(tokenizer), tmp_path / "vlm", tokenizer)
    (tmp_path / "a.png").write_bytes(png(1))
    want, _ = local_answer((load_model(tmp_path / "vlm"), tokenizer), [{"role": "user", "content": "<image>\nHi"}],
                           [png(1)])
    procs, driver = [], None
    try:
        server, api = start_server(tmp_path / "vlm")
        procs.append(server)
        page_proc, url = start_page(api + "/v1", max_tokens=GREEDY.max_new_tokens)
        procs.append(page_proc)
        driver = chromium()
        driver.get(url)
        wait = waiter(driver)
        upload = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stFileUploader'] input[type='file']")))
        upload.send_keys(str(tmp_path / "a.png"))
        wait.until(lambda d: "a.png" in d.find_element(By.CSS_SELECTOR, "[data-testid='stFileUploader']").text)
        send(driver, "Hi")
        assert want.strip()
        # the reply's text follows the avatar's icon name: the answer is complete when the text ends in it
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, MESSAGE)) == 2
                   and " ".join(last_reply(d).split()).endswith(" " + " ".join(want.split())))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, MESSAGE).find_elements(By.TAG_NAME, "img")
                   and "Hi" in d.find_element(By.CSS_SELECTOR, MESSAGE).text)
        wait.until(lambda d: "a.png" not in d.find_element(By.CSS_SELECTOR, "[data-testid='stFileUploader']").text)
    except Exception:
        if driver is not None:
            driver.save_screenshot(str(tmp_path / "failed.png"))
            print(f"page at failure: {tmp_path / 'failed.png'}\n{driver.find_element(By.TAG_NAME, 'body').text}")
        raise
    finally:
        if driver is not None:
            driver.quit()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
