"""The float16 exception monitor: events, first offending op, headroom ranking,
JSON and table output, and the unmonitored path."""

import json
import math

import numpy as np
import pytest

from refsd import ops
from refsd.context import current_path, location, scope
from refsd.monitor import EVENT_KINDS, Monitor, active_monitor, headroom, monitoring
from refsd.numerics import FP16_MAX, precision


def f32(*v):
    return np.array(v, np.float32)


def run(fn, mode="f32_f16", ftz=False, path="m"):
    with monitoring() as mon, precision(mode, ftz=ftz), scope(path):
        y = fn()
    return mon.report(), y


def kinds(report, severe=None):
    return [(e.kind, e.op, e.primitive) for e in report.events if severe is None or e.severe == severe]


# ------------------------------------------------------------------ events


def test_overflow_when_a_finite_value_rounds_to_inf():
    rep, y = run(lambda: ops.scale(f32(1.0, 40000.0, -50000.0), factor=2.0))
    assert kinds(rep) == [("overflow", "scale", "output")]
    ev = rep.events[0]
    assert ev.count == 2 and ev.severe and ev.path == "m"
    assert np.isinf(y[1:]).all()
    assert rep.counts["overflow"] == 2 and not rep.clean


def test_overflow_boundary_is_65520():
    rep, _ = run(lambda: ops.scale(f32(65519.0, 65504.0), factor=1.0))
    assert rep.clean and not rep.has("overflow")
    rep, _ = run(lambda: ops.scale(f32(65520.0), factor=1.0))
    assert rep.has("overflow")  # at the input already: 65520 is not an fp16 value
    assert rep.first.primitive == "input"


def test_overflow_in_f32_math_is_an_inf_computed_from_finite_inputs():
    rep, y = run(lambda: ops.mul(f32(1e30), f32(1e30)), mode="f32")
    assert kinds(rep) == [("overflow", "mul", "output")]
    assert "inf computed from finite inputs" in rep.first.detail


def test_overflow_inside_an_unfused_op_is_named_by_primitive():
    rep, _ = run(lambda: ops.gelu(f32(1.0, 45.0), approximate="tanh"), mode="f16")
    assert rep.first.kind == "overflow" and rep.first.primitive == "pow3" and rep.first.op == "gelu"


def test_invalid_nan_from_nan_free_inputs():
    x = np.zeros((1, 2, 2, 4), np.float32)  # a constant group: var = 0
    rep, y = run(lambda: ops.group_norm(x, num_groups=2, eps=1e-5), ftz=True)
    assert np.isnan(y).all()
    assert ("invalid", "group_norm", "output") in kinds(rep, severe=True)
    assert rep.has("invalid")


def test_invalid_is_reported_after_an_inf_in_the_same_op():
    """rsqrt(0) = inf, then 0 * inf = NaN: both are reported, in order."""
    x = np.zeros((1, 2, 2, 4), np.float32)
    rep, _ = run(lambda: ops.group_norm(x, num_groups=2, eps=1e-5), mode="f16", ftz=True)
    assert kinds(rep, severe=True) == [
        ("constant", "group_norm", "eps"), ("overflow", "group_norm", "rsqrt"), ("invalid", "group_norm", "normalize"),
    ]


def test_inf_carried_by_a_constant_is_not_a_new_overflow():
    """A -1e9 mask is a constant event; the -inf scores it makes are its
    consequence, the NaN of a fully masked row is invalid."""
    q = k = v = np.ones((1, 2, 4), np.float32)
    mask = np.full((1, 1, 2, 2), -1e9, np.float32)
    rep, _ = run(lambda: ops.attention(q, k, v, mask=mask))
    assert kinds(rep, severe=True) == [("constant", "attention", "mask"), ("invalid", "attention", "probs")]


def test_propagated_when_inputs_hold_inf_or_nan():
    rep, y = run(lambda: ops.silu(f32(1.0, np.nan, np.inf)))
    assert kinds(rep) == [("propagated", "silu", "input")]
    assert not rep.events[0].severe and rep.clean
    assert rep.counts["propagated"] == 1 and not rep.has("invalid")
    # The next op gets a known non-finite tensor: propagated again, nothing severe.
    with monitoring() as mon, precision("f32_f16"):
        ops.add(y, y)
    assert kinds(mon.report()) == [("propagated", "add", "output")]


def test_propagated_inf_making_nan_is_not_invalid():
    rep, _ = run(lambda: ops.add(f32(np.inf), f32(-np.inf)), mode="f32")
    assert kinds(rep) == [("propagated", "add", "output")]


def test_underflow_to_zero_and_to_subnormal():
    x = f32(1e-8, -1e-8, 1e-6, 3e-7, 1.0, 0.0)
    rep, y = run(lambda: ops.scale(x, factor=1.0))
    at_input = {e.detail: e for e in rep.events if e.primitive == "input"}
    assert at_input["non-zero to zero"].count == 2 and at_input["non-zero to zero"].kind == "underflow"
    assert at_input["non-zero to subnormal"].count == 2
    assert all(e.kind == "underflow" and not e.severe for e in rep.events) and rep.clean
    assert y[0] == 0 and y[2] != 0
    # The output still holds the two subnormals (zero on FTZ hardware): reported again there.
    assert [(e.primitive, e.detail, e.count) for e in rep.events if e.primitive == "output"] == [
        ("output", "non-zero to subnormal", 2)]


def test_ftz_flushes_subnormals_to_zero():
    rep, y = run(lambda: ops.scale(f32(1e-6, 3e-7), factor=1.0), ftz=True)
    assert [(e.kind, e.detail, e.count) for e in rep.events] == [("underflow", "non-zero to zero", 2)]
    assert (y == 0).all()


@pytest.mark.parametrize(
    "factor, detail, severe",
    [(1e-8, "flushes to zero", True), (1e-6, "is subnormal", False), (1e5, "overflows fp16", True)],
)
def test_constant_events(factor, detail, severe):
    rep, _ = run(lambda: ops.scale(f32(1.0), factor=factor))
    const = [e for e in rep.events if e.kind == "constant"]
    assert len(const) == 1
    assert detail in const[0].detail and const[0].severe is severe
    assert const[0].primitive == "factor" and f"factor={factor:g}" in const[0].detail


def test_eps_1e5_is_subnormal_but_survives_without_ftz():
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 8)).astype(np.float32)
    rep, _ = run(lambda: ops.group_norm(x, num_groups=2, eps=1e-5))
    const = [e for e in rep.events if e.kind == "constant"]
    assert len(const) == 1 and not const[0].severe and rep.clean
    rep, _ = run(lambda: ops.group_norm(x, num_groups=2, eps=1e-5), ftz=True)
    assert rep.first.kind == "constant" and rep.first.severe and rep.first.primitive == "eps"


def test_f32_mode_reports_no_rounding_events():
    rep, _ = run(lambda: ops.scale(f32(1e-8, 1e5), factor=1e-8), mode="f32")
    assert rep.events == [] and rep.clean


def test_event_kinds_are_the_documented_six():
    assert EVENT_KINDS == ("overflow", "invalid", "propagated", "underflow", "constant", "precision")


# ------------------------------------------------------------------ the report


def _pipeline():
    """Two steps of a little model: the overflow happens at step 1 only."""
    x = f32(0.5, -1.0, 1.5)
    for step, big in ((0, 100.0), (1, 40000.0)):
        with location(stage="unet", step=step):
            with scope("unet.down_blocks.0.resnets.0"):
                h = ops.scale(x, factor=1e-6)  # subnormal constant: a warning, not severe
                h = ops.scale(x, factor=big)
            with scope("unet.mid_block.attentions.0"):
                ops.add(h, h)  # 2 * 40000 overflows at step 1


def test_first_offending_op_with_stage_and_step():
    with monitoring() as mon, precision("f32_f16"):
        _pipeline()
    rep = mon.report()
    first = rep.first
    assert first.severe and first.kind == "overflow"
    assert (first.stage, first.step, first.path, first.op) == ("unet", 1, "unet.mid_block.attentions.0", "add")
    assert first.where() == "unet:unet.mid_block.attentions.0 @step 1"
    # Earlier non-severe events do not count as offending.
    assert rep.events[0].kind == "constant" and not rep.events[0].severe
    assert rep.events[0].seq < first.seq


def test_first_event_is_reported_when_nothing_is_severe():
    rep, _ = run(lambda: ops.scale(f32(1e-6), factor=1.0))
    assert rep.clean and rep.first is not None and not rep.first.severe
    assert rep.table().startswith("first event (no severe events)")


def test_closest_to_overflow_ranking():
    with monitoring() as mon, precision("f32_f16"):
        for name, v in (("small", 1.0), ("big", 30000.0), ("mid", 1000.0), ("tiny", 0.001)):
            with scope(name):
                ops.scale(f32(v), factor=1.0)
    rep = mon.report(top=3)
    assert [s.path for s in rep.closest] == ["big", "mid", "small"]
    heads = [s.headroom for s in rep.closest]
    assert heads == sorted(heads)
    assert rep.closest[0].headroom == pytest.approx(math.log2(FP16_MAX / 30000.0))
    assert rep.n_ops == 4


def test_closest_ranks_inf_and_nan_first_and_keeps_worst_step():
    with monitoring() as mon, precision("f32_f16"):
        for step, v in enumerate((10.0, 5000.0, 20.0)):
            with location("unet", step), scope("a"):
                ops.scale(f32(v), factor=1.0)
        with scope("b"):
            ops.scale(f32(60000.0), factor=2.0)  # inf
    rep = mon.report()
    assert rep.closest[0].path == "b" and rep.closest[0].headroom == -math.inf
    a = next(s for s in rep.closest if s.path == "a")
    assert a.calls == 3 and a.worst_step == 1 and a.max_abs == 5000.0


def test_headroom_values():
    assert headroom(FP16_MAX) == 0.0
    assert headroom(1.0) == pytest.approx(math.log2(65504.0))
    assert headroom(2 * FP16_MAX) == pytest.approx(-1.0)
    assert headroom(0.0) == math.inf
    assert headroom(math.inf) == -math.inf and headroom(math.nan) == -math.inf


def test_headroom_is_negative_in_f32_for_values_past_fp16():
    rep, _ = run(lambda: ops.scale(f32(131008.0), factor=1.0), mode="f32")
    assert rep.clean  # f32 has no fp16 events...
    assert rep.closest[0].headroom == pytest.approx(-1.0)  # ...but headroom says it would overflow


def test_repeated_calls_aggregate_into_one_event_row():
    with monitoring() as mon, precision("f32_f16"), scope("loop"):
        for _ in range(5):
            ops.scale(f32(40000.0, 50000.0), factor=2.0)
    rep = mon.report()
    assert len(rep.events) == 1 and rep.events[0].count == 10
    assert rep.closest[0].calls == 5


def test_max_events_drops_and_counts():
    mon = Monitor(max_events=2)
    with monitoring(mon), precision("f32_f16"):
        for i in range(4):
            with scope(f"op{i}"):
                ops.scale(f32(40000.0), factor=2.0)
    rep = mon.report()
    assert len(rep.events) == 2 and rep.dropped_events == 2
    assert rep.to_dict()["dropped_events"] == 2


def test_json_round_trip():
    with monitoring() as mon, precision("f32_f16"):
        _pipeline()
        with scope("nan"):
            ops.silu(f32(np.nan))
    rep = mon.report()
    text = rep.to_json()
    back = json.loads(text)
    assert back == json.loads(json.dumps(rep.to_dict()))
    assert back["clean"] is False
    assert back["first_offending"]["path"] == "unet.mid_block.attentions.0"
    assert back["first_offending"]["step"] == 1 and back["first_offending"]["stage"] == "unet"
    assert back["first_offending"]["where"] == "unet:unet.mid_block.attentions.0 @step 1"
    assert set(back["counts"]) == set(EVENT_KINDS)
    assert len(back["events"]) == len(rep.events)
    # Non-finite magnitudes are strings, so the JSON is strict.
    heads = [c["headroom_bits"] for c in back["closest_to_overflow"]]
    assert "-inf" in heads
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_table_names_the_first_offending_path():
    with monitoring() as mon, precision("f32_f16"):
        _pipeline()
    text = mon.report().table()
    first_line = text.splitlines()[0]
    assert first_line.startswith("first offending op: unet:unet.mid_block.attentions.0 @step 1")
    assert "op=add" in first_line and "overflow" in first_line
    assert "closest to overflow" in text
    for k in EVENT_KINDS:
        assert k in text


def test_clean_run_table():
    rep, _ = run(lambda: ops.scale(f32(1.0), factor=2.0))
    assert rep.clean and rep.first is None
    assert rep.table().startswith("no float16 events in 1 ops")


# ------------------------------------------------------------------ monitor off


@pytest.mark.parametrize("mode", ["f32", "f32_f16", "f16"])
def test_monitor_off_gives_identical_results(mode):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 4, 8)) * 3).astype(np.float32)
    x[0, 0, 0, 0] = 50.0

    def body():
        h = ops.group_norm(x, num_groups=2)
        h = ops.gelu(ops.scale(h, factor=20.0), approximate="tanh")
        return ops.silu(h)

    assert active_monitor() is None
    with precision(mode):
        off = body()
    with monitoring() as mon, precision(mode):
        on = body()
    assert active_monitor() is None  # uninstalled again
    np.testing.assert_array_equal(off.view(np.uint32), on.view(np.uint32))
    assert mon.report().n_ops == 4
    assert not off.flags.writeable  # outputs are read-only either way


def test_no_monitor_no_events_and_no_warnings():
    with precision("f16"), np.errstate(all="raise"):  # ops must not warn or raise on inf/NaN
        y = ops.gelu(f32(100.0, -100.0), approximate="tanh")
        z = ops.group_norm(np.zeros((1, 1, 1, 2), np.float32), num_groups=1, eps=1e-5)
    assert np.isfinite(y).all() and z.shape == (1, 1, 1, 2)


def test_scopes_and_locations_nest_and_reset():
    assert current_path() == ""
    with scope("unet"), scope("mid_block.attentions.0"), scope(""):
        assert current_path() == "unet.mid_block.attentions.0"
    assert current_path() == ""
    with monitoring() as mon, location("vae", 7), precision("f32_f16"):
        with location("unet", 2):
            ops.scale(f32(70000.0), factor=1.0)
        ops.scale(f32(80000.0), factor=1.0)
    evs = mon.report().events
    assert [(e.stage, e.step) for e in evs] == [("unet", 2), ("vae", 7)]
