"""A running request stops after the first step past its deadline, and
sooner, once its steps' pace shows they cannot finish before it
(config.DEADLINE_SLACK): the pace arithmetic, then both optimization loops
and a batch on a fake clock that advances only when told to."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import nst.optimize as optimize
from nst.config import DEADLINE_SLACK, DEADLINE_SLACK_S, LAST_STEP_OVERRUN_S, Params
from nst.optimize import (SETUP_STEPS, BudgetExceeded, Pace, Result, Row, WouldExceedBudget, check_deadline, pace_at,
                          stylize, stylize_batch)

F32, BF16 = torch.float32, torch.bfloat16


def test_the_pace_runs_from_the_first_record_of_the_current_dtype():
    pace, per_step = pace_at(None, BF16, 10, 100.0)
    assert pace == Pace(BF16, 10, 100.0) and per_step is None  # the stretch up to it held the slow first step
    pace, per_step = pace_at(pace, BF16, 20, 101.0)
    assert pace == Pace(BF16, 10, 100.0) and per_step == pytest.approx(0.1)
    pace, per_step = pace_at(pace, BF16, 30, 103.0)
    assert per_step == pytest.approx(0.15)  # everything since that record, not the latest stretch alone
    pace, per_step = pace_at(pace, F32, 40, 110.0)  # this stretch held the first float32 step
    assert pace == Pace(F32, 40, 110.0) and per_step is None
    pace, per_step = pace_at(pace, F32, 50, 112.0)
    assert per_step == pytest.approx(0.2)


def test_a_passed_deadline_is_the_plain_budget_exceeded():
    with pytest.raises(BudgetExceeded) as e:
        check_deadline(100.0, 5, 10, 100.5, per_step=0.01)
    assert type(e.value) is BudgetExceeded and str(e.value) == "time budget ran out after 5 of 10 steps"
    check_deadline(100.0, 10, 10, 200.0)  # the last step is done: nothing left to stop
    check_deadline(None, 5, 10, 1e9, per_step=1e9)  # no deadline
    check_deadline(100.0, 5, 1000, 50.0)  # no pace measured yet: only the deadline itself


def test_steps_that_cannot_finish_stop_with_what_would_fit():
    with pytest.raises(WouldExceedBudget) as e:
        check_deadline(100.0, 20, 100, 60.0, per_step=1.0)
    assert str(e.value) == ("stopped after 20 of 100 steps: at 1.0 s per step the 80 left would take about 80 s, "
                            "and 40 s is left (about 40 more steps would fit)")
    with pytest.raises(WouldExceedBudget, match=r"at 50 ms per step the 999 left would take about 50 s, and "
                                                r"20 ms is left \(about 0 more steps would fit\)"):
        check_deadline(100.0, 1, 1000, 99.98, per_step=0.05)


@pytest.mark.parametrize("left", [40.0, 0.5])
def test_the_slack_keeps_close_calls_running(left):
    """Stopped only when the steps left need more than DEADLINE_SLACK times
    the time left and DEADLINE_SLACK_S more than it: at 40 s left the ratio
    decides, at 0.5 s the seconds do."""
    bound = max(DEADLINE_SLACK * left, left + DEADLINE_SLACK_S)  # the most the 50 steps left may need
    check_deadline(100.0, 50, 100, 100.0 - left, per_step=bound * 0.99 / 50)
    with pytest.raises(WouldExceedBudget):
        check_deadline(100.0, 50, 100, 100.0 - left, per_step=bound * 1.01 / 50)


class Clock:
    """time.monotonic for nst.optimize: stands still until advanced, so a
    step's pace is exactly what a test says it is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(optimize, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def _images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 24, 32, generator=gen), torch.rand(1, 3, 24, 32, generator=gen)


def _seconds_per_record(clock: Clock, seconds: float):
    """A progress callback that advances the clock by `seconds` at each
    record: the time the steps up to the next record take."""
    calls = []

    def callback(p):
        calls.append(p.step)
        clock.now += seconds

    return callback, calls


def _slow_steps(monkeypatch, clock: Clock, seconds_of) -> None:
    """The n-th step's loss (from 1) advances the clock by seconds_of(n)."""
    calls = []
    for name in ("pixels_loss", "input_loss"):
        real = getattr(optimize, name)

        def slow(*args, real=real):
            calls.append(None)
            clock.now += seconds_of(len(calls))
            return real(*args)

        monkeypatch.setattr(optimize, name, slow)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_request_that_cannot_finish_stops_at_the_second_record(vgg, clock, optimizer):
    """1 s per step, 40 steps, 25 s to the deadline: at step 20 the 20 steps
    left need 20 s and 5 s are left. It stops there, before its deadline."""
    content, style = _images(1)
    callback, calls = _seconds_per_record(clock, 10.0)
    with pytest.raises(WouldExceedBudget, match="stopped after 20 of 40 steps: at 1.0 s per step"):
        stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40, optimizer=optimizer),
                callback=callback, deadline=clock.now + 25, progress_every=10)
    assert calls == [10, 20] and clock.now < 1000.0 + 25


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_request_that_can_finish_runs_to_its_end(vgg, clock, optimizer):
    content, style = _images(2)
    callback, calls = _seconds_per_record(clock, 10.0)
    result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40, optimizer=optimizer),
                     callback=callback, deadline=clock.now + 45, progress_every=10)
    assert result.steps == 40 and calls == [10, 20, 30, 40]


def test_a_slow_first_step_is_not_the_pace(vgg, clock, monkeypatch):
    """200 s in the first step (a worker's first request: set-up, capture),
    then 1 s per step: at step 20 the 20 steps left need 20 s with 25 s left,
    so it runs on. Measured from the start, the pace would have been 10.5 s
    per step."""
    _slow_steps(monkeypatch, clock, lambda n: 200.0 if n == 1 else 0.0)
    content, style = _images(3)
    callback, calls = _seconds_per_record(clock, 10.0)
    result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40),
                     callback=callback, deadline=clock.now + 245, progress_every=10)
    assert result.steps == 40 and calls == [10, 20, 30, 40]


def test_each_row_of_a_batch_is_held_to_its_own_deadline(vgg, clock):
    callback, calls = _seconds_per_record(clock, 10.0)  # row 1's records alone advance the clock
    (c0, s0), (c1, s1) = _images(4), _images(5)
    forty = dataclasses.replace(Params(), steps=40)
    short, ok = stylize_batch(vgg, [Row(c0, [s0], forty, deadline=clock.now + 25),
                                    Row(c1, [s1], forty, callback=callback, deadline=clock.now + 45)],
                              progress_every=10)
    assert isinstance(short, WouldExceedBudget) and "stopped after 20 of 40 steps" in str(short)
    assert isinstance(ok, Result) and ok.steps == 40 and calls == [10, 20, 30, 40]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_the_deadline_is_checked_after_every_step_not_only_at_records(vgg, clock, monkeypatch, optimizer):
    """Two quick steps, then one of 300 s that nothing foresaw, records every
    10 steps, 250 s to the deadline: it ends after step 3, the first step
    past the deadline. Held only at records it would have run on to step 10:
    on a CPU ten steps can take minutes, and TorchServe kills a worker that
    answers past responseTimeout, only RESPONSE_MARGIN_S after the budget."""
    content, style = _images(6)
    _slow_steps(monkeypatch, clock, lambda n: 300.0 if n == 3 else 0.0)
    seen = []
    with pytest.raises(BudgetExceeded) as e:
        stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40, optimizer=optimizer),
                callback=seen.append, deadline=clock.now + 250, progress_every=10)
    assert type(e.value) is BudgetExceeded and str(e.value) == "time budget ran out after 3 of 40 steps"
    assert seen == [] and clock.now == 1000.0 + 300


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_step_that_would_end_past_the_deadline_is_not_started(vgg, clock, monkeypatch, optimizer):
    """100 s steps, 350 s to the deadline: after step 3 (the first that
    counts: SETUP_STEPS) the next step would end 50 s past it, and more
    steps would follow it, so it is not started: a step can outlast the
    whole RESPONSE_MARGIN_S (a CPU batch at 1024 px)."""
    assert SETUP_STEPS == 2
    content, style = _images(7)
    _slow_steps(monkeypatch, clock, lambda n: 100.0)
    with pytest.raises(WouldExceedBudget) as e:
        stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40, optimizer=optimizer),
                deadline=clock.now + 350, progress_every=10)
    assert str(e.value) == ("stopped after 3 of 40 steps: the next step, at least 100 s, would end past the "
                            "deadline (50 s away)")
    assert clock.now == 1000.0 + 300


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_on_a_cpu_a_record_comes_by_time_too(vgg, clock, monkeypatch, optimizer):
    """30 s steps, a record every 10 steps (300 s apart: past a proxy's idle
    timeout) or once 60 s passed since the last: records at steps 2, 4, 6,
    ... and the last, each row its own (a batch's rows record together)."""
    content, style = _images(12)
    _slow_steps(monkeypatch, clock, lambda n: 30.0)
    seen = []
    stylize(vgg, content, [style], dataclasses.replace(Params(), steps=11, optimizer=optimizer),
            callback=seen.append, progress_every=10, progress_every_s=60.0)
    assert [p.step for p in seen] == [2, 4, 6, 8, 10, 11]
    seen.clear()
    (c1, s1) = _images(13)
    rows = [Row(content, [style], dataclasses.replace(Params(), steps=5), callback=seen.append),
            Row(c1, [s1], dataclasses.replace(Params(), steps=5), callback=seen.append)]
    stylize_batch(vgg, rows, progress_every=10, progress_every_s=60.0)
    assert [p.step for p in seen] == [2, 2, 4, 4, 5, 5]
    seen.clear()
    stylize(vgg, content, [style], dataclasses.replace(Params(), steps=11, optimizer=optimizer),
            callback=seen.append, progress_every=10)  # no time: by steps alone
    assert [p.step for p in seen] == [10, 11]


def test_the_step_bound_is_the_current_dtypes_not_the_faster_ones(vgg, clock, monkeypatch):
    """On a CPU the first LOWP_STEPS run in bf16 (10 s here), the rest in
    float32 (100 s). Once float32 steps count (SETUP_STEPS of them set up),
    the next step is bounded by theirs: after step 8, 50 s before the
    deadline, step 9 is not started. A bound kept across dtypes stayed at the
    bf16 10 s, so step 9 started and ended 50 s past the deadline."""
    from nst.optimize import compute_dtype

    if compute_dtype(torch.device("cpu"), Params()) != torch.bfloat16:
        pytest.skip("this CPU runs no bf16 steps")
    monkeypatch.setattr(optimize, "LOWP_STEPS", 5)
    content, style = _images(11)
    _slow_steps(monkeypatch, clock, lambda n: 10.0 if n <= 5 else 100.0)
    with pytest.raises(WouldExceedBudget) as e:
        stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40),
                deadline=clock.now + 400, progress_every=10)
    assert str(e.value) == ("stopped after 8 of 40 steps: the next step, at least 100 s, would end past the "
                            "deadline (50 s away)")
    assert clock.now == 1000.0 + 350


@pytest.mark.parametrize("past, finishes", [(LAST_STEP_OVERRUN_S - 5, True), (LAST_STEP_OVERRUN_S + 5, False)])
def test_the_last_step_may_end_a_little_past_the_deadline(vgg, clock, monkeypatch, past, finishes):
    """The last step runs if it would end at most LAST_STEP_OVERRUN_S past
    the deadline: its image is the answer, and it leaves the rest of
    RESPONSE_MARGIN_S for scoring and encoding."""
    content, style = _images(8)
    _slow_steps(monkeypatch, clock, lambda n: 100.0)
    run = lambda: stylize(vgg, content, [style], dataclasses.replace(Params(), steps=4),  # noqa: E731
                          deadline=clock.now + 400 - past, progress_every=10)
    if finishes:
        assert run().steps == 4 and clock.now == 1000.0 + 400
        return
    with pytest.raises(WouldExceedBudget, match=f"stopped after 3 of 4 steps: the last step, at least 100 s, "
                                                f"would end past the deadline by more than {LAST_STEP_OVERRUN_S:g} s"):
        run()


def test_each_row_of_a_batch_is_stopped_at_the_step_its_deadline_passes(vgg, clock, monkeypatch):
    _slow_steps(monkeypatch, clock, lambda n: 300.0 if n == 3 else 0.0)
    (c0, s0), (c1, s1) = _images(9), _images(10)
    five = dataclasses.replace(Params(), steps=5)
    late, ok = stylize_batch(vgg, [Row(c0, [s0], five, deadline=clock.now + 250), Row(c1, [s1], five)],
                             progress_every=10)
    assert type(late) is BudgetExceeded and str(late) == "time budget ran out after 3 of 5 steps"
    assert isinstance(ok, Result) and ok.steps == 5
