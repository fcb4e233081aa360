"""The web page at `/` in a real browser (Debian's headless Chromium driven by Playwright)
against the embedded cluster on Ray Serve: it loads with every request answered by the cluster
and nothing else, a prompt submitted in the page comes back as an image in the page and in its
gallery, a chat answer streams into the page, and /api/docs renders Swagger UI offline.

Screenshots of the main views go to artifacts/screenshots/, the page-load and click-to-image
figures to artifacts/web_timings.json (bench/web_page.py prints the same figures).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from serve_harness import ROOT, running_cluster

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
URL = "http://127.0.0.1:8000"
ARTIFACTS = ROOT / "artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
VIEWPORT = {"width": 1100, "height": 760}  # screenshots of the viewport only: small files
WAIT_MS = 240_000  # the first image of a fresh cluster includes loading its model


def launch_browser(playwright):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return playwright.chromium.launch(executable_path=chromium)


class WatchedPage:
    """A browser page that records everything that went wrong: console errors, uncaught
    exceptions, failed requests, error answers, and any request for another host than the
    cluster's (which is refused, as it would fail on a machine without internet)."""

    def __init__(self, browser, base: str = URL):
        self.base, self.host = base, urlsplit(base).netloc
        self.problems: list[str] = []
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.route("**/*", self._only_the_cluster)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))

    def _only_the_cluster(self, route) -> None:
        url = urlsplit(route.request.url)
        if url.scheme in ("data", "blob") or url.netloc == self.host:
            route.continue_()
        else:
            self.problems.append(f"another host: {route.request.url}")
            route.abort()

    def open(self, path: str = "/") -> dict:
        """Open `path` of the page and wait until its first view has loaded its data; the
        navigation's load event and that moment, in ms from the start of the navigation."""
        self.page.goto(self.base + path)
        self.page.wait_for_selector("html[data-ready=true]", state="attached")
        return self.page.evaluate("""() => ({
            load_ms: Math.round(performance.getEntriesByType("navigation")[0].loadEventEnd),
            ready_ms: Math.round(performance.getEntriesByName("ready")[0].startTime)})""")

    def show(self, tab: str) -> None:
        self.page.click(f"[role=tab][data-tab={tab}]")
        self.page.wait_for_selector(f"#{tab}[role=tabpanel]:not([hidden])")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png")

    def close(self) -> None:
        self.context.close()


@contextmanager
def watched(browser, base: str = URL):
    page = WatchedPage(browser, base)
    try:
        yield page
    finally:
        page.close()


def fill_form(page: WatchedPage, prompt: str, model: str = "tiny-sd15", size: int = 64,
              steps: int = 4, seed: str = "7") -> None:
    p = page.page
    page.show("generate")
    p.fill("#prompt", prompt)
    p.select_option("#model", model)
    for name, value in (("width", size), ("height", size), ("steps", steps), ("seed", seed), ("n", 1)):
        p.fill(f"#generate-form [name={name}]", str(value))


def generate_in_page(page: WatchedPage, prompt: str, model: str = "tiny-sd15", size: int = 64,
                     steps: int = 4, seed: str = "7", options: Callable | None = None) -> dict:
    """Fill the Generate form (then `options(page)`), click Generate, wait until the image is
    shown; what the page measured from the click to the image's load event, and the image
    element's facts."""
    p = page.page
    fill_form(page, prompt, model, size, steps, seed)
    if options is not None:
        options(p)
    p.click("#generate-button")
    card = p.locator(".job").first
    card.locator("img.loaded").wait_for(timeout=WAIT_MS)
    p.wait_for_selector(f".job[data-id='{card.get_attribute('data-id')}'][data-state=done]",
                        timeout=WAIT_MS)
    image = card.locator("img.loaded").first
    return {"id": card.get_attribute("data-id"),
            "first_image_ms": int(card.get_attribute("data-first-image-ms")),
            "src": image.get_attribute("src"),
            "size": image.evaluate("img => [img.naturalWidth, img.naturalHeight]"),
            "status": card.locator(".status").inner_text()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("cluster")) as info:
        yield info


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_browser(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def timings():
    figures: dict = {}
    yield figures
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "web_timings.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nweb page figures (tiny models, this machine): {json.dumps(figures)}")


def test_page_generates_an_image_and_keeps_it_in_the_gallery(cluster, browser, timings):
    with watched(browser) as page:
        loaded = page.open("/")
        models = page.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert "tiny-sd15" in models and "tiny-sdxl" in models, models
        samplers = page.page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
        assert "k_euler" in samplers and "DDIM" in samplers
        post = page.page.eval_on_selector_all("#post-processing input", "is => is.map(i => i.value)")
        assert "RealESRGAN_x2plus" in post and "strip_background" in post, post
        assert page.page.inner_text("#whoami").startswith("Anonymous")

        shown = generate_in_page(page, "a lighthouse on a cliff")
        assert shown["size"] == [64, 64], shown
        assert shown["src"].startswith(f"{URL}/api/v2/objects/"), shown["src"]
        assert shown["status"] == "done"
        page.screenshot("generate")

        # The gallery has it, and still has it after a reload (localStorage).
        page.page.reload()
        page.page.wait_for_selector("html[data-ready=true]", state="attached")
        page.show("gallery")
        entry = page.page.locator(f".entry[data-id='{shown['id']}']")
        entry.locator("img").wait_for()
        assert entry.locator("img").get_attribute("src") == shown["src"]
        assert "a lighthouse on a cliff" in entry.inner_text()
        entry.locator("img").evaluate("img => img.decode()")
        page.screenshot("gallery")
        assert page.problems == []
    timings.update(page_load_ms=loaded["load_ms"], page_ready_ms=loaded["ready_ms"],
                   click_to_first_image_ms=shown["first_image_ms"])


def test_loras_post_processing_and_qr_code_from_the_form(cluster, browser):
    def lora_and_upscaler(p):
        p.click("summary:has-text('LoRAs')")
        p.click("#add-lora")
        p.fill("#loras [name=lora_name]", "tiny-lora")
        p.fill("#loras [name=lora_strength]", "0.8")
        p.click("summary:has-text('Post-processing')")
        p.check("#post-processing input[value=RealESRGAN_x2plus]")

    with watched(browser) as page:
        page.open("/")
        shown = generate_in_page(page, "a lighthouse, tinystyle", seed="11", options=lora_and_upscaler)
        assert shown["size"] == [128, 128], shown  # 64x64 upscaled x2
        # The QR code's fields, as the form sends them, pass the API's checks (priced, not made).
        p = page.page
        p.fill("#generate-form [name=width]", "768")
        p.fill("#generate-form [name=height]", "768")
        p.uncheck("#post-processing input[value=RealESRGAN_x2plus]")
        p.click("#loras button:has-text('Remove')")
        p.click("summary:has-text('QR code')")
        p.check("[name=qr_enabled]")
        p.fill("[name=qr_code]", "example.com/lighthouse")
        p.select_option("[name=protocol]", "https")
        p.select_option("[name=module_drawer]", "circle")
        p.click("#price-button")
        p.wait_for_function("document.getElementById('price').textContent"
                            " || !document.getElementById('generate-error').hidden")
        assert p.locator("#generate-error").is_hidden(), p.inner_text("#generate-error")
        assert p.inner_text("#price").endswith(" kudos")
        assert page.problems == []


def test_chat_streams_the_answer_into_the_page(cluster, browser):
    with watched(browser) as page:
        page.open("/#chat")
        p = page.page
        p.select_option("#chat-model", "tiny-llm")
        p.fill("#chat-max-tokens", "48")
        # Record the answer's text each time the page changes it: streamed, it grows in steps.
        p.evaluate("""() => {
            window.seenLengths = [];
            new MutationObserver(() => {
                const answer = document.querySelector("#chat-log .assistant .content");
                if (answer) window.seenLengths.push(answer.textContent.length);
            }).observe(document.getElementById("chat-log"), {subtree: true, childList: true, characterData: true});
        }""")
        p.fill("#chat-text", "Tell me a story about a lighthouse.")
        p.click("#chat-send")
        answer = p.locator("#chat-log .message.assistant").first
        p.wait_for_selector("#chat-log .message.assistant[data-finish]", timeout=WAIT_MS)
        assert answer.get_attribute("data-finish") in ("length", "stop"), p.inner_text("#chat-error")
        text = answer.locator(".content").inner_text()
        assert text.strip(), "no answer text"
        assert int(answer.get_attribute("data-chunks")) > 1
        partial = {n for n in p.evaluate("window.seenLengths") if 0 < n < len(text)}
        assert partial, "the answer appeared all at once, not streamed"
        assert p.locator("#chat-log .message.user").inner_text().endswith("Tell me a story about a lighthouse.")
        page.screenshot("chat")
        assert page.problems == []


def test_workers_models_and_account_views(cluster, browser):
    with watched(browser) as page:
        page.open("/#workers")
        p = page.page
        p.wait_for_selector("#worker-table tbody tr td")
        assert "tiny-llm" in p.inner_text("#text-models")
        assert "tiny-sd15" in p.inner_text("#image-models")
        workers = p.inner_text("#worker-table")
        assert "online" in workers and "tiny-sd15" in workers, workers  # the cluster's own
        page.screenshot("workers")
        page.show("account")
        p.wait_for_selector("#account-details dt")
        details = p.inner_text("#account-details")
        assert "Anonymous" in details and "Kudos" in details
        page.screenshot("account")
        assert page.problems == []


def test_api_errors_are_shown_to_the_user(cluster, browser):
    with watched(browser) as page:
        page.open("/")
        p = page.page
        p.fill("#prompt", "a boat")
        p.fill("#generate-form [name=steps]", "0")
        p.click("#generate-button")
        p.wait_for_selector("#generate-error:not([hidden])")
        assert p.inner_text("#generate-error").startswith("params.steps:")
        page.show("account")
        p.fill("#apikey", "not-a-key")
        p.click("#key-form button[type=submit]")
        p.wait_for_selector("#account-error:not([hidden])")
        assert "apikey" in p.inner_text("#account-error")
        # The only problems are the two refusals the page showed.
        assert [x.split(":")[0] for x in page.problems if not x.startswith("console")] == ["400", "401"]


def test_api_docs_render_offline(cluster, browser):
    with watched(browser) as page:
        page.page.goto(f"{URL}/api/docs")
        page.page.wait_for_selector('.opblock-summary-path:has-text("/api/v2/generate/async")')
        page.screenshot("api-docs")
        assert page.problems == []
