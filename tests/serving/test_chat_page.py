"""The chat page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium):
type a question, watch the answer stream in, and get what the API answers; multi-turn, Stop, Clear.

Set MINIGPT_SCREENSHOT=path.png to keep the screenshot (docs/serving-chat.png was made that way)."""
import os
import shutil

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (`apt-get install -y chromium "
                                       "chromium-driver`; .ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def set_field(browser, id_, value):
    field = browser.find_element(By.ID, id_)
    field.clear()
    field.send_keys(str(value))


def ask(browser, question):
    """Type the question, press Enter; the new answer element."""
    before = len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    browser.find_element(By.ID, "question").send_keys(question, Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before)
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def open_page(browser, server, max_tokens):
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    WebDriverWait(browser, 30).until(lambda b: "tiny" in b.find_element(By.ID, "model").text)
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", max_tokens)


def test_the_page_streams_the_same_answer_as_the_api(browser, live_server, tiny_ckpt, tmp_path):
    server = live_server(["--checkpoint", tiny_ckpt])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    open_page(browser, server, max_tokens=24)

    q1, q2 = "What colour is the apple?", "And the car?"  # each answer: 24 tokens (max_tokens)
    a1 = ask(browser, q1)
    WebDriverWait(browser, 120).until(lambda b: a1.get_attribute("data-done") == "true")
    expected1 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q1}],
                                               temperature=0, max_tokens=24).choices[0].message.content
    assert a1.text == expected1
    assert int(a1.get_attribute("data-chunks")) > 1  # it arrived in pieces, as they were generated

    a2 = ask(browser, q2)  # the page sends the whole conversation: the API's multi-turn answer
    WebDriverWait(browser, 120).until(lambda b: a2.get_attribute("data-done") == "true")
    expected2 = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": q1}, {"role": "assistant", "content": expected1},
                  {"role": "user", "content": q2}]).choices[0].message.content
    assert a2.text == expected2
    assert "24 new tokens" in browser.find_element(By.ID, "stats").text

    # A third, long question no longer fits the 128-token context with 24 new tokens: the page leaves
    # out the oldest question and answer (as generate_finetuned.py does) and says so.
    q3 = ("Tell me, please, in as few words as you can manage, what colour the old wooden door at the end "
          "of the long road near the river is painted this year?")
    a3 = ask(browser, q3)
    WebDriverWait(browser, 120).until(lambda b: a3.get_attribute("data-done") == "true")
    expected3 = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": q2}, {"role": "assistant", "content": expected2},
                  {"role": "user", "content": q3}]).choices[0].message.content
    assert a3.text == expected3 and a3.get_attribute("data-dropped") == "1"
    with pytest.raises(openai.BadRequestError):  # the whole conversation would not have fitted
        client.chat.completions.create(model="tiny", max_tokens=24, messages=[
            {"role": "user", "content": q1}, {"role": "assistant", "content": expected1},
            {"role": "user", "content": q2}, {"role": "assistant", "content": expected2},
            {"role": "user", "content": q3}])

    shot = os.environ.get("MINIGPT_SCREENSHOT") or str(tmp_path / "chat.png")
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


def test_stop_button_stops_the_generation(browser, live_server, tiny_ckpt):
    server = live_server(["--checkpoint", tiny_ckpt], gate=True)
    open_page(browser, server, max_tokens=100)
    answer = ask(browser, "Tell me a long story.")
    server.gate.open(6)
    WebDriverWait(browser, 60).until(lambda b: int(answer.get_attribute("data-chunks")) >= 1)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(lambda b: answer.get_attribute("data-done") == "stopped")
    job = server.jobs[-1]
    server.wait(job.cancelled.is_set, what="the server to see the page stop")
    passed = server.gate.passed
    server.gate.open()
    server.wait(server.idle, what="idle")
    assert job.new_tokens <= passed + 1 < 100
    assert browser.find_element(By.ID, "send").is_enabled()
