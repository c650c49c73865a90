"""Flower's SuperNode (``flower-supernode``), with a bound on how long its message loop waits between checks.

Flower 1.41's SuperNode asks the coordinator for a message, and when there is none it sleeps a fixed 3 s
(``time.sleep(3)`` in flwr/supernode/start_client_internal.py) before asking again; it waits in 0.5 s steps
for the reply it then sends. A message therefore sits at the SuperLink for up to 3 s before the site sees it,
in every round (and in each of the four stages of a SecAgg+ round). ``fedtune site`` starts the SuperNode
through this module so that the site's ``poll_interval_s`` (client/daemon.py) bounds those waits; with
Flower's 3 s, the default, nothing changes.

    python -m client.supernode --poll-interval-s S <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time

POLL_INTERVAL_FLAG = "--poll-interval-s"


class _BoundedSleep:
    """The `time` module as flwr's SuperNode loop sees it, except that sleep() waits at most `bound_s`."""

    def __init__(self, bound_s: float):
        self.bound_s = bound_s

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.bound_s))


def bound_supernode_waits(bound_s: float) -> None:
    """Make every wait of Flower's SuperNode message loop (flwr.supernode.start_client_internal) last <= bound_s."""
    import flwr.supernode.start_client_internal as loop

    loop.time = _BoundedSleep(bound_s)


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
