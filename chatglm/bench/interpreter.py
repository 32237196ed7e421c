# The code interpreter's costs: kernel start (sandbox + ipykernel until it answers), per-cell overhead
# (a cell that does nothing, round trip included), matplotlib figures: the first in this process (imports and
# font list), the first in later kernels (font list cached), a later one in the same kernel.
# python -m chatglm.bench.interpreter   (prints one JSON line)
from __future__ import annotations

import json
import statistics
import time


def measure(*, starts: int = 5, cells: int = 200) -> dict:
    from ..chat.interpreter import CodeInterpreter

    start_s = []
    for _ in range(starts):
        t = time.perf_counter()
        k = CodeInterpreter()
        start_s.append(time.perf_counter() - t)
        if _ < starts - 1:
            k.close()
    with k:
        k.run("pass")
        cell_s = [k.run("pass").seconds for _ in range(cells)]
        expr_s = [k.run("1 + 1").seconds for _ in range(cells)]
        plot = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
        first_plot = k.run(plot).seconds
        later_plot = statistics.median(k.run(plot).seconds for _ in range(5))
        network = k.network
    with CodeInterpreter() as k:  # matplotlib's font list is now cached for new kernels
        first_plot_again = k.run(plot).seconds
    ms = lambda xs: round(1000 * xs, 1)  # noqa: E731
    return {
        "kernel_start_ms": {"first": ms(start_s[0]), "median": ms(statistics.median(start_s)), "min": ms(min(start_s))},
        "cell_overhead_ms": {"median": ms(statistics.median(cell_s)), "p90": ms(sorted(cell_s)[int(0.9 * cells)])},
        "expression_cell_ms": ms(statistics.median(expr_s)),
        "first_plot_ms": ms(first_plot), "first_plot_next_kernels_ms": ms(first_plot_again),
        "later_plot_ms": ms(later_plot),
        "network": network, "starts": starts, "cells": cells,
    }


if __name__ == "__main__":
    print(json.dumps(measure()))
