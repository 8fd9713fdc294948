import threading

import torch

import mobiquant
from mobiquant import MoBiQuantConfig, MoBiQuantLinear, precision


def test_context_nests_and_resets():
    assert mobiquant.current_precision() is None
    with precision(k=2):
        assert mobiquant.current_precision().k == 2
        with precision(k=3):
            assert mobiquant.current_precision().k == 3
        assert mobiquant.current_precision().k == 2
    assert mobiquant.current_precision() is None


def test_two_threads_two_precisions():
    """Each thread sees its own precision: no module-level state is shared."""
    q = MoBiQuantLinear.from_linear(torch.nn.Linear(64, 16), MoBiQuantConfig(group_size=32))
    x = torch.randn(8, 64)
    expected = {k: q(x, k=k) for k in (1, 4)}
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(k):
        try:
            with precision(k=k):
                barrier.wait()  # both threads are inside their precision block at once
                outs = [q(x) for _ in range(20)]
            results[k] = outs
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in (1, 4):
        for y in results[k]:
            torch.testing.assert_close(y, expected[k])
    assert not torch.allclose(expected[1], expected[4])
