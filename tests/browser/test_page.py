"""The endpoint's page in a real browser: Debian's chromium driven by Playwright, against `clearml-sglang run` with
the stand-in engine (offline ClearML), as a user would use it.

Skipped where Playwright or chromium is missing; CI installs both (`.ci/run`). `SCREENSHOTS=dir` keeps the
screenshots (docs/serving.md's are made so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)

from tests.integration.test_clearml_offline import no_process_left, start, wait_ready  # noqa: E402

pytestmark = pytest.mark.browser

TOKEN = "page-token-" + "p" * 20
ENDPOINT = "zephyr"  # a name that appears nowhere on the page unless the deployment is shown
READER = "reader-token-" + "r" * 20  # the named, limited key's token (`keyed_endpoint`)
ALICE = {"name": "alice", "limits": {"rpm": 5, "tpm": 1000, "concurrent": 2, "max_tokens": 64, "priority": 10,
                                     "models": ["m"]},
         "usage": {"requests": 3, "errors": 0, "rate_limited": 1, "prompt_tokens": 40, "completion_tokens": 12},
         "in_flight": 0}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    cache = tmp_path_factory.mktemp("page")
    (cache / "sql").mkdir()  # (the stand-in engine reads no adapter; the app checks the path exists)
    process, base = start(cache, "models.0.model=org/m", f"models.0.endpoint_name={ENDPOINT}", "general.device=cpu",
                          "models.0.lora.enable=true", f"models.0.lora.modules=sql={cache / 'sql'}",
                          f"auth.tokens={TOKEN}", "idle.time_limit_hours=1", "idle.report_interval_seconds=1",
                          "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05",
                          f"env.FAKE_SGLANG_REQUEST_LOG={cache / 'engine.jsonl'}")
    try:
        wait_ready(process, base)
        yield base, cache
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    no_process_left()


def engine_requests(cache: Path) -> list[dict]:
    """What the stand-in engine received: one record per request and per client that went away."""
    path = cache / "engine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def engine_saw(cache: Path, event: str) -> bool:
    return any(record.get("event") == event for record in engine_requests(cache))


@pytest.fixture
def keyed_endpoint(tmp_path):
    """A deployment of its own whose one key is named and limited as the config says (`auth.tokens` NAME=TOKEN,
    `auth.limits`); its processes are awaited here, `endpoint`'s being alive beside them."""
    cache = tmp_path / "keyed"
    cache.mkdir()
    process, base = start(cache, "models.0.model=org/m", f"models.0.endpoint_name={ENDPOINT}", "general.device=cpu",
                          f"auth.tokens=reader={READER}",
                          "auth.limits=" + json.dumps({"reader": {"rpm": 600, "max_tokens": 128}}),
                          "idle.time_limit_hours=1")
    try:
        wait_ready(process, base)
        yield base
    finally:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
        assert not psutil.wait_procs(children, timeout=10)[1]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, base: str, width: int = 1280, height: int = 800):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(base + "/")
    return context, page


def sign_in(page, token: str = TOKEN) -> None:
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_label("Token", exact=True).press("Enter")  # the keyboard is enough


def answer_with_key(page, keys: list) -> None:
    """The page's data route answers as the deployment does, with `keys[-1]` as the caller's key (what a test sets
    there shows at the page's next refresh)."""
    def fulfill(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "key": keys[-1]})
    page.route("**/ui/api/status", fulfill)


def key_pairs(page) -> dict[str, str]:
    """The key's definition list as read: term -> definition."""
    return dict(zip(page.locator("#key dt").all_inner_texts(), page.locator("#key dd").all_inner_texts(),
                    strict=True))


def token_anywhere(page, token: str) -> bool:
    """The token is in the page's DOM: its markup, its text or a field's value."""
    values = page.evaluate("[...document.querySelectorAll('input, textarea, select')].map((e) => e.value).join(' ')")
    return any(token in text for text in (page.content(), page.locator("body").inner_text(), values))


def shoot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_nothing_of_the_deployment_shows_before_a_token_and_a_wrong_one_is_refused(endpoint, browser):
    base, _ = endpoint
    context, page = open_page(browser, base)
    assert page.get_by_label("Token", exact=True).is_visible()
    assert ENDPOINT not in page.content() and not page.locator("#deployment").is_visible()
    sign_in(page, "wrong-token-0123456789")
    sync_api.expect(page.locator("#signin-error")).to_contain_text("That token was refused: 401")
    assert ENDPOINT not in page.locator("body").inner_text()
    context.close()


def test_the_page_carries_strict_security_headers(endpoint, browser):
    base, _ = endpoint
    context = browser.new_context()
    response = context.request.get(base + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert context.request.get(base + "/ui/api/status").status == 401  # the data needs the token
    context.close()


def test_models_states_and_a_snippet_whose_curl_works(endpoint, browser, tmp_path):
    base, _ = endpoint
    context, page = open_page(browser, base)
    sign_in(page)
    rows = page.locator("#models tbody tr")
    sync_api.expect(rows).to_have_count(2)
    model, adapter = (rows.nth(i).locator("td").all_inner_texts() for i in range(2))
    assert model[:2] == [ENDPOINT, "resident"] and re.fullmatch(r"[\d,]+", model[2])  # its context length
    assert adapter[:3] == [f"{ENDPOINT}:sql\nadapter of {ENDPOINT}", "resident", model[2]]
    assert adapter[3:] == ["—"] * 5  # (its requests count with its base model's)
    assert page.evaluate("sessionStorage.getItem('clearml-sglang-token')") == TOKEN
    assert TOKEN not in page.url and not context.cookies()

    page.get_by_label("Stream", exact=True).uncheck()
    page.get_by_label("Max tokens", exact=True).fill("5")
    curl = page.locator("#snippet").inner_text()
    assert "YOUR_TOKEN" in curl and TOKEN not in curl
    done = subprocess.run(["bash", "-c", curl.replace("YOUR_TOKEN", TOKEN)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and '"chat.completion"' in done.stdout, done.stdout + done.stderr
    page.get_by_role("tab", name="Python").click()
    assert "from openai import OpenAI" in page.locator("#snippet").inner_text()
    sync_api.expect(rows.nth(0).locator("td").nth(2)).not_to_have_text("0")  # counted, without a reload
    page.get_by_label("Put my token in the snippets").check()
    assert TOKEN in page.locator("#snippet").inner_text()
    context.close()


def test_a_streamed_answer_arrives_token_by_token_and_stop_aborts_it(endpoint, browser):
    base, cache = endpoint
    context, page = open_page(browser, base)
    sign_in(page)
    sync_api.expect(page.locator("#models tbody tr")).to_have_count(2)
    page.get_by_label("Max tokens", exact=True).fill("400")  # 20 s at the stand-in's pace: long enough to stop
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#chat .turn").nth(1).locator("span")
    sync_api.expect(answer).not_to_be_empty()
    seen = {len(answer.inner_text())}
    sync_api.expect(answer).to_have_text(re.compile(r"^.{40,}", re.S), timeout=15_000)  # (CSP: no eval'd waits)
    seen.add(len(answer.inner_text()))
    assert len(seen) == 2  # it grew while streaming
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s", page.locator("#answer-stats").inner_text())
    page.get_by_role("button", name="Stop").click()
    sync_api.expect(page.locator("#chat")).to_contain_text("(stopped)")
    assert page.evaluate("document.activeElement.id") == "prompt"  # (not the page's body: Stop is disabled now)
    context.close()
    # the engine aborted the request: what it saw
    deadline = time.monotonic() + 60
    while not engine_saw(cache, "disconnect") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_saw(cache, "disconnect")


def test_an_engine_error_shows_in_the_playground_and_the_phone_layout_reads(endpoint, browser, tmp_path):
    base, _ = endpoint
    context, page = open_page(browser, base, 390, 844)
    sign_in(page)
    sync_api.expect(page.locator("#models tbody tr")).to_have_count(2)
    page.evaluate("document.getElementById('model').add(new Option('nosuch', 'nosuch', true, true))")
    page.get_by_role("button", name="Send").click()  # a model the endpoint does not serve
    sync_api.expect(page.locator("#play-error")).to_be_visible()
    assert page.locator("#play-error").inner_text().startswith("404: ")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the phone
    shoot(page, "page-phone.png", tmp_path)
    context.close()


def test_the_keyboard_is_enough(endpoint, browser):
    base, _ = endpoint
    context, page = open_page(browser, base)
    for _ in range(10):  # Tab from the top of the page reaches the token field
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "token":
            break
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#models tbody tr")).to_have_count(2)
    assert page.evaluate("document.activeElement.id") == "prompt"  # where the next thing is written
    page.keyboard.press("Enter")  # sends the message in the box
    answer = page.locator("#chat .turn").nth(1).locator("span")
    sync_api.expect(answer).not_to_be_empty()
    sync_api.expect(page.locator("#send")).to_be_enabled()  # (the stream has ended)
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s", page.locator("#answer-stats").inner_text())
    assert page.evaluate("document.activeElement.id") == "prompt"  # focus stayed where the user is
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.get_by_label("Message", exact=True).input_value() == "first line\nsecond line"  # (not sent)
    context.close()


def test_a_conversation_sends_every_turn_and_clear_starts_a_new_one(endpoint, browser, tmp_path):
    base, cache = endpoint
    context, page = open_page(browser, base)
    sign_in(page)
    sync_api.expect(page.locator("#models tbody tr")).to_have_count(2)
    page.get_by_label("System prompt", exact=True).fill("Answer in one word.")
    page.get_by_label("Max tokens", exact=True).fill("6")
    box = page.get_by_label("Message", exact=True)
    turns = page.locator("#chat .turn")
    box.fill("What is the capital of France?")
    box.press("Enter")
    sync_api.expect(turns).to_have_count(2)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    first_answer = turns.nth(1).locator("span").inner_text()
    assert first_answer
    box.fill("And of Germany?")
    page.get_by_role("button", name="Send").click()
    sync_api.expect(turns).to_have_count(4)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    asked = [r["messages"] for r in engine_requests(cache) if r.get("event") == "request" and "messages" in r]
    assert asked[-1] == [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": first_answer},
                         {"role": "user", "content": "And of Germany?"}]  # what the engine got: both turns
    snippet = page.locator("#snippet").inner_text()  # what is sent next: the conversation and the box's message
    assert first_answer in snippet and "And of Germany?" in snippet
    shoot(page, "page-desktop.png", tmp_path)
    page.get_by_role("button", name="Clear").click()
    sync_api.expect(turns).to_have_count(0)
    assert page.evaluate("document.activeElement.id") == "prompt"
    box.fill("Hello?")
    box.press("Enter")
    sync_api.expect(turns).to_have_count(2)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    asked = [r["messages"] for r in engine_requests(cache) if r.get("event") == "request" and "messages" in r]
    assert asked[-1] == [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hello?"}]
    context.close()


def test_the_base_url_copies_with_feedback_and_the_icon_needs_no_token(endpoint, browser):
    base, _ = endpoint
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(base + "/")
    sign_in(page)
    sync_api.expect(page.locator("#base-url")).to_have_text(base + "/v1")
    page.locator("#copy-base").click()
    sync_api.expect(page.locator("#copied-base")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == base + "/v1"
    page.locator("#copy").click()
    sync_api.expect(page.locator("#copied")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == page.locator("#snippet").inner_text()
    assert not errors  # (no 401 for the icon the browser asks for on its own)
    icon = page.request.get(base + "/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"] == "image/svg+xml"
    context.close()


def test_the_callers_key_its_limits_in_words_and_its_usage_refreshed_on_a_phone(endpoint, browser, tmp_path):
    base, _ = endpoint
    context, page = open_page(browser, base, 390, 844)
    keys = [ALICE]
    answer_with_key(page, keys)
    sign_in(page)
    section = page.get_by_role("region", name="Your key")
    sync_api.expect(section).to_be_visible()
    sync_api.expect(page.locator("#key-name")).to_have_text("alice")
    assert page.locator("#key-limits li").all_inner_texts() == [
        "5 requests/min", "1,000 tokens/min", "2 at once", "max_tokens 64", "priority 10", "models: m"]
    pairs = key_pairs(page)
    assert {term: pairs[term] for term in ("Name", "Requests", "Rate-limited", "Errors", "Prompt tokens",
                                           "Completion tokens", "In flight")} == {
        "Name": "alice", "Requests": "3", "Rate-limited": "1", "Errors": "0", "Prompt tokens": "40",
        "Completion tokens": "12", "In flight": "0"}
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    assert not token_anywhere(page, TOKEN)
    shoot(page, "page-key-phone.png", tmp_path)

    keys.append({**ALICE, "limits": {}, "usage": {**ALICE["usage"], "requests": 4, "prompt_tokens": 1234567}})
    sync_api.expect(page.locator("#key-limits li")).to_have_text(["no limits"])  # at the next refresh, no reload
    assert key_pairs(page)["Requests"] == "4" and key_pairs(page)["Prompt tokens"] == "1,234,567"
    keys.append(None)  # a deployment that names no key for its caller
    sync_api.expect(section).to_be_hidden()
    sync_api.expect(page.locator("#models tbody tr")).to_have_count(2)  # the rest of the page is as it was
    context.close()


def test_a_user_sees_their_keys_name_and_limits_and_their_token_nowhere_in_the_page(keyed_endpoint, browser):
    context, page = open_page(browser, keyed_endpoint)
    sign_in(page, READER)
    sync_api.expect(page.get_by_role("region", name="Your key")).to_be_visible()
    sync_api.expect(page.locator("#key-name")).to_have_text("reader")
    sync_api.expect(page.locator("#key-limits li")).to_have_text(["600 requests/min", "max_tokens 128"])
    page.get_by_label("Max tokens", exact=True).fill("3")
    page.get_by_role("button", name="Send").click()
    sync_api.expect(page.locator("#answer-stats")).to_contain_text("tokens/s")
    sync_api.expect(page.locator("#key-requests")).to_have_text("1")  # counted at the next refresh, no reload
    assert not token_anywhere(page, READER)
    context.close()
