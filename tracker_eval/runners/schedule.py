"""Which step the watcher evaluates next, in which suites, and when it is done (process 0's decisions).

    schedule = Schedule(config, ledgers)          # ledgers: suite name -> Ledger, config order
    schedule.register(listed_steps)               # True when any suite has new steps
    decision = schedule.claim_next(owner=owner)   # one int for every process, or None
    step, suites = schedule.decode(decision)
    schedule.finished(last_new=t)                 # a stop reason, or ""

Every suite has its own ledger stream, so a step is due per suite: each suite's cadence (its own
`policy`, else `watch.policy`) applies to that suite's pending steps, and a step is claimed in every
suite where it is due, so it is restored once for all of them (a suite added later is due on the
steps the others already have). `watch.order` picks which due step goes first: the lowest
(oldest_first), or the newest found (newest_first: the steps of the latest listing that brought new
ones, newest first, then the older backlog, newest first). A decision names the step and the
claimed suites in one integer, so the decision channel between processes stays as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tracker_eval.config import EvalConfig, off_cadence, policy_text

LOG = logging.getLogger("tracker_eval")


class Schedule:
    """The watcher's view of its suites' ledgers (empty on processes other than 0).

    Attributes:
      retry_after: (suite, step) -> monotonic time before which a failed step is not claimed again.
      evaluated_seen: (suite, step) -> monotonic time `until_step` first saw the result undelivered.
    """

    def __init__(self, config: EvalConfig, ledgers: Mapping[str, Any]) -> None:
        self.watch = config.watch
        self.has_suites = config.has_suites
        self.suite_names = [suite.name for suite in config.suite_list()]
        self.policies = {name: config.suite_policy(name) for name in self.suite_names}
        self.newest_first = config.watch.order == "newest_first"
        self.ledgers = ledgers
        self.retry_after: dict[tuple[str, int], float] = {}
        self.evaluated_seen: dict[tuple[str, int], float] = {}
        # newest_first: the listing (1, 2, ...) that brought each step this run; 0 = known before.
        self._found_in: dict[int, int] = {}
        self._listings = 0

    def policy_text(self) -> str:
        """The cadence for the start-up line: one policy, or each suite's."""
        texts = {name: policy_text(*policy) for name, policy in self.policies.items()}
        if len(set(texts.values())) == 1:
            return next(iter(texts.values()))
        return ", ".join(f"{name}: {text}" for name, text in texts.items())

    def encode(self, step: int, names: Sequence[str]) -> int:
        """One integer for "evaluate `step` in these suites" (the step itself without suites)."""
        if not self.has_suites:
            return step
        mask = sum(1 << self.suite_names.index(name) for name in names)
        return (step << len(self.suite_names)) | mask

    def decode(self, decision: int) -> tuple[int, list[str]]:
        """Inverse of `encode`: (step, suites in config order)."""
        if not self.has_suites:
            return decision, [""]
        width = len(self.suite_names)
        names = [name for i, name in enumerate(self.suite_names) if decision >> i & 1]
        return decision >> width, names

    def register(self, listed: Sequence[int]) -> bool:
        """Adds the listed steps to every suite's ledger; True when any suite got a step it lacked."""
        added = {name: set(ledger.register(listed)) for name, ledger in self.ledgers.items()}
        new = sorted(set.intersection(*added.values())) if added else []
        found = set().union(*added.values()) if added else set()
        if found:
            self._listings += 1
            self._found_in.update(dict.fromkeys(found, self._listings))
        if new:
            LOG.info("tracker-eval: found checkpoint step%s %s", "s" if len(new) > 1 else "", _steps_text(new))
        for name, steps in added.items():
            if len(steps) > len(new):  # a suite added to a run that already had steps
                LOG.info("tracker-eval: suite %r is new to %d known step(s); they are due for it under "
                         "its policy (%s)", name, len(steps) - len(new), policy_text(*self.policies[name]))
        return any(added.values())

    def claim_next(self, *, owner: str) -> int | None:
        """Applies each suite's policy, then claims the first due step (`watch.order`) in every suite
        where it is due; the encoded decision, or None when nothing could be claimed."""
        for name, ledger in self.ledgers.items():
            self._apply_policy(name, ledger)
        for step, names in self._claimable():
            # Another live watcher may hold a step: try the next one instead of waiting.
            claimed = [name for name in names if self.ledgers[name].claim(step, owner=owner,
                                                                           ttl_s=self.watch.lease_ttl_s)]
            if claimed:
                return self.encode(step, claimed)
        return None

    def _apply_policy(self, name: str, ledger: Any) -> None:
        from tracker_eval.ledger.steps import IllegalTransitionError, LeaseLostError, StepState  # noqa: PLC0415

        policy, every_n = self.policies[name]
        if policy == "all":
            return
        pending = ledger.steps(StepState.PENDING)
        if pending:
            pending = sorted(set(pending) - ledger.asked_for())  # `tracker-eval retry --skipped` overrides
        skips: dict[int, str] = {}
        if policy == "every_n_steps":
            skips = {step: reason for step in pending if (reason := off_cadence(policy, every_n, step))}
        elif policy == "latest" and pending:
            newest = ledger.newest_step()
            skips = {step: f"policy latest: newer step {newest} was found" for step in pending if step < newest}
        for step, reason in skips.items():
            try:
                ledger.mark_skipped(step, reason)
            except (LeaseLostError, IllegalTransitionError):
                pass  # claimed or stored meanwhile by another process (e.g. in-training): theirs now

    def _claimable(self) -> list[tuple[int, list[str]]]:
        """Steps worth a claim in `watch.order`, each with the suites (in config order) where it is;
        EVALUATING too, since claim() takes over a dead holder's."""
        from tracker_eval.ledger.steps import StepState  # noqa: PLC0415

        now = time.monotonic()
        due: dict[int, list[str]] = {}
        for name, ledger in self.ledgers.items():
            for step in ledger.steps(StepState.PENDING, StepState.FAILED, StepState.EVALUATING):
                if self.retry_after.get((name, step), 0.0) <= now:
                    due.setdefault(step, []).append(name)
        if self.newest_first:
            # A step found while the backlog is worked goes ahead of the rest of the backlog.
            return sorted(due.items(), key=lambda item: (self._found_in.get(item[0], 0), item[0]), reverse=True)
        return sorted(due.items())

    def finished(self, *, last_new: float) -> str:
        """A stop reason when `until_step` or `idle_timeout_s` is reached, else ''."""
        from tracker_eval.ledger.steps import StepState  # noqa: PLC0415

        until = self.watch.until_step
        if until is not None:
            known = [(name, row) for name, ledger in self.ledgers.items() for row in ledger.rows()]
            relevant = [(name, r) for name, r in known if r["step"] <= until]
            reached = any(r["step"] >= until for _, r in known)
            if reached and relevant and all(self._settled(name, r, StepState) for name, r in relevant):
                return f"until_step {until} reached"
        idle = self.watch.idle_timeout_s
        if idle is not None and time.monotonic() - last_new >= idle:
            if not any(ledger.steps(StepState.PENDING, StepState.FAILED, StepState.EVALUATING)
                       for ledger in self.ledgers.values()):
                return f"no new checkpoint for {idle:g} s"
        return ""

    def _settled(self, suite: str, row: dict[str, Any], states: Any) -> bool:
        state = row["state"]
        if state in (states.DELIVERED, states.SKIPPED, states.GIVEN_UP):
            return True
        if state == states.EVALUATED:
            loggers = self.ledgers[suite].loggers
            waiting = [n for n, d in row["deliveries"].items() if d == "pending" and n in loggers]
            if not waiting:
                return True  # whatever is missing is undeliverable: waiting cannot bring it
            seen = self.evaluated_seen.setdefault((suite, row["step"]), time.monotonic())
            return time.monotonic() - seen >= self.watch.outbox_wait_s
        return False


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]} ... {steps[-1]} ({len(steps)})"
