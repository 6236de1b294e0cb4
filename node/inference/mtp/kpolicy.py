"""Choosing K, the drafts per native-MTP cycle, from running acceptance and measured costs.

Pure code: no model, no clock.  The engine feeds it what each cycle did and the seconds it
took; ``node.inference.mtp.costs`` measures the cost table (on an instance's first unpinned
request; pipeline_mtp's stage 0 at load).

Model of one cycle at batch size B with K drafts (K = 0: plain decode, nothing drafted):

    seconds(B, K)  = verify(B, K + 1) + draft(B, K)
    tokens(K)      = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_K     (per sequence)

where ``a_d`` is the acceptance of depth d given that depths < d were accepted.  The policy
takes the K that maximises ``sum of tokens(K) over the batch / seconds(B, K)`` within the
bounds (the card's ``max_k``, the tokens the request may still emit); a request's explicit
``mtp_k`` pins K.

Acceptance estimates.  Per depth, a distribution over acceptance levels that each drafting
cycle first lets drift back toward the prior (the text may have changed: ``HAZARD``), then
weighs by what the cycle saw (``AcceptanceEstimate``).  An untried depth accepts like the one
above it.  Steady text averages over ~1 / HAZARD cycles; a change (code and boilerplate are
easy to draft, free prose is not, and acceptance falls with context length) shows in one or
two cycles, because a miss after a run of hits is unlikely under the old level.  A newcomer's
depth 1 starts from what the instance's earlier requests of its sampling class accepted
(``AcceptancePrior``), not from the flat prior: a request lasts too few cycles to learn it.

Exploration.  At K = 0 nothing is drafted, so there is no new evidence and a request whose
text became easy again would never find out.  After ``probe_interval`` consecutive K = 0
cycles the policy drafts one token (K = 1, the cheapest probe: one head step and one more
verify position).  A rejected probe doubles the interval, up to the interval at which probes
cost ``PROBE_BUDGET`` of the time (from the cost table: a probe costs
``seconds(B, 1) - seconds(B, 0)``), so a text the head never matches loses at most ~2% to
probing, and cheap probes (Metal, where one more verify position is nearly free) come often.
The budget rises toward ``PAID_PROBE_BUDGET`` with the share of the request's recent drafting
cycles that had a draft accepted (probes count as cycles that did not): text that was easy
before likely becomes easy again, and finding that out a probe interval late costs that many
cycles of drafting.
An accepted probe is followed by another at once, so a run of good drafts lifts the estimate
past the break-even point in a few cycles instead of one probe per interval; the interval
itself goes back to its minimum only when the estimates choose to draft again (a lone hit in
a text the head rarely matches does not restart the schedule).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Acceptance levels the estimate tells apart (midpoints of 20 equal bins of [0, 1]) and the
# share of belief that moves back to the prior each drafting cycle (the text may have changed).
GRID = 20
LEVELS = tuple((i + 0.5) / GRID for i in range(GRID))
FLAT = tuple(1.0 / GRID for _ in range(GRID))
PRIOR_ACCEPTANCE = 0.5  # before any evidence at depth 1: the flat prior's mean
HAZARD = 0.05
MIN_PROBE_INTERVAL = 2
MAX_PROBE_INTERVAL = 32
PROBE_BUDGET = 0.02  # share of a K = 0 stretch's time that probes may cost
# ... rising to PAID_PROBE_BUDGET when all of the request's recent drafting cycles had a draft
# accepted (PAID_MEMORY: the weight of the older ones per drafting cycle).
PAID_PROBE_BUDGET = 0.1
PAID_MEMORY = 0.9
# Live cycle timings: the newest one's share when it is below the running ratio, and when it is
# above.  Other processes only ever add time, so a slow cycle moves the estimate little; a
# real, lasting slowdown (longer context, a loaded machine) still gets through in ~20 cycles.
EWMA_DOWN = 0.3
EWMA_UP = 0.05
# After a K = 0 cycle the batched engine has already queued the next K = 0 step; drafting
# throws it away (a whole [B, 1] forward).  Near break-even, where estimates and live costs
# flip the best K between 0 and 1 from cycle to cycle, each flip paid that.  Leaving K = 0
# must promise this much more speed: below it, staying loses less than the thrown-away step.
LEAVE_ZERO_MARGIN = 0.05
# A newcomer's depth-1 prior (``AcceptancePrior``): the older requests' share of the pool, the
# flat prior's share of the newcomer's prior, the drafts a request must have tried to count,
# and how many sampling classes an instance remembers.
POOL_MEMORY = 0.5
PRIOR_BREADTH = 0.3
POOL_MIN_TRIES = 4
POOL_CLASSES = 8


def expected_tokens(rates: Sequence[float], k: int) -> float:
    """Tokens one cycle emits with ``k`` drafts: the correction/bonus token plus each accepted
    draft, depth d counting when depths 1..d are all accepted."""
    total, survive = 1.0, 1.0
    for d in range(k):
        survive *= rates[d] if d < len(rates) else rates[-1]
        total += survive
    return total


@dataclass
class CostTable:
    """Seconds of a cycle's parts by batch size, measured once (``costs.measure_costs``) and
    refreshed live.

    ``verify[B][t - 1]``: one target forward over ``t`` positions for each of ``B`` sequences
    (t = 1..max_k + 1); ``draft[B][k]``: drafting ``k`` tokens for ``B`` sequences
    (k = 0..max_k; ``draft[B][0]`` is 0 or the cost of feeding the head without drafting).
    Batch sizes between measured ones interpolate linearly, beyond them the nearest is used.

    Live refresh: ``observe(B, K, seconds)`` keeps an EWMA of measured / modelled cycle time per
    (B, K), per K over every batch size, and over all cycles (asymmetric: faster cycles count
    more than slower ones, which are mostly another process holding the core).  The ratios
    absorb what isolated timings miss (host syncs, Python, the head's pending pairs, rollback)
    and follow the machine's load.  ``cycle_s`` scales the model by the (B, K) ratio once that
    shape has run, else by K's ratio at other batch sizes, else by the overall ratio — but
    never above 1 for K = 0: drafting cycles carry overheads plain decode steps do not, so an
    overall ratio learnt from drafting alone would price a never-tried K = 0 as dear as them
    and keep the policy from ever trying it (at B = 8 it kept drafting at 0.6x plain speed).
    An optimistic guess costs one plain step to correct.  ``ewma_weight=0`` freezes the table
    (tests that must not depend on timing).
    """

    verify: dict[int, list[float]]
    draft: dict[int, list[float]]
    ewma_weight: float = EWMA_UP  # the weight of a slower-than-expected cycle; 0 freezes
    ewma_down: float = EWMA_DOWN
    _ratio: dict[tuple[int, int], float] = field(default_factory=dict)
    _ratio_k: dict[int, float] = field(default_factory=dict)
    _overall: float | None = None

    def __post_init__(self) -> None:
        if not self.verify or set(self.verify) != set(self.draft):
            raise ValueError("verify and draft costs must cover the same batch sizes")
        for b in self.verify:
            if len(self.draft[b]) != len(self.verify[b]):
                raise ValueError(
                    f"batch {b}: {len(self.verify[b])} verify costs (T = 1..max_k+1) need as "
                    f"many draft costs (K = 0..max_k), got {len(self.draft[b])}"
                )

    @property
    def max_k(self) -> int:
        return min(len(v) for v in self.verify.values()) - 1

    def _at(self, table: dict[int, list[float]], batch: int, i: int) -> float:
        sizes = sorted(table)
        j = bisect.bisect_left(sizes, batch)
        if j < len(sizes) and sizes[j] == batch:
            return table[batch][i]
        if j == 0:
            return table[sizes[0]][i]
        if j == len(sizes):
            return table[sizes[-1]][i]
        lo, hi = sizes[j - 1], sizes[j]
        w = (batch - lo) / (hi - lo)
        return (1 - w) * table[lo][i] + w * table[hi][i]

    def modelled_s(self, batch: int, k: int) -> float:
        return self._at(self.verify, batch, k) + self._at(self.draft, batch, k)

    def cycle_s(self, batch: int, k: int) -> float:
        ratio = self._ratio.get((batch, k), self._ratio_k.get(k))
        drafted = [j for j in self._ratio_k if j > 0]
        if ratio is None and k > 0 and drafted:
            # An untried depth is priced like the nearest tried one: drafting cycles share
            # overheads (the head, rollback, sampling) a K = 0 step has not, so the overall
            # ratio, mostly K = 0 cycles after a stretch of plain decode, priced an untried
            # K = 2 below a tried K = 1.
            ratio = self._ratio_k[min(drafted, key=lambda j: (abs(j - k), j))]
        if ratio is None:
            ratio = self._overall or 1.0
            if k == 0:
                ratio = min(ratio, 1.0)
        return self.modelled_s(batch, k) * ratio

    def observe(self, batch: int, k: int, seconds: float) -> None:
        modelled = self.modelled_s(batch, k)
        if not (seconds > 0 and modelled > 0 and self.ewma_weight > 0):
            return
        ratio = seconds / modelled
        self._ratio[(batch, k)] = self._mix(self._ratio.get((batch, k)), ratio)
        self._ratio_k[k] = self._mix(self._ratio_k.get(k), ratio)
        self._overall = self._mix(self._overall, ratio)

    def _mix(self, old: float | None, new: float) -> float:
        if old is None:
            return new
        w = self.ewma_down if new < old else self.ewma_weight
        return (1 - w) * old + w * new


@dataclass
class CycleTimer:
    """Feeds a ``CostTable`` the seconds of each cycle an engine runs.

    A drafting cycle's seconds are its own.  K = 0 is priced by a whole plain-decode stretch
    instead: the batched engine queues each K = 0 step before the previous one's tokens are
    read, so a stretch's first cycle computes its own step and queues the next (its time then
    holds part of the next step's work, in process-CPU time nearly all of it), and its last
    cycle reads a step already done.  Taken one by one, the first cycles (~1.3x dear) made
    plain decode look dearer than it is, and at 27% acceptance the policy drafted nearly
    every cycle; a stretch's mean is one step's cost.  A stretch of one cycle is not used: it
    holds the queued step the next drafting cycle threw away.
    """

    costs: CostTable
    _stretch: tuple[int, int, float] | None = None  # (batch size, cycles, seconds)

    def cycle(self, batch: int, k: int, seconds: float) -> None:
        stretch = self._stretch
        if stretch is not None and (k != 0 or stretch[0] != batch):
            self.end_stretch()
            stretch = None
        if k == 0:
            _, cycles, total = stretch or (batch, 0, 0.0)
            self._stretch = (batch, cycles + 1, total + seconds)
        else:
            self.costs.observe(batch, k, seconds)

    def end_stretch(self) -> None:
        """The batch emptied or changed size: a K = 0 stretch so far counts now."""
        stretch, self._stretch = self._stretch, None
        if stretch is not None and stretch[1] >= 2:
            batch, cycles, total = stretch
            self.costs.observe(batch, 0, total / cycles)


def choose_k(
    rates: Sequence[Sequence[float]],
    costs: CostTable,
    max_k: int,
    batch: int | None = None,
    leave_zero_margin: float = 0.0,
) -> int:
    """The K in 0..max_k maximising the batch's expected tokens per second.

    ``rates[i]`` is sequence i's per-depth acceptance estimate; the batch drafts and
    verifies together, so one K serves all of it.  A K > 0 must beat K = 0 by
    ``leave_zero_margin`` (a share of K = 0's speed) to be chosen: the batched engine passes
    it after a K = 0 cycle, whose queued next step a drafting cycle throws away.
    """
    batch = batch if batch is not None else max(len(rates), 1)
    max_k = max(0, min(max_k, costs.max_k))
    best_k, best, zero = 0, -1.0, 0.0
    for k in range(max_k + 1):
        tokens = sum(expected_tokens(r, k) for r in rates) if rates else 1.0
        speed = tokens / costs.cycle_s(batch, k)
        if k == 0:
            zero = speed
        if speed > best * (1 + 1e-9):  # ties go to the smaller K
            best_k, best = k, speed
    if best_k > 0 and best < zero * (1 + leave_zero_margin):
        return 0
    return best_k


@dataclass
class AcceptanceEstimate:
    """Per-depth acceptance given the shallower depths accepted: a filter over levels.

    Each depth holds a distribution over acceptance levels (``LEVELS``).  Every drafting cycle
    first lets the text change (a ``hazard`` share of the mass moves to the prior: for depth 1
    the flat prior, mean ``PRIOR_ACCEPTANCE``; for deeper depths the depth above's
    distribution, so a rarely tried depth accepts like the one before it; a larger share when
    a shallower depth's observation this cycle says the text probably just changed), then
    weighs each level by how likely it makes what the cycle saw (a hit: the level; a miss:
    1 - level).

    Why not decayed counts: they weigh every observation alike, so one window length must be
    both short enough to follow a change and long enough to average out a steady 0.5, and no
    length is (decay 0.7: ~3 cycles of memory, the estimate of a steady 0.5 swings by +-0.25,
    and leaving an always-accepted stretch still took ~7 cycles).  Here steady evidence
    averages over ~1 / hazard cycles, while evidence the current level makes unlikely (misses
    after a run of hits) moves the estimate within one or two cycles.
    """

    max_k: int
    hazard: float = HAZARD
    prior: Sequence[float] = FLAT  # depth 1's, before evidence and as the text drifts
    tries: list[float] = field(default_factory=list)
    _post: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tries = self.tries or [0.0] * self.max_k
        self._post = self._post or [list(self.prior) for _ in range(self.max_k)]

    def observe(self, k: int, accepted: int) -> None:
        """A cycle drafted ``k`` and the first ``accepted`` were accepted: depths 1..accepted
        hit, depth accepted+1 (if drafted) missed, deeper ones were not tried."""
        if k <= 0:
            return  # no evidence: the estimates stay as they were
        h = self.hazard
        tried = min(accepted + 1, k, self.max_k)
        carry = h  # the chance the text changed this cycle, as the shallower depths tell it
        for d in range(self.max_k):
            target = self.prior if d == 0 else self._post[d - 1]
            if self.tries[d] == 0:  # never tried: the depth above's, as rates() reports it
                self._post[d] = list(target)
            else:
                w = max(h, carry)
                self._post[d] = [
                    (1 - w) * p + w * q for p, q in zip(self._post[d], target, strict=True)
                ]
            if d >= tried:
                continue
            hit = d < accepted
            like = [a if hit else 1.0 - a for a in LEVELS]
            now = sum(p * x for p, x in zip(self._post[d], like, strict=True))
            fresh = sum(q * x for q, x in zip(target, like, strict=True))
            # Bayes on "changed just now": a miss after a run of hits is far likelier from
            # fresh text than from the current level; the deeper depths, tried only when
            # this one hits, take it as their own reason to start over.
            carry = max(carry, h * fresh / ((1 - h) * now + h * fresh))
            weighted = [p * x for p, x in zip(self._post[d], like, strict=True)]
            self._post[d] = [x / now for x in weighted]
            self.tries[d] += 1.0

    @property
    def informed(self) -> bool:
        """Has it anything beyond the flat prior: a draft tried, or a pooled prior?"""
        return sum(self.tries) > 0 or tuple(self.prior) != FLAT

    @property
    def depth1(self) -> list[float]:
        """Depth 1's distribution over ``LEVELS`` (what ``AcceptancePrior`` pools)."""
        return list(self._post[0])

    def rates(self) -> list[float]:
        out: list[float] = []
        for d, post in enumerate(self._post):
            if self.tries[d] == 0 and d > 0:
                out.append(out[-1])  # never tried: accepts like the depth above
            else:
                out.append(sum(p * a for p, a in zip(post, LEVELS, strict=True)))
        return out


@dataclass
class AcceptancePrior:
    """Depth 1's prior for a newcomer: the instance's recent requests, pooled per sampling class.

    A request lasts tens of cycles, too few to average out its own acceptance from the flat
    prior: each cycle's hazard pulls the estimate toward 0.5, so a steady 0.27 read as ~0.31
    (K = 1 at break-even, drafted nearly every cycle) and a steady 0.85 as too low for the
    depth that pays.  An instance's requests mostly look alike, so each request that ends
    folds its depth-1 distribution into its class's pool (``POOL_MEMORY``: the older requests'
    share), and a newcomer starts from, and drifts back toward, that pool widened by
    ``PRIOR_BREADTH`` of the flat prior (a request whose text differs still moves its own
    estimate within a few cycles).  Only depth 1: deeper depths start untried, accepting like
    the depth above until tried.  Classes keep apart what accepts differently: greedy rows and
    sampled rows by temperature (a pool mixing T = 1 rows, ~27% acceptance, with greedy ones
    left greedy newcomers pessimistic).
    """

    pools: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def sampling_class(temperature: float) -> str:
        return "greedy" if temperature <= 0 else f"T={round(temperature, 1)}"

    def for_class(self, key: str) -> tuple[float, ...]:
        pool = self.pools.get(key)
        if pool is None:
            return FLAT
        return tuple(
            PRIOR_BREADTH * f + (1 - PRIOR_BREADTH) * p for f, p in zip(FLAT, pool, strict=True)
        )

    def learn(self, key: str, estimate: AcceptanceEstimate) -> None:
        """A request ended: fold its depth-1 distribution in (if it drafted enough to say)."""
        if estimate.tries[0] < POOL_MIN_TRIES:
            return
        pool = self.pools.get(key)
        # The first request of a class is its pool: starting it from the flat prior would take
        # several requests to forget that 0.5, and each of them starts too shallow.
        self.pools[key] = (
            estimate.depth1
            if pool is None
            else [
                POOL_MEMORY * p + (1 - POOL_MEMORY) * q
                for p, q in zip(pool, estimate.depth1, strict=True)
            ]
        )
        if len(self.pools) > POOL_CLASSES:  # forget the oldest class
            del self.pools[next(iter(self.pools))]


@dataclass
class Prober:
    """When to probe with K = 1 during a stretch of K = 0 cycles (the module docstring)."""

    interval: int = MIN_PROBE_INTERVAL
    cap: int = MAX_PROBE_INTERVAL
    zero_run: int = 0
    probing: bool = False
    paid: float = 0.0  # decayed share of drafting cycles that had a draft accepted

    @property
    def budget(self) -> float:
        """The share of a K = 0 stretch's time probes may cost: ``PROBE_BUDGET`` for a text
        whose drafts never pass, more where drafting has paid in this request (the text was
        easy before, so it likely becomes easy again: finding that out late costs more)."""
        return PROBE_BUDGET + (PAID_PROBE_BUDGET - PROBE_BUDGET) * self.paid

    def after_choice(self, k: int, bound: int) -> int:
        """The policy chose ``k``: the K to run (1 when a probe is due)."""
        self.probing = False
        if k == 0 and bound >= 1:
            self.zero_run += 1
            if self.zero_run >= self.interval:
                k, self.probing = 1, True
        else:
            self.zero_run = 0
            if k > 0:
                # The estimates chose to draft: the text pays, so when it stops paying the
                # next K = 0 stretch starts probing soon again.
                self.interval = MIN_PROBE_INTERVAL
        return k

    def after_cycle(self, accepted: bool) -> None:
        """A drafting cycle ended; ``accepted``: some draft passed."""
        # Only drafting the estimates chose counts as drafting that paid: a probe passing now
        # and then (a steady 25%) is not a sign the text turns easy, and counting it raised
        # the budget and the probe rate with it.
        paid = 1.0 if accepted and not self.probing else 0.0
        self.paid = PAID_MEMORY * self.paid + (1 - PAID_MEMORY) * paid
        if not self.probing:
            return
        self.zero_run = 0
        if accepted:
            # Probe again next cycle: good drafts may be back. The interval stays: where a
            # draft passes now and then (a steady 25%), resetting it here made probes ~1 in 6
            # cycles and each one breaks plain decode's pipelining. If the text did become
            # easy, the hits lift the estimate until the policy drafts by itself.
            self.zero_run = self.interval
        else:
            self.interval = min(2 * self.interval, self.cap)

    def probe_due_next(self) -> bool:
        """After a K = 0 cycle: would the next K = 0 choice turn into a probe?"""
        return self.zero_run + 1 >= self.interval


@dataclass
class KPolicy:
    """One request's K, cycle after cycle: estimate, choose, probe at K = 0.

    ``start_k`` (the card's ``default_k``) is the first cycle's K; ``pin`` (the request's
    ``mtp_k``) fixes K for the whole request.
    """

    max_k: int
    start_k: int
    pin: int | None = None
    estimate: AcceptanceEstimate = field(init=False)
    current_k: int = field(init=False)
    probe: Prober = field(default_factory=Prober)
    _started: bool = False

    def __post_init__(self) -> None:
        self.estimate = AcceptanceEstimate(self.max_k)
        self.current_k = self.pin if self.pin is not None else min(self.start_k, self.max_k)

    @property
    def probe_interval(self) -> int:
        return self.probe.interval

    def next_k(self, costs: CostTable | None, limit: int | None = None, batch: int = 1) -> int:
        """K for the next cycle; ``limit`` caps it (tokens the request may still emit)."""
        if costs is not None:
            self.probe.cap = probe_interval_cap(costs, batch, self.probe.budget)
        bound = self.max_k if limit is None else max(0, min(self.max_k, limit))
        if self.pin is not None:
            k = min(self.pin, bound)
        elif not self._started or costs is None:
            k = min(self.start_k, bound)
        else:
            k = self.probe.after_choice(
                choose_k([self.estimate.rates()], costs, bound, batch=batch), bound
            )
        self.current_k = k
        return k

    def observe(self, k: int, accepted: int) -> None:
        self._started = True
        self.estimate.observe(k, accepted)
        if k > 0:
            self.probe.after_cycle(accepted > 0)


@dataclass
class BatchKPolicy:
    """One K per cycle for a batch that drafts and verifies together.

    The batch's K maximises the expected tokens of all its rows per second of a [B, K+1]
    cycle (``choose_k`` over every row's acceptance estimate, each row's own); the probe
    schedule is the batch's (one K = 1 probe tests every row at once). Before any row has
    evidence K is at most ``start_k`` (the rows' estimates are the prior then). The caller owns the rows' estimates and
    feeds them what each cycle did (``AcceptanceEstimate.observe``).
    """

    max_k: int
    start_k: int
    probe: Prober = field(default_factory=Prober)

    def next_k(
        self,
        estimates: Sequence[AcceptanceEstimate],
        costs: CostTable,
        bound: int,
        batch: int,
        zero_queued: bool = False,
    ) -> int:
        """K for the batch's next cycle; ``bound`` caps it (the most any row may still use).

        ``zero_queued``: the engine has already queued a K = 0 step, which drafting would
        throw away, so K > 0 must beat K = 0 by ``LEAVE_ZERO_MARGIN`` (probes still run)."""
        self.probe.cap = probe_interval_cap(costs, batch, self.probe.budget)
        bound = max(0, min(self.max_k, bound))
        rates = [e.rates() for e in estimates]
        margin = LEAVE_ZERO_MARGIN if zero_queued else 0.0
        k = choose_k(rates, costs, bound, batch=batch, leave_zero_margin=margin)
        if k > 0 and not any(e.informed for e in estimates):
            # Nothing known yet (no draft tried, no earlier request to start from): the
            # card's default K, unless the costs at this batch size say drafting does not pay
            # even at the prior acceptance (a large batch). The flat prior's 0.5 would start
            # shallower than the card's hand-tuned K, and a request lasts only tens of cycles.
            k = min(self.start_k, bound)
        return self.probe.after_choice(k, bound)

    def observe(self, k: int, rows: Sequence[tuple[int, int]]) -> None:
        """A cycle ran at ``k``; ``rows``: each unpinned row's (drafts it tried, accepted)."""
        if k > 0:
            self.probe.after_cycle(any(n > 0 for _, n in rows))

    def stays_at_zero(self) -> bool:
        """After a K = 0 cycle: will the next one be K = 0 too, unless something changes?"""
        return not self.probe.probe_due_next()


def probe_interval_cap(costs: CostTable, batch: int = 1, budget: float = PROBE_BUDGET) -> int:
    """The longest wait between K = 1 probes: probes cost ``budget`` of the time."""
    zero = costs.cycle_s(batch, 0)
    extra = max(costs.cycle_s(batch, 1) - zero, 0.0) / zero if zero > 0 else 1.0
    cap = math.ceil(extra / budget)
    return max(MIN_PROBE_INTERVAL, min(cap, MAX_PROBE_INTERVAL))
