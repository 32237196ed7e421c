# The chat page in headless Chromium (Debian's chromium, driven by Playwright): streaming, multi-turn history
# with a system prompt and the sampling controls, code rendering with HTML escaped, stop, clear and errors.
import json
import os

import pytest

from serve_helpers import demo, endless_demo, live_server, wait_until

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    yield page
    page.close()


def requests_to_api(page):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    return sent


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def answers(page):
    return page.locator(".message.assistant .content")


def test_multi_turn_streaming_chat(page):
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["chatglm3-demo"]) as (url, _):
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'chatglm3-demo'")
        sent = requests_to_api(page)
        page.fill("#system", "You are a helpful assistant.")
        page.fill("#temperature", "0")  # max length left empty: all that fits the context
        # count the updates of the answer while it streams
        page.evaluate("""window.updates = 0; new MutationObserver(() => window.updates++)
                         .observe(document.getElementById('messages'), {subtree: true, childList: true})""")
        ask(page, "hello")
        page.wait_for_selector(".message.assistant[data-state=done]")
        system = {"role": "system", "content": "You are a helpful assistant."}
        a1 = model.chat(tokenizer, "hello", history=[system], do_sample=False)[0]
        assert answers(page).nth(0).inner_text() == a1
        assert page.evaluate("window.updates") > 5  # the answer arrived in pieces

        ask(page, "what is the capital of France?")
        page.wait_for_selector(".message.assistant >> nth=1 >> xpath=self::*[@data-state='done']")
        history = [system, {"role": "user", "content": "hello"}, {"role": "assistant", "metadata": "", "content": a1}]
        a2 = model.chat(tokenizer, "what is the capital of France?", history=history, do_sample=False)[0]
        assert answers(page).nth(1).inner_text() == a2
        assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
        assert sent[1]["messages"][2]["content"] == a1
        assert sent[1]["stream"] is True and sent[1]["temperature"] == 0 and "max_tokens" not in sent[1]
        assert sent[1]["top_p"] == 0.8
        assert page.get_attribute("body", "data-busy") == "false"


def test_code_blocks_are_rendered_and_html_escaped(page):
    tokenizer, model = demo()
    answer = "Run `pip install x` then:\n```python\nprint('<b>hi</b>')\n```\n<img src=x onerror=\"window.hacked=1\">"
    events = [{"choices": [{"index": 0, "delta": {"content": answer[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(answer), 7)]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    with live_server(model, tokenizer) as (url, _):
        page.goto(url)
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
        ask(page, "show me code")
        page.wait_for_selector(".message.assistant[data-state=done]")
        content = answers(page).nth(0)
        assert content.locator("pre code.language-python").inner_text() == "print('<b>hi</b>')"
        assert content.locator("code").nth(0).inner_text() == "pip install x"
        assert content.locator("img, b").count() == 0 and page.evaluate("window.hacked") is None
        assert '<img src=x onerror="window.hacked=1">' in content.inner_text()
        # an unclosed fence (mid-stream) is already a code block
        html = page.evaluate("renderMarkdown('a\\n```js\\nlet x = 1 < 2;')")
        assert html == 'a<pre><code class="language-js">let x = 1 &lt; 2;</code></pre>'


def test_stop_clear_and_errors(page):
    tokenizer, model = endless_demo(delay=0.01)
    with live_server(model, tokenizer, max_batch=2) as (url, app):
        engine = app.state.engine
        page.goto(url)
        sent = requests_to_api(page)
        page.fill("#max_tokens", "400")  # 4 s at least: stopped long before
        ask(page, "hello")
        page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 5")
        assert page.is_disabled("#send") and engine.active == 1
        page.click("#stop")
        page.wait_for_selector(".message.assistant[data-state=stopped]")
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        assert wait_until(lambda: engine.active == 0, timeout=2)  # the aborted fetch freed the slot

        page.click("#clear")
        assert page.locator(".message").count() == 0
        page.fill("#max_tokens", "3")
        ask(page, "hi")
        page.wait_for_selector(".message.assistant[data-state=done]")
        assert [m["role"] for m in sent[-1]["messages"]] == ["user"]  # the history went with the clear

        page.fill("#max_tokens", "100000")
        ask(page, "hi again")
        error = page.wait_for_selector(".message.assistant.error")
        assert "context" in error.inner_text() and page.is_enabled("#send")
