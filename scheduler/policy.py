"""Waiting-queue order: weighted fairness between tenants, then adapter-aware order per tenant.

Fairness is a virtual token counter per tenant (VTC, Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024). Knows sequences and a residency predicate; never pages or tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

from loraplex.scheduler.request import Sequence

TIER_RESIDENT, TIER_HOST, TIER_DISK = 0, 1, 2
"""Where a waiting request's adapter is (the base model counts as resident)."""
LOOKAHEAD_PER_TENANT = 256
"""Waiting requests per tenant that one step orders, oldest first; newer ones wait their turn
(keeps a step cheap with thousands queued)."""


class TenantCounters:
    """Service each tenant got, in tokens divided by its weight (its virtual time).

    The tenant with the smallest counter is served next. A tenant that comes back after a quiet
    spell is lifted to the smallest counter of the active tenants, so idling banks no credit.
    """

    def __init__(self) -> None:
        self._weights: dict[str, float] = {}
        self._counters: dict[str, float] = {}

    def set_weight(self, tenant: str, weight: float) -> None:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"tenant weight: must be a finite number > 0, got {weight!r}")
        self._weights[tenant] = float(weight)

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def value(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def charge(self, tenant: str, num_tokens: int) -> None:
        """Count `num_tokens` computed for `tenant` this step (prefill chunk or one decode)."""
        self._counters[tenant] = self.value(tenant) + num_tokens / self.weight(tenant)

    def activate(self, tenant: str, active: Iterable[str]) -> None:
        """`tenant` had nothing queued or running and now has a request (VTC's lift)."""
        others = [self.value(t) for t in active if t != tenant]
        if others:
            self._counters[tenant] = max(self.value(tenant), min(others))

    def snapshot(self) -> dict[str, float]:
        return dict(self._counters)


def is_aged(seq: Sequence, step: int, max_wait_steps: int) -> bool:
    """Preempted, or waited `max_wait_steps` or more: it goes first within its tenant."""
    return seq.num_preemptions > 0 or step - seq.arrival_step >= max_wait_steps


def admission_order(waiting: Iterable[Sequence], *, step: int, max_wait_steps: int,
                    tier: Callable[[Sequence], int], counters: TenantCounters | None,
                    dry_run: bool = False) -> Iterator[Sequence]:
    """Waiting sequences in the order the scheduler should try to admit them.

    Across tenants: the one with the smallest counter next (fairness; `counters` None puts every
    request in one queue). Within a tenant: aged requests first (so none starves), then those
    whose adapter is resident, then in the host tier, then on disk; arrival order breaks ties.
    Only the oldest `LOOKAHEAD_PER_TENANT` requests of each tenant are considered.
    Lazy: the caller charges `counters` between items and the order follows. `dry_run` charges
    each item's uncomputed tokens to a private copy instead (the prefetch look-ahead).
    """
    queues: dict[str, list[tuple[tuple, Sequence]]] = {}
    for seq in waiting:  # oldest first: the queue is in arrival order, preempted at the front
        queue = queues.setdefault(seq.request.tenant if counters is not None else "", [])
        if len(queue) < LOOKAHEAD_PER_TENANT:
            aged = is_aged(seq, step, max_wait_steps)
            queue.append(((not aged, tier(seq), seq.arrival_step, seq.seq_id), seq))
    for queue in queues.values():
        queue.sort(key=lambda item: item[0], reverse=True)  # pop() takes the first
    private = counters.snapshot() if counters is not None and dry_run else None

    def virtual_time(tenant: str) -> tuple[float, int]:
        head = queues[tenant][-1][1]
        if counters is None:
            return 0.0, head.seq_id
        value = private.get(tenant, 0.0) if private is not None else counters.value(tenant)
        return value, head.seq_id

    while queues:
        tenant = min(queues, key=virtual_time)
        _, seq = queues[tenant].pop()
        if not queues[tenant]:
            del queues[tenant]
        if private is not None:
            private[tenant] = private.get(tenant, 0.0) + \
                seq.num_uncomputed_tokens / counters.weight(tenant)
        yield seq
