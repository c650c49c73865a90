"""Replies handed over as they arrive, so the coordinator folds each into the round's sum and frees it.

Flower's ``Grid.send_and_receive`` returns only when every reply is in (or the timeout passed): the
coordinator then holds all N replies at once, N adapters. Here the same two Grid calls it is built on
(``push_messages``, then ``pull_messages`` polled until every message is answered or the deadline passes;
flwr/superlink/grid/inmemory_grid.py and http_grid.py) are driven by a generator instead: a poll pulls
the outstanding message ids a few at a time (``pull_batch``), so at most that many replies are held
before the caller has folded them. Any Grid works: the SuperLink's, Flower's simulation grid and the
in-process engine's all implement both calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

# Seconds between polls that found nothing new. Flower's HttpGrid.send_and_receive sleeps 3 s between polls,
# which alone can put 3 s between the last site's reply and the new global adapter.
PULL_INTERVAL_S = 0.2
# Message ids per pull_messages call: the replies one call can return (and the coordinator hold) at once. One
# keeps the coordinator at one reply in flight (~0.5 adapters for a bf16 upload); the price is one pull per
# outstanding id per poll (a SuperLink round trip each over HttpGrid, a state lookup in simulation).
PULL_BATCH = 1


def replies_as_they_arrive(grid: Grid, messages: Iterable[Message], timeout: float | None, *,
                           pull_interval: float = PULL_INTERVAL_S, pull_batch: int = PULL_BATCH
                           ) -> Iterator[Message]:
    """Push `messages`; yield each reply once a poll finds it, until all are answered or `timeout` s passed.

    timeout None waits for every reply, as Grid.send_and_receive does. A reply is yielded once and not kept:
    the generator holds at most `pull_batch` replies besides the one the caller is working on.
    """
    if pull_batch < 1:
        raise ValueError(f"pull_batch must be >= 1, got {pull_batch}")
    outstanding = [message_id for message_id in grid.push_messages(messages) if message_id]
    deadline = None if timeout is None else time.monotonic() + timeout
    while outstanding:
        answered: set[str] = set()
        for start in range(0, len(outstanding), pull_batch):
            pulled = list(grid.pull_messages(outstanding[start:start + pull_batch]))
            pulled.reverse()  # pop() from the end hands them over in the grid's order
            while pulled:
                answered.add(pulled[-1].metadata.reply_to_message_id)
                # Handed over without a name here: once the caller drops the reply, its bytes are freed, even
                # while this generator waits to be resumed.
                yield pulled.pop()
        outstanding = [message_id for message_id in outstanding if message_id not in answered]
        if not outstanding or (deadline is not None and time.monotonic() >= deadline):
            return
        if not answered:
            time.sleep(pull_interval if deadline is None else max(0.0, min(pull_interval,
                                                                         deadline - time.monotonic())))


def replies_in_order(grid: Grid, messages: Iterable[Message], timeout: float | None, *,
                     pull_interval: float = PULL_INTERVAL_S) -> Iterator[Message]:
    """Push `messages` sorted by destination node id; yield the replies in that order, one at a time.

    The order does not depend on which site finishes first, so a sum folded in it is the same bit for bit in a
    re-run or after a restart. Replies that come early wait in the grid (the SuperLink's state), not here.
    At the deadline the replies that did come are still yielded, in order; the missing ones are skipped.
    """
    ordered = sorted(messages, key=lambda message: message.metadata.dst_node_id)
    outstanding = [message_id for message_id in grid.push_messages(ordered) if message_id]
    deadline = None if timeout is None else time.monotonic() + timeout
    while outstanding:
        pulled = list(grid.pull_messages(outstanding[:1]))
        if pulled:
            outstanding.pop(0)
            yield pulled.pop()
            continue
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(pull_interval if deadline is None else max(0.0, min(pull_interval, deadline - time.monotonic())))
    for message_id in outstanding:  # past the deadline: whatever came, still in order
        yield from grid.pull_messages([message_id])
