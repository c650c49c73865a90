"""The site's own record of every DP-SGD release of its data, across all runs: its lifetime privacy budget.

DP-SGD's per-run accountant (federation/dp_sgd.py) is round state that the coordinator's federation run id and
round select (client/site_state.py): what the run reports is right for an honest coordinator, but a hostile one
re-sends a round (the accountant restarts from that round's entry state) or starts another run (a fresh
accountant) and gets one more noisy release of the same examples each time. Averaging such releases removes the
noise. This ledger is keyed by nothing the coordinator sends: every DP-SGD round the site runs is charged to it,
*before* training starts (a round cut short still counts: its release may have left), and a round that would take
the composition of all charged rounds past the site's budget (policy.privacy_budget) is refused.

Accounting is Opacus' RDP accountant over the whole history (federation.privacy.epsilon_of_history), each round
charged as (noise multiplier, sample rate, steps) exactly as Opacus' own accountant records that round. An
unreadable ledger refuses every DP-SGD round (fails closed) rather than starting again from zero.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from client.site_policy import PrivacyBudget, SiteRefusal
from federation.privacy import epsilon_of_history
from federation.store import atomic_write_bytes

log = logging.getLogger("fedtune.site.privacy")

LEDGER_VERSION = 1
# The site's ledger accounts with RDP whatever accountant a run names: one accountant over the whole history.
LEDGER_ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class Charge:
    """One DP-SGD round charged to the ledger, and the site's lifetime epsilon with it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float


class SitePrivacyLedger:
    """The JSON file of every DP-SGD round this site ran: ``{"version", "accountant", "releases": [...]}``."""

    def __init__(self, path: str | Path, budget: PrivacyBudget):
        self.path = Path(path)
        self.budget = budget

    def history(self) -> list[tuple[float, float, int]]:
        """Every charged round as (noise_multiplier, sample_rate, steps), oldest first; SiteRefusal if unreadable."""
        return [_mechanism(release) for release in self._releases()]

    def _releases(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("version") != LEDGER_VERSION or raw.get("accountant") != LEDGER_ACCOUNTANT:
                raise ValueError(f"version {raw.get('version')!r}, accountant {raw.get('accountant')!r}")
            releases = list(raw["releases"])
            for release in releases:
                _mechanism(release)  # every entry readable, or none is used
            return releases
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("privacy ledger %s is unreadable (%s): every DP-SGD round is refused until an operator "
                      "repairs it", self.path, exc)
            raise SiteRefusal("this site's privacy ledger is unreadable; it trains nothing until its operator "
                              "repairs it") from None

    def epsilon(self) -> float:
        """The site's lifetime epsilon at the budget's delta, all charged rounds composed."""
        return epsilon_of_history(self.history(), self.budget.delta, LEDGER_ACCOUNTANT)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, run: str, server_round: int) -> Charge:
        """Record one DP-SGD round before it runs, or raise SiteRefusal if it would exceed the budget.

        Read, check and write happen under an exclusive lock on a file next to the ledger: two processes charging
        the same ledger (two daemons started on one state_dir by mistake) cannot both pass on the same history.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return self._charge(noise_multiplier, sample_rate, steps, run, server_round)

    def _charge(self, noise_multiplier: float, sample_rate: float, steps: int, run: str, server_round: int) -> Charge:
        releases = self._releases()
        history = [_mechanism(release) for release in releases]
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        epsilon = epsilon_of_history([*history, entry], self.budget.delta, LEDGER_ACCOUNTANT)
        if not epsilon <= self.budget.epsilon:  # inf and nan refused too
            spent = epsilon_of_history(history, self.budget.delta, LEDGER_ACCOUNTANT)
            raise SiteRefusal(
                f"this DP-SGD round (noise multiplier {noise_multiplier:.4g}, sample rate {sample_rate:.4g}, "
                f"{steps} steps) would take this site's lifetime epsilon from {spent:.4g} to {epsilon:.4g} at "
                f"delta {self.budget.delta:g}, past its budget of {self.budget.epsilon:g} (policy.privacy_budget)")
        # run and round are the coordinator's labels: kept for the operator, never used for accounting.
        releases.append({"noise_multiplier": entry[0], "sample_rate": entry[1], "steps": entry[2],
                         "run": str(run), "round": int(server_round), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        # A crash leaves the old ledger or the new one, never a torn file.
        atomic_write_bytes(self.path, json.dumps({"version": LEDGER_VERSION, "accountant": LEDGER_ACCOUNTANT,
                                                  "releases": releases}, indent=1).encode())
        log.info("privacy ledger: charged a DP-SGD round (noise multiplier %.4g, sample rate %.4g, %d steps); "
                 "lifetime epsilon %.4g of %g at delta %g", *entry, epsilon, self.budget.epsilon, self.budget.delta)
        return Charge(*entry, epsilon)


def _mechanism(release: dict) -> tuple[float, float, int]:
    return float(release["noise_multiplier"]), float(release["sample_rate"]), int(release["steps"])
