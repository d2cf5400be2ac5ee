"""A reference model of how a tenant's billing period and plan follow from
what Stripe has told us -- written from Stripe's rules and the README's
"Billing periods", independently of the SQL and C that implement them.

Stripe's rules:
- a subscription bills in periods whose boundaries are its billing cycle
  anchor plus k intervals (1 month or 12 months), the anchor's day clamped
  to the length of each month (an anchor on the 31st bills on Feb 28 or
  29, then on Mar 31); the current period is exactly as Stripe last told
  us, the ones before and after it step from the anchor;
- a trial is a period of its own, ending at the anchor;
- past_due keeps the paid plan for the grace period, counted from the
  first failed attempt of the oldest unpaid invoice (else the period's
  start), then Free limits apply in the same period; an invoice paid after
  the subscription fell past_due ends the grace period;
- incomplete (waiting for the first payment), unpaid and paused get Free
  limits; incomplete also bills in Free periods;
- an ended subscription is never revived, and its end always wins over
  older states; otherwise the newest state (by Stripe's time) wins;
- Free bills in calendar months (UTC), except around a paid subscription
  that ended: its last period runs to its end, then one period runs from
  that end to the start of the next calendar month; the calendar month in
  which its last period began ends there (periods never overlap).

A Knowledge holds what a tenant's mirror has learnt (the events delivered
so far, in whatever order); `plan_and_period(k, at)` is the model's answer.
"""
import calendar
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

UTC = timezone.utc
LIVE = ("trialing", "active", "past_due", "unpaid", "paused")
TERMINAL = ("canceled", "incomplete_expired")


def add_months(t, months):
    """t + months, the day clamped to the target month's length."""
    y, m = divmod(t.month - 1 + months, 12)
    y += t.year
    m += 1
    return t.replace(year=y, month=m, day=min(t.day, calendar.monthrange(y, m)[1]))


def month_start(t):
    return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class Sub:
    """One state of a Stripe subscription, as an event carries it."""
    id: str
    status: str
    plan: str               # professional | enterprise
    interval: str           # month | year
    cps: datetime
    cpe: datetime
    anchor: datetime
    at: datetime            # the event's created time (Stripe's)
    cancel_at_period_end: bool = False
    trial_end: datetime = None
    ended_at: datetime = None

    @property
    def step(self):
        return 12 if self.interval == "year" else 1


@dataclass(frozen=True)
class Inv:
    """One state of an invoice of a subscription."""
    id: str
    sub: str
    status: str             # open | paid
    failed_at: datetime     # first failed attempt (None when none)
    paid_at: datetime
    at: datetime


@dataclass
class Knowledge:
    subs: dict = field(default_factory=dict)     # id -> newest Sub that applies
    order: list = field(default_factory=list)    # ids in the order first learnt
    invs: dict = field(default_factory=dict)     # id -> newest Inv
    first_failed: dict = field(default_factory=dict)   # invoice id -> earliest failure learnt
    grace: timedelta = timedelta(days=7)

    def learn(self, obj):
        if isinstance(obj, Sub):
            old = self.subs.get(obj.id)
            if old is None:
                self.subs[obj.id] = obj
                self.order.append(obj.id)
            elif old.status in TERMINAL and obj.status not in TERMINAL:
                pass                                  # never revived
            elif obj.status in TERMINAL and old.status not in TERMINAL:
                self.subs[obj.id] = obj               # its end always wins
            elif obj.at > old.at:
                self.subs[obj.id] = obj
        else:
            if obj.failed_at is not None:
                prev = self.first_failed.get(obj.id)
                self.first_failed[obj.id] = obj.failed_at if prev is None else min(prev, obj.failed_at)
            old = self.invs.get(obj.id)
            if old is None or obj.at > old.at:
                self.invs[obj.id] = obj

    def copy(self):
        return Knowledge(dict(self.subs), list(self.order), dict(self.invs), dict(self.first_failed), self.grace)

    # -- answers ------------------------------------------------------------

    def current(self):
        live = [self.subs[i] for i in self.order if self.subs[i].status not in TERMINAL]
        return live[-1] if live else None

    def last_ended(self):
        ended = [self.subs[i] for i in self.order
                 if self.subs[i].status == "canceled" and self.subs[i].cpe > self.subs[i].cps]
        return max(ended, key=lambda s: s.cpe) if ended else None

    def grace_until(self, s):
        """The end of the grace period of past_due subscription s, or None
        when no grace period runs (a payment after it fell past_due)."""
        unpaid = [i for i in self.invs.values()
                  if i.sub == s.id and i.status == "open" and self.first_failed.get(i.id) is not None]
        paid_after = [i for i in self.invs.values()
                      if i.sub == s.id and i.status == "paid" and (i.paid_at or i.at) >= s.at]
        if not unpaid and paid_after:
            return None
        since = min(self.first_failed[i.id] for i in unpaid) if unpaid else s.cps
        return since + self.grace


def stripe_period(s, at):
    """The period of subscription state s containing `at`."""
    if s.cps <= at < s.cpe:
        return s.cps, s.cpe
    anchor = s.anchor or (s.cps if add_months(s.cps, s.step) == s.cpe else s.cpe)
    if at >= s.cpe:
        # boundaries after the current period, stepped from the anchor
        k = 0
        while add_months(anchor, k * s.step) > s.cpe:
            k -= 1
        while add_months(anchor, k * s.step) <= s.cpe:
            k += 1
        start, end = s.cpe, add_months(anchor, k * s.step)
        while at >= end:
            start, k = end, k + 1
            end = add_months(anchor, k * s.step)
        return start, end
    k = 0
    while add_months(anchor, k * s.step) < s.cps:
        k += 1
    while add_months(anchor, k * s.step) >= s.cps:
        k -= 1
    start, end = add_months(anchor, k * s.step), s.cps
    while at < start:
        end, k = start, k - 1
        start = add_months(anchor, k * s.step)
    return start, end


def free_period(k, at):
    x = k.last_ended()
    if x is not None and x.cps <= at < x.cpe:
        return x.cps, x.cpe
    if x is not None and at >= x.cpe:
        nxt = add_months(month_start(x.cpe), 1)
        if at < nxt:
            return x.cpe, nxt
    start = month_start(at)
    end = add_months(start, 1)
    if x is not None and at < x.cps < end:
        end = x.cps          # periods never overlap: the month ends where x's last period began
    return start, end


def plan_and_period(k, at):
    """(plan, period_start, period_end) for usage at `at`, as the model
    says from what the mirror knows."""
    s = k.current()
    plan = "free"
    if s is not None:
        if s.status in ("active", "trialing"):
            plan = s.plan
        elif s.status == "past_due":
            g = k.grace_until(s)
            if g is None or at < g:
                plan = s.plan
    if s is not None and s.status != "incomplete":
        return (plan, *stripe_period(s, at))
    return (plan, *free_period(k, at))


def with_(obj, **kw):
    return replace(obj, **kw)
