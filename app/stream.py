"""A generation in its own thread, handed to the UI in batches: decoding never waits for the page to be updated.

Gradio runs a streaming handler one ``next()`` at a time in a worker thread, going back to the event loop at every
``yield``; a model stepped inside that handler stops while each update is rendered, serialised and scheduled (a
quarter of the decode time on a 2-core CPU). Here the model runs in a producer thread that only decodes and queues
its steps; the handler takes whatever has been queued, renders it and yields, while the next token is computed (the
matrix products release the GIL, so on a CPU the rendering uses the other core).

    for steps in batches(lambda: elastic_generate(...), control, every_s=0.1):
        ...                      # steps: the TokenSteps decoded since the last batch (at least one)

The consumer ending early (Stop, a closed tab, an exception) sets ``control.stop``, which ends the producer at its
next token. An exception in the producer is raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def batches(make_steps: Callable[[], Iterable], control, every_s: float) -> Iterator[list]:
    """Yield lists of the steps of ``make_steps()`` (run in a daemon thread); after the first step, a batch is
    yielded at most every ``every_s`` seconds, and always once at the end for what is left."""
    q: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            for step in make_steps():
                q.put(step)
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(_Failed(e))

    threading.Thread(target=produce, name="mobiquant-generate", daemon=True).start()
    last, done = float("-inf"), False
    try:
        while not done:
            batch, item = [], q.get()
            while True:
                if item is _DONE:
                    done = True
                    break
                if isinstance(item, _Failed):
                    raise item.error
                batch.append(item)
                wait = last + every_s - time.perf_counter()
                try:
                    item = q.get(timeout=wait) if wait > 0 else q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                last = time.perf_counter()
                yield batch
    finally:
        if not done:
            control.stop = True  # the consumer stopped first (closed, or an error): end the producer too
