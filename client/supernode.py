"""Flower's SuperNode (``flower-supernode``), with a bound on how long its message loop waits between checks.

Flower 1.41's SuperNode asks the coordinator for a message, and when there is none it sleeps a fixed 3 s
(``time.sleep(3)`` in flwr/supernode/start_client_internal.py) before asking again; it waits in 0.5 s steps
for the reply it then sends. A message therefore sits at the SuperLink for up to 3 s before the site sees it,
in every round (and in each of the four stages of a SecAgg+ round), and each reply up to 0.5 s in the SuperNode.
``fedtune site`` starts the SuperNode through this module so that the site's ``poll_interval_s``
(client/daemon.py) bounds the idle wait (a request to the coordinator each time), and the waits for a reply,
which only look at the SuperNode's own state, last at most LOCAL_WAIT_S.

    python -m client.supernode --poll-interval-s S <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time

POLL_INTERVAL_FLAG = "--poll-interval-s"
# Flower 1.41's idle wait between requests for a message (the only wait that sends a request to the coordinator).
FLOWER_IDLE_WAIT_S = 3
# Longest wait for a reply or object in the SuperNode's own state (Flower waits 0.5 s steps): a local check only.
LOCAL_WAIT_S = 0.05


class _BoundedSleep:
    """The `time` module as flwr's SuperNode loop sees it, except for sleep(): Flower's idle wait lasts at most
    `idle_s`, every other wait at most min(idle_s, LOCAL_WAIT_S)."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        bound = self.idle_s if seconds == FLOWER_IDLE_WAIT_S else min(self.idle_s, LOCAL_WAIT_S)
        time.sleep(min(seconds, bound))


def bound_supernode_waits(idle_s: float) -> None:
    """Bound the waits of Flower's SuperNode message loop (flwr.supernode.start_client_internal): idle_s between
    requests for a message, LOCAL_WAIT_S for a reply in its own state."""
    import flwr.supernode.start_client_internal as loop

    loop.time = _BoundedSleep(idle_s)


def main(argv: list[str]) -> int:
    """`--poll-interval-s S` first, then flower-supernode's own arguments."""
    if len(argv) < 2 or argv[0] != POLL_INTERVAL_FLAG:
        print(f"usage: python -m client.supernode {POLL_INTERVAL_FLAG} S <flower-supernode arguments>",
              file=sys.stderr)
        return 2
    bound_supernode_waits(float(argv[1]))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[2:]]  # flower-supernode parses sys.argv (and names itself after [0])
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
