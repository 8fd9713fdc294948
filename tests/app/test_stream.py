import threading
import time

import pytest

from app.stream import batches
from mobiquant import BudgetControl


def _slow_steps(control, n, delay, started=None):
    if started is not None:
        started.set()
    for i in range(n):
        if control.stop:
            return
        time.sleep(delay)
        yield i


def test_every_step_arrives_once_in_order_and_batches_are_spaced():
    control = BudgetControl(4.0)
    got, times, t0 = [], [], time.perf_counter()
    for batch in batches(lambda: _slow_steps(control, 30, 0.01), control, every_s=0.05):
        assert batch
        got += batch
        times.append(time.perf_counter())
    assert got == list(range(30))
    assert 1 < len(times) < 30  # batched, not one update per step
    assert len(times) <= (times[-1] - t0) / 0.05 + 2  # at most one batch per 0.05 s after the first
    assert control.stop is False  # a generation that ran to its end was not stopped


def test_the_first_step_is_handed_over_at_once():
    control = BudgetControl(4.0)
    t0 = time.perf_counter()
    first = next(iter(batches(lambda: _slow_steps(control, 3, 0.02), control, every_s=10.0)))
    assert first == [0] and time.perf_counter() - t0 < 5.0


def test_a_producer_error_is_raised_in_the_consumer():
    def failing():
        yield 1
        raise ValueError("boom")

    control = BudgetControl(4.0)
    with pytest.raises(ValueError, match="boom"):
        for _ in batches(failing, control, every_s=0.0):
            pass
    assert control.stop is True


def test_closing_the_consumer_stops_the_producer():
    control, started = BudgetControl(4.0), threading.Event()
    produced = []

    def steps():
        for i in _slow_steps(control, 10_000, 0.001, started):
            produced.append(i)
            yield i

    gen = batches(steps, control, every_s=0.01)
    next(gen)
    gen.close()  # the tab closed
    assert control.stop is True
    time.sleep(0.1)
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n < 10_000  # the producer has ended
