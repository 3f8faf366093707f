"""The MLflow UI on a sweep's store: a local server, the links that open the comparison, and a
headless browser. A moved store is pointed at its artifacts first (tuning/tracking.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .presentation import runs_link
from .tracking import ARTIFACTS_DIR, redact, resolve_tracking_uri, sqlite_file

log = logging.getLogger(__name__)
DEFAULT_PORT = 5000


def base_url(tracking_uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
    """Where the UI answers: the tracking server itself, or the local server `sweeps/ui.py` starts."""
    if tracking_uri.startswith(("http://", "https://")):
        return redact(tracking_uri).rstrip("/")
    return f"http://{host}:{port}"


def instructions(tracking_uri: str, experiment: str, experiment_id: str, port: int = DEFAULT_PORT) -> str:
    """What the sweep prints: how to start the UI and the links that open the comparison."""
    base = base_url(tracking_uri, port=port)
    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        store = "" if tracking_uri == resolve_tracking_uri("auto") else f" --tracking-uri {tracking_uri}"
        lines.append(f"Open the UI:  python sweeps/ui.py {experiment}{store}   (serves {tracking_uri} on {base})")
    lines.append(f"Trials:       {runs_link(base, experiment_id)}")
    lines.append(f"Compare:      {runs_link(base, experiment_id, chart=True)}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tracking_uri: str, port: int, host: str = "127.0.0.1", log_file=None) -> subprocess.Popen:
    """`mlflow server` on the store, in its own process group (stop it with `stop_server`)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    db = sqlite_file(tracking_uri)
    if db is not None:
        command += ["--artifacts-destination", str(db.parent / ARTIFACTS_DIR)]
    # Without MLflow's job runner (a pool of worker processes for GenAI jobs, unused here).
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    out = log_file if log_file is not None else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_server(url: str, process: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the MLflow server at {url} did not answer within {timeout:.0f}s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ------------------------------------------------------------------ headless browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")  # fmt: skip


def chromium_missing() -> str | None:
    """Why headless Chromium cannot run here, or None."""
    import shutil

    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"{name} is not installed (apt-get install chromium chromium-driver)"
    return None


def chromium(profile_dir: str | os.PathLike, width: int = 1600, height: int = 1000):
    """A selenium driver of Debian's headless Chromium with a fresh profile."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait_for_text(driver, texts, timeout: float = 60.0) -> str:
    """The page's visible text once it holds every one of `texts`."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = driver.find_element(By.TAG_NAME, "body").text
        except Exception:
            body = ""
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise TimeoutError(f"the page never showed {missing}; it showed:\n{body[:3000]}")


def screenshots(base: str, experiment_id: str, trial_names: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """PNGs of what the links open, as a new user sees them (fresh profile): the runs table of the
    trials, the compare view and the first trial's page with its description."""
    import tempfile

    from selenium.webdriver.common.by import By

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(profile)
        try:
            for name, link in (("ui_trials", runs_link(base, experiment_id)),
                               ("ui_compare", runs_link(base, experiment_id, chart=True))):  # fmt: skip
                driver.get(link)
                wait_for_text(driver, trial_names)
                time.sleep(4)  # charts draw after the data arrives
                driver.save_screenshot(str(out / f"{name}.png"))
                written.append(out / f"{name}.png")
            driver.get(runs_link(base, experiment_id))
            wait_for_text(driver, trial_names)
            first = '.ag-pinned-left-cols-container [role=row][row-index="0"] a'
            driver.find_element(By.CSS_SELECTOR, first).click()
            wait_for_text(driver, ["stored BN statistics"])
            for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
                button.click()  # the whole description, cells included
            time.sleep(3)
            driver.save_screenshot(str(out / "ui_trial.png"))
            written.append(out / "ui_trial.png")
        finally:
            driver.quit()
    return written
