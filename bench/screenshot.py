"""
A picture of serve.py's chat page answering one question, for the docs: starts serve.py on a free
port of 127.0.0.1, asks the question in Debian's headless Chromium (driven by Playwright, as
tests/test_serve.py does) at temperature 0, waits for the whole answer and saves a PNG.

    python bench/screenshot.py --out_dir=out/chain/dpo --question="$(cat data/pystdlib_bpe_chat/example_request.txt)" \
        --image=docs/serve.png

Reads the checkpoint only; writes the image.
"""

import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from optional import optional  # noqa: E402

out_dir = "out/chain/dpo"
question = "Write a Python function."
image = "serve.png"
width, height = 900, 640
chromium = "/usr/bin/chromium"  # Debian's: apt-get install chromium
configure(globals())

sync_api = optional("playwright.sync_api", "bench/screenshot.py", "playwright")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
server = subprocess.Popen([sys.executable, os.path.join(repo, "serve.py"), f"--out_dir={out_dir}", f"--port={port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
try:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        for _ in range(600):  # the server loads the model first
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                break
            except sync_api.Error:
                if server.poll() is not None:
                    raise SystemExit(f"bench error: serve.py stopped: {server.stderr.read().decode().strip()}")
                time.sleep(0.1)
        page.wait_for_selector(".dot.ok")
        page.click("#settings-button")
        page.locator("#temperature").evaluate("(s) => { s.value = 0; s.dispatchEvent(new Event('input')); }")
        page.click("#settings-button")
        page.fill("#input", question)
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant.streaming")
        page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=300_000)
        page.screenshot(path=image)
        browser.close()
finally:
    server.terminate()
    server.wait()
print(f"wrote {image}")
