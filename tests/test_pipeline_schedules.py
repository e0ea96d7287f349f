"""Pipeline schedules as data (parallel/pipeline/schedules.py) against Table 2 of the report:
bubbles and peak activations from the simulator equal the table's formulas."""

import dataclasses

import pytest

from dsv3_jax.parallel.pipeline.schedules import (SCHEDULES, Costs, Op, make_schedule, peak_activations, simulate)

SHAPES = [(4, 8), (4, 12), (6, 24), (8, 16), (8, 20)]


def _bubble(name, P, n, costs):
    timeline = simulate(make_schedule(name, P, n), costs)
    return max(timeline.bubble(r) for r in range(P))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("P,n", SHAPES)
def test_every_schedule_runs_each_chunk_once_on_its_rank(name, P, n):
    schedule = make_schedule(name, P, n)
    timeline = simulate(schedule)  # raises on a missing / duplicated / misplaced chunk or a deadlock
    assert timeline.makespan > 0
    assert sum(op.kind in ("F",) for ops in schedule.ranks for op in ops) == n * schedule.n_stages


@pytest.mark.parametrize("P,n", SHAPES)
@pytest.mark.parametrize("costs", [Costs(1, 2, 1), Costs(1, 3, 1), Costs(2, 3, 1), Costs(1, 2, 0.5),
                                   Costs(1, 2, 1, FB=2.0), Costs(1, 2, 1, FB=2.5), Costs(2, 4, 2, FB=5.0)])
def test_bubbles_match_table_2(P, n, costs):
    """Chunks run back to back (F&B = F + B), or overlapped at the usual ratio B = 2F, W = F.
    (At other ratios overlapped pairs shorten the critical path more than the formula counts.)"""
    # 1F1B (and GPipe): (PP - 1)(F + B), B the full backward.
    assert _bubble("1f1b", P, n, costs) == (P - 1) * (costs.F + costs.B)
    assert _bubble("gpipe", P, n, costs) == (P - 1) * (costs.F + costs.B)
    # ZB1P: (PP - 1)(F + B - 2W).
    assert _bubble("zb1p", P, n, costs) == pytest.approx((P - 1) * (costs.F + costs.B - 2 * costs.W))
    # DualPipe: (PP/2 - 1)(F&B + B - 3W).
    f_and_b = costs.F + costs.B if costs.FB is None else costs.FB
    assert _bubble("dualpipe", P, n, costs) == pytest.approx((P / 2 - 1) * (f_and_b + costs.B - 3 * costs.W))
    # DualPipeV: DualPipe of 2P ranks folded onto P, in chunks of half a stage.
    assert _bubble("dualpipev", P, n, costs) == pytest.approx((P - 1) * (f_and_b + costs.B - 3 * costs.W))


def test_dualpipe_bubble_and_memory_do_not_grow_with_micro_batches():
    bubbles = {n: _bubble("dualpipe", 8, n, Costs()) for n in (16, 20, 40, 64)}
    assert len(set(bubbles.values())) == 1
    assert {tuple(peak_activations(make_schedule("dualpipe", 8, n))) for n in (16, 40, 64)} == {(9,) * 8}


@pytest.mark.parametrize("P,n", SHAPES)
def test_peak_activations_match_table_2(P, n):
    assert max(peak_activations(make_schedule("1f1b", P, n))) == P
    assert max(peak_activations(make_schedule("gpipe", P, n))) == n
    assert max(peak_activations(make_schedule("zb1p", P, n))) == P
    assert max(peak_activations(make_schedule("dualpipe", P, n))) == P + 1  # PP + 1
    assert max(peak_activations(make_schedule("dualpipev", P, n))) == 2 * P + 1  # half-size chunks


def test_malformed_schedules_are_refused():
    good = make_schedule("1f1b", 4, 8)
    missing = dataclasses.replace(good, ranks=(good.ranks[0][:-1],) + good.ranks[1:])
    with pytest.raises(ValueError, match="missing or extra"):
        simulate(missing)
    # Rank 3 (the last stage) waiting for a backward before running any forward can never start.
    stuck = dataclasses.replace(good, ranks=good.ranks[:3] + ((Op("B", 0, 3),) + tuple(
        op for op in good.ranks[3] if op != Op("B", 0, 3)),))
    with pytest.raises(ValueError, match="deadlock"):
        simulate(stuck)
    with pytest.raises(ValueError, match="even number"):
        make_schedule("dualpipe", 4, 9)
    with pytest.raises(ValueError, match="must be one of"):
        make_schedule("zb", 4, 8)
