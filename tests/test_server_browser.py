"""The playground in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium).

It loads ``/``, picks an adapter, types a prompt, moves the strength slider with the keyboard, sends,
waits for both streamed answers, checks them against ``QAdapter.generate`` and saves a screenshot
(``$QADAPTER_SCREENSHOT`` or the test's temporary folder). It skips, saying why, only where no
Chromium or chromedriver can be found (``scripts/install.sh --test`` installs them as root).
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_testing import one_torch_thread, running_server, save_adapters  # noqa: E402,F401


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        reason = "selenium is not installed (pip install 'qadapter[test]')"
    else:
        binary, driver = find_chromium(), shutil.which("chromedriver")
        if binary and driver:
            options = webdriver.ChromeOptions()
            options.binary_location = binary
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1200,760", "--force-device-scale-factor=1"):
                options.add_argument(arg)
            return webdriver.Chrome(service=Service(executable_path=driver), options=options)
        reason = (f"no Chromium / chromedriver found (chromium: {binary}, chromedriver: {driver}); "
                  "as root, scripts/install.sh --test installs Debian's chromium and chromium-driver")
    print(f"SKIPPED the playground browser test: {reason}")
    warnings.warn(f"the playground browser test is skipped: {reason}")
    pytest.skip(reason)


def test_playground_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from qadapter.modeling import QAdapter
    from qadapter.server import ServedModels

    paths = save_adapters(tmp_path / "adapters")
    served = ServedModels.load(paths)
    driver = browser()
    try:
        with running_server(served, max_tokens_cap=64) as (url, app):
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 2)
            picker = Select(driver.find_element(By.ID, "adapter"))
            assert [o.text for o in picker.options] == ["tiny", "tiny-full"]
            picker.select_by_visible_text("tiny-full")  # full parameterization: no strength knob
            assert not driver.find_element(By.ID, "strength").is_enabled()
            assert driver.find_element(By.ID, "strength-value").text == "n/a"
            picker.select_by_visible_text("tiny")
            slider = driver.find_element(By.ID, "strength")
            assert slider.is_enabled() and slider.get_attribute("value") == "1"
            slider.click()  # the slider's middle: 1.5 on 0.1 .. 3 (a real click, then the keyboard)
            slider.send_keys(Keys.HOME)
            for _ in range(14):
                slider.send_keys(Keys.ARROW_RIGHT)
            assert slider.get_attribute("value") == "1.5"
            assert driver.find_element(By.ID, "strength-value").text == "1.5"
            assert "strength 1.5" in driver.find_element(By.ID, "custom-title").text
            driver.find_element(By.ID, "prompt").send_keys("w1 w2 w3")
            max_tokens = driver.find_element(By.ID, "max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("24")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
            base = driver.find_element(By.ID, "base-output").get_property("textContent")
            custom = driver.find_element(By.ID, "custom-output").get_property("textContent")
            status = driver.find_element(By.ID, "status").text
            shot = os.environ.get("QADAPTER_SCREENSHOT") or str(tmp_path / "playground.png")
            assert driver.save_screenshot(shot)
            with open(shot, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            assert os.path.getsize(shot) > 5000
            print(f"playground screenshot: {shot}")
            assert status == "Done.", status
            qa = QAdapter.from_pretrained(paths["tiny"])
            messages = [{"role": "user", "content": "w1 w2 w3"}]
            assert base == qa.generate([messages], max_new_tokens=24, policy="base")[0]
            assert custom == qa.generate([messages], max_new_tokens=24, strength=1.5)[0]
            assert base and custom and base != custom
            assert "tokens" in driver.find_element(By.ID, "custom-meta").text
            assert app.state.scheduler.snapshot()["rows"] >= 2
    finally:
        driver.quit()


def test_playground_with_an_api_key(tmp_path):
    """With ``--api-key`` the page takes the key from ``/#key=...`` or asks for it at the first 401,
    and its API calls (models, streamed chats) carry it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from qadapter.server import ServedModels

    served = ServedModels.load(save_adapters(tmp_path / "adapters"))
    driver = browser()
    key = "sk-browser-test"
    try:
        with running_server(served, max_tokens_cap=64, api_key=key) as (url, app):
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")  # no key yet: the page asks for it
            alert = wait.until(lambda d: _alert(d))
            alert.send_keys(key)
            alert.accept()
            wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 2)
            driver.execute_script("sessionStorage.clear()")
            driver.get("about:blank")  # a fresh load below, not a same-page fragment change
            driver.get(url + "/#key=" + key)  # the key in the fragment: no question
            wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) == 2)
            assert "key=" not in driver.current_url  # the page removes it from the address
            driver.find_element(By.ID, "prompt").send_keys("w1 w2 w3")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
            assert driver.find_element(By.ID, "status").text == "Done."
            assert driver.find_element(By.ID, "custom-output").get_property("textContent")
            assert app.state.scheduler.snapshot()["rows"] >= 2
    finally:
        driver.quit()


def _alert(driver):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return False
