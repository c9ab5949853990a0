"""The monitor's widgets alone: value labels that fit their tile, the profiler's sparklines."""

from __future__ import annotations

from tui_helpers import T0


def test_value_labels_fit_their_tile():
    from tui.widgets.charts import value_label

    for width in (32, 26, 20, 14, 9):
        for v, c in ((0.09734512, 0.1), (0.1352, 0.1), (-1.234e-05, 0.1), (float("nan"), 0.1)):
            t = value_label("kl", v, "kl_target", c, "ok", width)
            assert t.cell_len <= width, (width, t.plain)
            assert t.plain.startswith(
                ("0.09735", "0.1352", "-1.23e-05", "NaN")[(0.09734512, 0.1352, -1.234e-05).index(v)]
                if v == v
                else "NaN"
            ), t.plain
    assert value_label("kl", 0.09734512, "kl_target", 0.1, "ok", 32).plain == "0.09735 nats  kl_target 0.1"
    assert value_label("kl", 0.1352, "kl_target", 0.1, "ok", 40).plain == "0.1352 nats/token  kl_target 0.1"
    assert value_label("kl", 0.09734512, "kl_target", 0.1, "ok", 20).plain == "0.09735  target 0.1"
    assert "⚠" in value_label("kl", float("inf"), "kl_target", 0.1, "critical", 32).plain
    assert value_label("tokens_per_second", 4261.0, None, None, "ok", 32).plain == "4,261 tokens/s"


def test_profiler_sparklines_show_how_the_shares_moved():
    from protocol.catalogue import STAGES
    from tui.store import RunStore
    from tui.widgets.panels import share_sparklines

    store = RunStore()
    recs = []
    for step in range(1, 1001):  # rollout's share grows from 20% to 60% over the run
        roll = 0.2 + 0.4 * step / 1000
        st = dict.fromkeys(STAGES, (1 - roll) / (len(STAGES) - 1))
        st["rollout"] = roll
        recs.append({"step": step, "time": T0 + step, "stage_s": st})
    store.extend(RunStore.columnize(recs))
    sparks = share_sparklines(store, 20)
    line, rng = sparks["rollout"]
    assert len(line) == 20
    assert line[0] == "▁" and line[-1] == "█" and list(line) == sorted(line), line
    assert rng == "21–59%"  # the first and last slices' means
    other, orng = sparks["reward"]
    assert other[0] == "█" and other[-1] == "▁", other  # the others' shares shrank
    # a short run: one column per step
    short = RunStore()
    short.extend(RunStore.columnize(recs[:5]))
    assert len(share_sparklines(short, 20)["rollout"][0]) == 5
