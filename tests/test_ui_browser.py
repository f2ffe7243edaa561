"""`liandan ui` in a real headless Chromium (Playwright, Debian's chromium): the command started as
a user starts it, on a free port with the tiny chat model and its own state directory, and clicked
through as a user would: a comparison, a data file's validation errors, a short SFT run whose loss
curve gains points, found again after a reload, stopped (with a checkpoint) and resumed, a streamed
chat reply, and the page switched to Chinese.

Screenshots of every tab go to $LIANDAN_UI_SCREENSHOTS, or to a directory under pytest's temporary
directory (printed at the end of the module). Skipped where Playwright or Chromium is missing,
except under CI (env CI set), where that fails: CI installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import colour_pixels
from conftest import chat_row, write_jsonl

LINE = "#4c78a8"  # Vega's first colour: the training loss
TABS = ["Look", "Data", "Train", "Evaluate", "Chat", "Export"]
TABS_ZH = ["看模型", "数据", "训练", "评测", "对话", "导出"]


def chromium_or_skip() -> str:
    browser = shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        browser = None
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Playwright (pip) or `chromium` (apt) is missing: the CI image must install both")
        pytest.skip("Playwright (pip install playwright) or `chromium` (apt install chromium) is not installed; CI runs this test")
    if not os.environ.get("CI"):
        pytest.importorskip("gradio", reason="the ui extra is not installed (pip install -e '.[ui]')")
    return browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_model_dir):
    """``liandan ui`` as a subprocess; yields (url, working directory, state directory)."""
    chromium_or_skip()
    work = tmp_path_factory.mktemp("ui-work")
    state = work / "state"
    port = free_port()
    log = open(work / "ui.log", "wb")
    env = {**os.environ, "LIANDAN_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "liandan.cli", "ui", "--model", str(chat_model_dir), "--state-dir", str(state),
                                "--port", str(port)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while "liandan ui: open" not in (work / "ui.log").read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"liandan ui did not start:\n{(work / 'ui.log').read_text(errors='replace')}")
            time.sleep(0.5)
        yield url, work, state
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        from liandan.jobs import ACTIVE, Jobs

        for job in Jobs(state).list():  # a training process this test started and left running (same pid and start time)
            if job.status in ACTIVE:
                os.kill(job.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("LIANDAN_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nliandan ui screenshots: {folder}")


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server[0])
    page.get_by_role("tab", name="Look").wait_for()
    yield page
    page.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    page.wait_for_timeout(300)


def pick(page, label: str, value: str) -> None:
    """Type a value into a dropdown that takes any value (a path), as a user does."""
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Enter")


def step_shown(page) -> int:
    found = re.search(r"Step (\d+) of", page.locator("#job-progress").inner_text())
    return int(found.group(1)) if found else 0


def curve_points(page) -> int:
    """Points drawn on the loss plot: the segments of its line's path (Vega draws one per point)."""
    paths = page.locator("#loss-plot g.mark-line path").all()
    return max((len(re.findall(r"[MLC]", p.get_attribute("d") or "")) for p in paths), default=0)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_look_compares_chat_and_raw_side_by_side_with_stop_markers(page, shots):
    page.get_by_label("Max new tokens").first.fill("12")
    page.get_by_role("button", name="Compare").click()
    page.wait_for_selector("#look-status:has-text('outputs stopped by themselves')")
    report = page.frame_locator("iframe.liandan-report").locator("body")
    text = report.inner_text()
    assert "[chat]" in text and "[raw]" in text and "What is the capital of France?" in text
    assert len(re.findall(r"\d+ tokens · (stopped|hit the length limit)", text)) == 4  # 2 prompts x 2 modes, each marked
    page.screenshot(path=shots / "1-look.png", full_page=True)


def test_data_lists_invalid_records_and_marks_trained_and_stop_tokens(page, server, shots):
    bad = write_jsonl(server[1] / "bad.jsonl", [chat_row("Hello?", "Fine."), chat_row("How are you?", "Fine, thank you."),
                                                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}])  # fmt: skip
    open_tab(page, "Data")
    pick(page, "Data file", str(bad))
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_selector("#data-status:has-text('Inspected bad.jsonl')")
    errors = page.locator("#data-errors").inner_text()
    assert f"{bad}:3" in errors and "messages[1].content" in errors and "expected a non-empty string; got 5" in errors
    assert "Invalid records: 1." in page.locator("#data-summary").inner_text()
    encoded = page.locator("#data-encoded")
    assert "trained" in encoded.inner_text() and "stop token" in encoded.inner_text()
    assert encoded.get_by_text("<|im_end|>").count() >= 2  # each example's trained stop token, marked on its own
    page.screenshot(path=shots / "2-data.png", full_page=True)


def test_train_shows_a_live_curve_survives_a_reload_and_stops_and_resumes(page, server, shots):
    from PIL import Image

    data = write_jsonl(server[1] / "train.jsonl", [chat_row(f"Question {i}?", "Fine, thank you.") for i in range(8)])
    run_dir = server[1] / "runs" / "ui-sft"
    open_tab(page, "Train")
    for name, value in [("data", str(data)), ("output_dir", str(run_dir)), ("max_steps", "2000")]:
        box = page.locator(f"#sft-{name} textarea, #sft-{name} input").first
        box.fill(value)
        box.press("Tab")
    page.wait_for_selector("#train-command:has-text('--set max_steps=2000')")
    assert "max_steps: 2000" in page.locator("#train-recipe").inner_text()
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("#train-message:has-text('Started job')")
    wait_until(lambda: step_shown(page) >= 2 and curve_points(page) >= 2, 180, "the first steps on the loss curve")
    first = curve_points(page)
    wait_until(lambda: curve_points(page) > first + 2, 120, "the loss curve to gain points")
    assert "left" in page.locator("#job-progress").inner_text() and "running" in page.locator("#job-progress").inner_text()
    page.locator("#loss-plot").screenshot(path=shots / "3-loss-curve.png")
    assert colour_pixels(Image.open(shots / "3-loss-curve.png").convert("RGB"), LINE) > 100  # the line is drawn, not only its axes
    page.screenshot(path=shots / "3-train.png", full_page=True)

    page.reload()  # the job lives on the server: the new page finds it, still running
    open_tab(page, "Train")
    page.wait_for_selector("#jobs-table:has-text('ui-sft')")
    wait_until(lambda: step_shown(page) > 0, 30, "the job's progress after the reload")
    assert "running" in page.locator("#jobs-table").inner_text()

    page.get_by_role("button", name="Stop (keeps a checkpoint)").click()
    wait_until(lambda: "stopped" in page.locator("#job-progress").inner_text(), 120, "the job to stop")
    stopped_at = step_shown(page)
    assert "with a checkpoint" in page.locator("#job-log textarea").input_value()
    page.get_by_role("button", name="Resume").click()
    wait_until(lambda: "running" in page.locator("#job-progress").inner_text() and step_shown(page) > stopped_at, 180,
               "the resumed job to train past its checkpoint")  # fmt: skip
    assert "--resume" in page.locator("#job-log textarea").input_value()
    page.screenshot(path=shots / "4-train-resumed.png", full_page=True)
    page.get_by_role("button", name="Stop (keeps a checkpoint)").click()
    wait_until(lambda: "stopped" in page.locator("#job-progress").inner_text(), 120, "the resumed job to stop")


def test_chat_streams_the_reply(page, shots):
    open_tab(page, "Chat")
    page.evaluate("""() => {  // every length the last reply had while it came in
        window.replyLengths = [];
        const chat = document.querySelector('#chatbot');
        new MutationObserver(() => {
            const replies = chat.querySelectorAll('.bot');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].innerText.length);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")
    box = page.locator("#chat-input textarea")
    box.fill("Hello, how are you today?")
    box.press("Enter")
    page.wait_for_selector("#chat-status:has-text('tokens')")
    lengths = [n for n in page.evaluate("window.replyLengths") if n]
    assert len(set(lengths)) >= 3, lengths  # it grew piece by piece, not all at once
    assert "Hello, how are you today?" in page.locator("#chatbot").inner_text()
    page.get_by_role("button", name="Save as training data").click()  # the tiny model's reply is cut: nothing to train on
    page.wait_for_selector("#chat-status:has-text('Not saved')")
    page.screenshot(path=shots / "5-chat.png", full_page=True)


def test_every_tab_and_the_switch_to_chinese(page, shots):
    for n, name in enumerate(TABS):
        open_tab(page, name)
        page.screenshot(path=shots / f"6-{n}-{name.lower()}.png", full_page=True)
    page.get_by_text("简体中文").click()
    page.get_by_role("tab", name="看模型").wait_for()
    assert [page.get_by_role("tab", name=name, exact=True).count() for name in TABS_ZH] == [1] * 6
    assert page.get_by_role("tab", name="Look", exact=True).count() == 0
    open_tab(page, "看模型")
    assert page.get_by_role("button", name="运行对比").is_visible()
    assert page.get_by_text("每行一个提示词。").is_visible()  # help texts change too
    for n, name in enumerate(TABS_ZH):
        open_tab(page, name)
        page.screenshot(path=shots / f"7-{n}-zh-{TABS[n].lower()}.png", full_page=True)
    open_tab(page, "训练")
    assert page.get_by_role("button", name="开始训练").is_visible()
