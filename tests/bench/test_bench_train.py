# chatglm.bench.train times the demo trainer's step both ways on real demo batches (the figures are the README's;
# here only that it runs and reports consistently).
from chatglm.bench.train import measure


def test_reports_both_paths_and_the_projection():
    r = measure(steps=2, threads=1, conversations=200)
    assert r["ms_per_step"] > 0 and r["reference_ms_per_step"] > 0 and r["tokens_per_s"] > 0
    assert abs(r["reference_over_fast"] - r["reference_ms_per_step"] / r["ms_per_step"]) < 0.01
    assert abs(r["demo_train_minutes_at_this_speed"] - r["ms_per_step"] * r["demo_train_steps"] / 60_000) < 0.1
