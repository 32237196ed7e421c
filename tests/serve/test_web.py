# The chat page in headless Chromium (Debian's chromium, driven by Playwright): streaming, multi-turn history
# with a system prompt and the sampling controls, code rendering with HTML escaped, stop, clear and errors; the
# Tools and Code Interpreter modes (scripted models, real sandboxed kernels): collapsible call / observation /
# code / result blocks, highlighted code, inline figures, one kernel per browser conversation, freed on Clear.
import json
import os

import pytest

from chatglm.serve.agent import create_agent
from serve_helpers import TOOL_ANSWER, demo, endless_demo, interpreter_reply, live_server, scripted, tool_model, \
    wait_until

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


# ---------------------------------------------------------------- Tools and Code Interpreter modes

def agent_requests(page):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/agent/chat") else None)
    return sent


def open_mode(page, url, mode):
    page.goto(url)
    page.wait_for_function(f"(document.body.dataset.modes || '').includes('{mode}')")
    page.click(f"#modes button[data-mode={mode}]")
    assert page.get_attribute("body", "data-mode") == mode


def last_answer(page, n):
    page.wait_for_selector(f".message.assistant >> nth={n} >> xpath=self::*[@data-state='done']")
    return page.locator(".message.assistant").nth(n)


def test_tools_mode_shows_calls_and_observations(page):
    tokenizer, model = tool_model()
    with live_server(model, tokenizer, names=["m"]) as (url, _):
        sent = agent_requests(page)
        open_mode(page, url, "tools")
        assert page.is_visible("#modes button[data-mode=chat]") and page.is_hidden("#modes button[data-mode=interpreter]")
        assert "get_weather" in page.inner_text("#tool_list")
        ask(page, "What is the weather in Beijing?")
        answer = last_answer(page, 0)
        call, observation = answer.locator(".block.tool-call"), answer.locator(".block.observation")
        assert call.locator("summary").inner_text() == "Tool call: get_weather"
        assert call.get_attribute("open") is None  # collapsed until clicked
        call.locator("summary").click()
        assert json.loads(call.locator("code.language-json").inner_text()) == {"city": "Beijing"}
        observation.locator("summary").click()
        assert json.loads(observation.locator("pre").inner_text())["condition"] == "sunny"  # the demo table
        assert answer.locator(".text").inner_text() == TOOL_ANSWER

        ask(page, "And in Paris?")
        last_answer(page, 1)
        roles = [(m["role"], m.get("metadata", "")) for m in sent[1]["history"]]
        assert roles == [("system", ""), ("user", ""), ("assistant", "get_weather"), ("observation", ""),
                         ("assistant", "")]
        assert sent[1]["conversation_id"] == sent[0]["conversation_id"] and sent[1]["mode"] == "tools"


def test_chat_and_tools_only_without_interpreter_for_other_families(page):
    """A server without --interpreter offers no Code Interpreter tab; one without agent modes shows no switch."""
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["m"]) as (url, app):
        page.goto(url)
        page.wait_for_function("document.body.dataset.modes !== undefined")
        assert page.get_attribute("body", "data-modes") == "chat tools"
        # the sampling fields start from the model's defaults: the demo model's generation_config.json says greedy
        assert (page.input_value("#temperature"), page.input_value("#top_p")) == ("0", "0.8")
        app.state.agent = None  # as for a ChatGLM-6B / ChatGLM2-6B model
        app.state.service.defaults = {**app.state.service.defaults, "do_sample": True, "temperature": 0.95,
                                      "top_p": 0.7}
        page.goto(url)
        page.wait_for_function("document.body.dataset.modes !== undefined")
        assert page.get_attribute("body", "data-modes") == "chat" and page.is_hidden("#modes")
        assert (page.input_value("#temperature"), page.input_value("#top_p")) == ("0.95", "0.7")


@pytest.fixture(scope="module")
def interpreter_server():
    pytest.importorskip("jupyter_client")
    tokenizer, _ = demo()
    model = scripted(tokenizer, interpreter_reply, context=2048)
    with live_server(model, tokenizer, names=["m"], agent=create_agent(interpreter=True, max_kernels=4)) as served:
        yield served


def test_interpreter_mode_runs_code_and_shows_it(page, interpreter_server):
    url, app = interpreter_server
    open_mode(page, url, "interpreter")
    ask(page, "what is 123 * 457?")
    answer = last_answer(page, 0)
    code = answer.locator(".block.code")
    assert code.get_attribute("open") is not None and code.locator("code.language-python").inner_text() == \
        "print(123 * 457)"
    assert code.locator("span.tok-call").inner_text() == "print" and code.locator("span.tok-number").count() == 2
    assert answer.locator(".block.result pre").inner_text() == "56211"  # the model reads it in a ```result block
    assert answer.locator(".text").inner_text() == "The result is 56211"

    ask(page, "plot")
    figure = last_answer(page, 1).locator(".block.result img.figure")
    figure.wait_for()
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 100", figure.element_handle())


def test_one_kernel_per_browser_conversation_freed_on_clear(browser, interpreter_server):
    url, app = interpreter_server
    kernels = app.state.agent.kernels
    first, second = browser.new_page(), browser.new_page()
    try:
        for p in (first, second):
            p.set_default_timeout(30_000)
            open_mode(p, url, "interpreter")
        ask(first, "set x")
        last_answer(first, 0)
        ask(second, "show x")  # another conversation, another kernel: x is not defined there
        assert "NameError" in last_answer(second, 0).locator(".block.result.error pre").inner_text()
        ask(first, "show x")
        assert last_answer(first, 1).locator(".block.result pre").inner_text() == "41"
        ids = [p.evaluate("conversation") for p in (first, second)]
        assert ids[0] != ids[1] and all(i in kernels for i in ids)

        first.click("#clear")  # frees the kernel, and the next message starts a new conversation
        assert wait_until(lambda: ids[0] not in kernels) and ids[1] in kernels
        assert first.evaluate("conversation") != ids[0]
        second.click("#modes button[data-mode=chat]")  # leaving the mode ends the conversation too
        assert wait_until(lambda: ids[1] not in kernels)
    finally:
        first.close()
        second.close()
