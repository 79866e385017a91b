"""A tiny Chrome DevTools Protocol client (aiohttp, already a ComfyUI dependency) for headless Debian chromium."""
from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Screenshot:
    """A step of `Browser.run`: a PNG of the window after `settle` seconds."""

    def __init__(self, settle: float = 0.5):
        self.settle = settle


class Browser:
    """chromium --headless with a DevTools port; `evaluate(js)` runs (awaited) JS in the one page."""

    def __init__(self, exe: str, window: tuple[int, int] | None = None):
        self.exe = exe
        self.window = window
        self.profile = tempfile.mkdtemp(prefix="fewstep-chromium-")
        self.proc = None

    def start(self, timeout=30.0) -> Browser:
        self.proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.time() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"chromium did not open its DevTools port: {err}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _session(self, url: str, scripts: list[str], ready_js: str, timeout: float):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                pages = [p for p in await r.json() if p.get("type") == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                seq = 0
                logs: list[str] = []

                async def call(method, **params):
                    nonlocal seq
                    seq += 1
                    my = seq
                    await ws.send_json({"id": my, "method": method, "params": params})
                    while True:
                        msg = await asyncio.wait_for(ws.receive_json(), timeout)
                        if msg.get("method") == "Runtime.consoleAPICalled":
                            logs.append(" ".join(str(a.get("value", a.get("description", "")))
                                                 for a in msg["params"]["args"]))
                        if msg.get("id") == my:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg["result"]

                async def evaluate(js):
                    res = await call("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
                    if "exceptionDetails" in res:
                        d = res["exceptionDetails"]
                        raise RuntimeError(f"JS error: {d.get('exception', {}).get('description') or d.get('text')}")
                    return res["result"].get("value")

                await call("Runtime.enable")
                await call("Page.enable")
                if self.window:
                    await call("Emulation.setDeviceMetricsOverride", width=self.window[0], height=self.window[1],
                               deviceScaleFactor=1, mobile=False)
                await call("Page.navigate", url=url)
                deadline = time.time() + timeout
                while not await evaluate(ready_js):
                    if time.time() > deadline:
                        raise RuntimeError(f"page {url} never became ready ({ready_js}); console: {logs[-20:]}")
                    await asyncio.sleep(0.25)
                results = []
                for step in scripts:
                    if isinstance(step, Screenshot):
                        await asyncio.sleep(step.settle)  # let the canvas draw the frame
                        shot = await call("Page.captureScreenshot", format="png")
                        results.append(base64.b64decode(shot["data"]))
                    else:
                        results.append(await evaluate(step))
                return results, logs

    def run(self, url: str, scripts: list, ready_js: str = "document.readyState === 'complete'",
            timeout: float = 60.0):
        """Open `url`, wait for `ready_js` to be truthy, evaluate each script (a `Screenshot` step takes a PNG of the
        window: its bytes are the step's value); returns (values, console lines)."""
        return asyncio.run(self._session(url, scripts, ready_js, timeout))
