# chatglm.bench.agent splits a turn's time into the tool's and the model's, against a scripted model.
import time
from typing import Annotated

from chatglm.auto import AutoTokenizer
from chatglm.bench.agent import turn
from chatglm.chat import chat_format
from chatglm.chat.tools import ToolRegistry
from chatglm.demo import DEMO_MODEL

V3 = chat_format("chatglm3")


class Scripted:
    family = "chatglm3"

    def __init__(self, outputs):
        self.outputs = list(outputs)

    def chat(self, tokenizer, query, history=None, role="user", **gen):
        time.sleep(0.02)
        return V3.respond(self.outputs.pop(0), (history or []) + [{"role": role, "content": query}], query)


def slow_weather(city: Annotated[str, "the city"]) -> dict:
    """Weather of a city."""
    time.sleep(0.2)
    return {"city": city, "temperature": 8}


def test_turn_splits_tool_time_from_model_time():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = Scripted(["slow_weather\n```python\ntool_call(city='Paris')\n```", "8 °C in Paris."])
    r = turn(model, tokenizer, "Weather in Paris?", tools=ToolRegistry([slow_weather]))
    assert r["rounds"] == 2 and r["answer"] == "8 °C in Paris."
    assert 200 <= r["call_ms"] < 1000 and 40 <= r["model_ms"] < r["total_ms"]
    assert abs(r["total_ms"] - r["call_ms"] - r["model_ms"]) < 1e-6
