"""Takes the README's playground screenshot: ``qadapter serve`` on the embedded model, headless Chromium.

    python scripts/playground_screenshot.py [docs/playground.png] [--adapter DIR]

Without ``--adapter`` it serves a Q-Adapter with random LoRA weights on the embedded SmolLM2-135M-
Instruct (as ``bench/serve.py`` does): the picture shows the playground, not a trained customization.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve import save_adapter, start_server  # noqa: E402  (bench/serve.py)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output", nargs="?", default="docs/playground.png")
    p.add_argument("--adapter", default=None, help="a saved Q-Adapter folder (default: random LoRA weights)")
    p.add_argument("--prompt", default="How do I make a cup of green tea?")
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(args.adapter) if args.adapter else save_adapter(Path(tmp))
        # a generous batching window: the page's two requests (base, customized) share one batch
        proc, url = start_server(adapter, 1, argparse.Namespace(clients=4, max_tokens=512), "--batch-wait-ms", "500")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1200,720", "--force-device-scale-factor=1"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 900)
            wait.until(lambda d: d.find_element(By.ID, "adapter").get_attribute("value"))
            slider = driver.find_element(By.ID, "strength")
            slider.send_keys(Keys.HOME)
            for _ in range(round((args.strength - 0.1) / 0.1)):
                slider.send_keys(Keys.ARROW_RIGHT)
            driver.find_element(By.ID, "prompt").send_keys(args.prompt)
            box = driver.find_element(By.ID, "max-tokens")
            box.clear()
            box.send_keys(str(args.max_tokens))
            driver.find_element(By.ID, "send").click()
            start = time.monotonic()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
            print(f"answered in {time.monotonic() - start:.1f} s")
            driver.save_screenshot(args.output)
            print(f"saved {args.output}")
        finally:
            driver.quit()
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
