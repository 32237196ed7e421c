# The demo tools (chatglm/demo/tools.py) and the corpus conversations that teach the demo model to use them.
import inspect
import io
import json
import random
import re
from contextlib import redirect_stdout
from typing import Annotated, get_args, get_type_hints

import pytest

from chatglm.chat.tools import parse_tool_call
from chatglm.demo import corpus
from chatglm.demo import tools as demo_tools


@pytest.fixture(scope="module")
def convs():
    return corpus.conversations(seed=0)


@pytest.mark.parametrize("name", demo_tools.__all__)
def test_tools_are_plain_typed_functions(name):
    fn = getattr(demo_tools, name)
    assert inspect.getdoc(fn)
    hints = get_type_hints(fn, include_extras=True)
    for p in inspect.signature(fn).parameters:
        typ, desc = get_args(hints[p])  # Annotated[type, "description"]
        assert hints[p] == Annotated[typ, desc] and typ in (str, int, float) and desc


@pytest.mark.parametrize("city,expect", [("Paris", (8, "rainy")), ("paris", (8, "rainy")), ("北京", (3, "晴天")), ("上海", (12, "多云")),
                                         ("Xi'an", (4, "sunny"))])
def test_weather_comes_from_the_table(city, expect):  # in Chinese when asked by a Chinese name
    r = demo_tools.get_weather(city)
    assert (r["city"], r["temperature_c"], r["condition"]) == (city, *expect)


def test_weather_for_an_unknown_city_says_so():
    assert demo_tools.get_weather("Atlantis") == {"error": "no weather data for Atlantis"}


@pytest.mark.parametrize("value,a,b,result", [(10, "km", "mi", 6.2137), (10, "kilometers", "miles", 6.2137),
                                              (100, "摄氏度", "华氏度", 212.0), (32, "fahrenheit", "celsius", 0.0),
                                              (1, "gallon", "l", 3.7854), (2, "公斤", "磅", 4.4092)])
def test_convert_units(value, a, b, result):
    assert demo_tools.convert_units(value, a, b)["result"] == result


@pytest.mark.parametrize("a,b,message", [("km", "kg", "cannot convert length"), ("parsec", "km", "unknown unit"),
                                         ("km", "", "unknown unit")])
def test_convert_units_rejects(a, b, message):
    with pytest.raises(ValueError, match=message):
        demo_tools.convert_units(1, a, b)


def test_random_number_and_time():
    assert all(3 <= demo_tools.random_number(3, 5)["number"] <= 5 for _ in range(50))
    with pytest.raises(ValueError, match="greater than"):
        demo_tools.random_number(5, 3)
    t = demo_tools.get_current_time()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", t["date"]) and re.fullmatch(r"\d\d:\d\d", t["time"])


def test_tool_specs_describe_the_functions():
    specs = {s["name"]: s for s in corpus.demo_tool_specs()}
    assert list(specs) == demo_tools.__all__
    assert specs["get_weather"]["parameters"]["required"] == ["city"]
    assert specs["random_number"]["parameters"]["required"] == []
    assert specs["convert_units"]["parameters"]["properties"]["value"]["type"] == "number"


def test_corpus_is_deterministic():
    a, b = corpus.conversations(seed=0)[:300], corpus.conversations(seed=0)[:300]
    assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)


def test_corpus_tool_calls_are_what_the_tools_accept(convs):
    """Every call parses, names a tool of its system message and gives that function valid arguments; the
    answer after the observation repeats the number or city the observation holds."""
    n = 0
    for conv in convs:
        if "tools" not in conv[0]:
            continue
        names = {t["name"] for t in conv[0]["tools"]}
        for i, m in enumerate(conv):
            if m["role"] != "assistant" or not m.get("metadata"):
                continue
            args = parse_tool_call(m["content"].removeprefix("```python\n").removesuffix("\n```"))
            assert args is not None and m["metadata"] in names, m
            inspect.signature(getattr(demo_tools, m["metadata"])).bind(**args)
            obs, answer = json.loads(conv[i + 1]["content"]), conv[i + 2]["content"]
            key = next(k for k in ("result", "number", "time", "city", "error") if k in obs)
            assert str(obs[key]).split()[-1] in answer, (obs, answer)
            n += 1
    assert n > 2000


def test_corpus_code_prints_what_the_observation_says(convs):
    rng = random.Random(0)
    cells = [(c[i]["content"], c[i + 1]["content"], c[i + 2]["content"]) for c in convs for i, m in enumerate(c)
             if m.get("metadata") == "interpreter"]
    assert len(cells) > 3000
    for code, obs, answer in rng.sample(cells, 200):
        out = io.StringIO()
        with redirect_stdout(out):
            exec(code.removeprefix("```python\n").removesuffix("\n```"), {})  # the corpus's own code
        assert obs == f"```result\n{out.getvalue().strip()}\n```" and out.getvalue().strip() in answer


def test_corpus_has_long_conversations(convs):
    turns = [sum(m["role"] == "user" for m in c) for c in convs]
    assert sum(t >= 10 for t in turns) > 500 and max(turns) <= 13


def test_corpus_weather_observations_speak_the_tool_language(convs):
    """Observations look like the real tool's: conditions in Chinese exactly when the city is asked in Chinese."""
    n = 0
    for conv in convs:
        for i, m in enumerate(conv):
            if m.get("metadata") == "get_weather":
                obs = json.loads(conv[i + 1]["content"])
                if "condition" in obs:
                    zh = "\u4e00" <= obs["city"][0] <= "\u9fff"
                    assert obs["condition"] in (demo_tools.CONDITION_ZH.values() if zh else demo_tools.CONDITION_ZH)
                    assert conv[i + 1]["loss"] and obs["condition"] in conv[i + 2]["content"]
                    n += 1
    assert n > 1000


def test_corpus_drills_repeat_exactly_and_add_up(convs):
    echoes = [(c[i]["content"], c[i + 1]["content"]) for c in convs for i in range(0, len(c), 2)
              if re.match(r"(Repeat after me|Say this back to me|Please repeat|Copy this exactly|Echo|跟我说|请重复|"
                          r"照着说一遍|重复这句话)[:：]", c[i]["content"])]
    assert len(echoes) > 2500 and all(q.endswith(a) and re.search(r"[:：] ?" + re.escape(a) + "$", q)
                                      for q, a in echoes)
    sums = [re.search(r"(\d+) ?(\+|-|加|减) ?(\d+) ?(=|等于) ?(\d+)", m["content"]) for c in convs for m in c
            if m["role"] == "assistant" and not m.get("metadata")]
    sums = [x.groups() for x in sums if x]
    assert len(sums) > 6000
    assert all(int(c) == (int(a) + int(b) if op in "+加" else int(a) - int(b)) for a, op, b, _, c in sums)


def test_followups_ask_a_capital_after_other_questions():
    """The second phase's conversations: a capital question, one to three others (mostly not capitals), then a
    follow-up that names only another country, answered with its capital; made apart from conversations(), and
    the same every time."""
    follow = corpus.followups(seed=0)
    assert len(follow) == corpus.FOLLOWUPS and follow == corpus.followups(seed=0)
    answers = {a.format(c=c, city=city) for lang, a in corpus.CAPITAL_A.items()
               for c, city in [(x[0], x[1]) if lang == "en" else (x[2], x[3]) for x in corpus.CAPITALS]}
    for conv in follow:
        said = [m["content"] for m in conv if m["role"] == "assistant"]
        capitals = [i for i, a in enumerate(said) if a in answers]  # a question between may be a capital too
        first = capitals[0]  # after an optional greeting; the follow-up comes one to three answers later
        assert first <= 1 and any(i in capitals for i in range(first + 2, first + 5)), said
    assert not {json.dumps(c) for c in follow} & {json.dumps(c) for c in corpus.conversations(seed=0)}
