# bench/accuracy.py on random weights of a config: the report `chatglm quantize --random` prints.
import pytest

from chatglm.bench.accuracy import random_accuracy
from conftest import GOLDEN, needs_shared


@needs_shared
@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.3)])
def test_random_accuracy_of_a_config(bits, bound):
    r = random_accuracy(GOLDEN / "chatglm3-6b-tiny" / "config.json", bits, layers=1, tokens=16)
    assert 0.0 <= r["top1_agreement"] <= 1.0
    assert 0.0 < r["relative_logit_error"] < bound  # int8 rounds each weight to 1/254 of its row's range
