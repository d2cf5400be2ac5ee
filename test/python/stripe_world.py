"""A Stripe world for the chaos test: tenants' lifecycles as Stripe
produces them, their events, and Stripe's final state, served over HTTP.

Objects start from stripe-mock's fixtures (the newest API shapes, fetched at
run time) and are rendered per event either in that shape ("new": the
period on the subscription item, the invoice's subscription under
`parent`, no payment intent named on either side of an invoice payment) or
in the pinned version's (2024-06-20: the period on the subscription, the
invoice's `subscription` and `payment_intent`, the payment intent's and the
charge's `invoice`).  Each event carries the object as it was at the event,
as Stripe's do.  Periods are Stripe's: the billing cycle anchor plus k
intervals, the anchor's day clamped to each month's length.

`World.serve()` answers the mirror's GETs (/v1/<objects>/<id>, in the pinned
version qes_billing sends) and the list endpoints reconciliation reads, with
the final state (every event lies in the past: Stripe answers what is true
now).  It counts the GETs of each object (`gets`, `gets_of(copy)`), so a
test can bound them: a mirror that asked Stripe for everything on every
event would converge too, at the price of a GET per event.
`World.expected(copy)` is what the mirror must hold after every event:
table by table, in the terms of qes_billing's tables.
"""
import calendar
import collections
import copy
import json
import random
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

DAY = 86400
PRICES = {"professional_monthly": 2900, "professional_yearly": 29000,
          "enterprise_monthly": 9900, "enterprise_yearly": 99000}
GRACE = 7 * DAY


def add_months(ts, months):
    """Stripe's boundary: ts + months, the day clamped to the month's length."""
    d = datetime.fromtimestamp(ts, timezone.utc)
    y, m = divmod(d.month - 1 + months, 12)
    y += d.year
    m += 1
    return int(d.replace(year=y, month=m, day=min(d.day, calendar.monthrange(y, m)[1])).timestamp())


class World:
    def __init__(self, fx, t0, now, seed=7):
        self.fx = fx
        self.t0 = t0
        self.now = now
        self.rand = random.Random(seed)
        self.objects = {}            # id -> canonical object (final state)
        self.shape = {}              # tenant -> "pinned" | "new"
        self.events = {}             # copy -> [event]
        self.first_failed = {}       # invoice id -> created of its first invoice.payment_failed
        self.trial_notices = set()   # (tenant, subscription id, trial_end)
        self.requests = []           # (method, path) the mirror sent
        self.gets = collections.Counter()   # object id -> GETs of it (/v1/<objects>/<id>)
        self.lock = threading.Lock()
        self.server = None

    # ---- objects -----------------------------------------------------------

    def _base(self, fixture, **kw):
        o = copy.deepcopy(self.fx[fixture])
        o.update(kw)
        self.objects[o["id"]] = o
        return o

    def customer(self, tenant, cid, t):
        return self._base("customer", id=cid, created=t, metadata={"tenant_id": tenant}, email=None, name=tenant,
                          deleted=False)

    def subscription(self, tenant, sid, cus, key, start, anchor, status, trial_end=None):
        o = self._base("subscription", id=sid, customer=cus, status=status, created=start, billing_cycle_anchor=anchor,
                       cancel_at_period_end=False, cancel_at=None, canceled_at=None, ended_at=None,
                       trial_end=trial_end, trial_start=start if trial_end else None,
                       metadata={"tenant_id": tenant}, latest_invoice=None)
        self._price(o, key)
        self._period(o, start, trial_end or add_months(anchor, 12 if key.endswith("yearly") else 1))
        return o

    def _price(self, sub, key):
        item = sub["items"]["data"][0]
        item["price"] = dict(copy.deepcopy(item["price"]), id=f"price_{key}", lookup_key=key,
                             unit_amount=PRICES[key])
        item["price"]["recurring"] = dict(item["price"]["recurring"], interval="year" if key.endswith("yearly") else "month")
        item["id"] = f"si_{sub['id'][4:]}"
        item["subscription"] = sub["id"]

    def _period(self, sub, start, end):
        item = sub["items"]["data"][0]
        item["current_period_start"], item["current_period_end"] = start, end

    def period(self, sub):
        item = sub["items"]["data"][0]
        return item["current_period_start"], item["current_period_end"]

    def key(self, sub):
        return sub["items"]["data"][0]["price"]["lookup_key"]

    def invoice(self, tenant, iid, sub, amount, t, reason):
        ps, pe = self.period(sub)
        o = self._base("invoice", id=iid, customer=sub["customer"], status="draft", created=t, amount_due=amount,
                       amount_paid=0, amount_remaining=amount, currency="usd", number=f"N-{iid[3:]}",
                       billing_reason=reason, attempt_count=0, attempted=False, period_start=ps, period_end=pe,
                       hosted_invoice_url=f"https://invoice.stripe.test/{iid}", invoice_pdf=None,
                       next_payment_attempt=None, metadata={},
                       status_transitions={"finalized_at": None, "paid_at": None, "voided_at": None,
                                           "marked_uncollectible_at": None})
        o["parent"] = {"type": "subscription_details", "quote_details": None,
                       "subscription_details": {"subscription": sub["id"], "metadata": {"tenant_id": tenant}}}
        o["lines"] = {"object": "list", "data": [], "has_more": False, "url": f"/v1/invoices/{iid}/lines"}
        o["_payment_intent"] = None      # the link, rendered per shape
        return o

    def payment_intent(self, pid, cus, amount, t, invoice=None):
        o = self._base("payment_intent", id=pid, customer=cus, amount=amount, currency="usd", created=t,
                       status="requires_payment_method", latest_charge=None, last_payment_error=None,
                       metadata={}, description=None)
        o["_invoice"] = invoice
        return o

    def charge(self, chid, pi, t, ok):
        o = self._base("charge", id=chid, customer=pi["customer"], payment_intent=pi["id"], amount=pi["amount"],
                       currency="usd", created=t, status="succeeded" if ok else "failed", paid=ok,
                       failure_code=None if ok else "card_declined",
                       failure_message=None if ok else "Your card was declined.", metadata={})
        o["_invoice"] = pi.get("_invoice")
        return o

    # ---- rendering ---------------------------------------------------------

    def render(self, o, shape):
        r = copy.deepcopy(o)
        obj = r.get("object")
        inv = r.pop("_invoice", None)
        pi = r.pop("_payment_intent", None)
        if shape == "pinned":
            if obj == "subscription":
                ps, pe = self.period(o)
                r["current_period_start"], r["current_period_end"] = ps, pe
                for it in r["items"]["data"]:
                    it.pop("current_period_start", None)
                    it.pop("current_period_end", None)
            elif obj == "invoice":
                r["subscription"] = r["parent"]["subscription_details"]["subscription"]
                r["subscription_details"] = {"metadata": r["parent"]["subscription_details"]["metadata"]}
                r.pop("parent", None)
                r["payment_intent"] = pi
            elif obj in ("payment_intent", "charge"):
                r["invoice"] = inv
        return r

    # ---- events ------------------------------------------------------------

    def emit(self, copy_, tenant, type_, o, t):
        evs = self.events.setdefault(copy_, [])
        shape = self.shape[tenant]
        evs.append({"id": f"evt_{copy_}_{len(evs):06d}", "object": "event",
                    "api_version": "2024-06-20" if shape == "pinned" else "2025-03-31.basil",
                    "created": t, "livemode": False, "type": type_,
                    "data": {"object": self.render(o, shape)}, "pending_webhooks": 1,
                    "request": {"id": None, "idempotency_key": None}})

    # ---- a tenant's life ---------------------------------------------------

    def lifecycle(self, copy_, i):
        T = f"{copy_}{i}"
        self.shape[T] = "new" if i % 2 else "pinned"
        ev = lambda type_, o, t: self.emit(copy_, T, type_, o, t)   # noqa: E731
        n = [0]

        def nid(prefix):
            n[0] += 1
            return f"{prefix}_{T}x{n[0]}"

        t = self.t0 + (i % 23) * 3607
        cus = self.customer(T, f"cus_{T}a", t)
        ev("customer.created", cus, t)
        if i % 10 == 3:     # events about someone else's customer, interleaved
            other = self._base("customer", id=f"cus_foreign{T}", created=t, metadata={})
            ev("customer.created", other, t)
            fpi = self.payment_intent(f"pi_foreign{T}", other["id"], 1000, t + 5)
            fpi["status"] = "succeeded"
            ev("payment_intent.succeeded", fpi, t + 5)

        def pay(inv, sub, when, ok=True, first=False):
            """An attempt to pay an invoice (its payment intent, reused by every
            attempt, as Stripe does; a charge per attempt), in one second."""
            if inv["_payment_intent"]:
                pi = self.objects[inv["_payment_intent"]]
            else:
                pi = self.payment_intent(nid("pi"), inv["customer"], inv["amount_due"], when, inv["id"])
                inv["_payment_intent"] = pi["id"]
            ch = self.charge(nid("ch"), pi, when, ok)
            pi["latest_charge"] = ch["id"]
            inv["attempt_count"] += 1
            inv["attempted"] = True
            if ok:
                pi["status"] = "succeeded"
                inv.update(status="paid", amount_paid=inv["amount_due"], amount_remaining=0)
                inv["status_transitions"]["paid_at"] = when
                ev("charge.succeeded", ch, when)
                ev("payment_intent.succeeded", pi, when)
                ev("invoice.paid", inv, when)
            else:
                pi["status"] = "requires_payment_method"
                pi["last_payment_error"] = {"type": "card_error", "code": "card_declined",
                                            "decline_code": "insufficient_funds", "message": "Declined."}
                ev("charge.failed", ch, when)
                ev("payment_intent.payment_failed", pi, when)
                ev("invoice.payment_failed", inv, when)
                self.first_failed.setdefault(inv["id"], when)
            return ch

        def new_invoice(sub, when, reason, amount=None):
            inv = self.invoice(T, nid("in"), sub, PRICES[self.key(sub)] if amount is None else amount, when, reason)
            ev("invoice.created", inv, when)
            inv["status"] = "open"
            inv["status_transitions"]["finalized_at"] = when
            ev("invoice.finalized", inv, when)
            sub["latest_invoice"] = inv["id"]
            return inv

        def subscribe(cus, when, key="professional_monthly", trial=False):
            sid = nid("sub")
            if trial:
                trial_end = when + 14 * DAY
                sub = self.subscription(T, sid, cus["id"], key, when, trial_end, "trialing", trial_end)
                ev("customer.subscription.created", sub, when)
                self.trial_notices.add((T, sid, trial_end))
                ev("customer.subscription.trial_will_end", sub, trial_end - 3 * DAY)
                return sub, None
            sub = self.subscription(T, sid, cus["id"], key, when, when, "incomplete")
            ev("customer.subscription.created", sub, when)
            inv = new_invoice(sub, when, "subscription_create")
            if i % 13 == 4:       # the first payment is declined, then a good card
                pay(inv, sub, when + 40, ok=False, first=True)
            ch = pay(inv, sub, when + 60)
            sub["status"] = "active"
            ev("customer.subscription.updated", sub, when + 60)
            return sub, ch

        sub, first_charge = subscribe(cus, t + 60, trial=(i % 5 == 1))
        if first_charge is not None and i % 5 == 0:
            at = t + 5 * DAY if i % 10 == 0 else first_charge["created"]
            dp = self._base("dispute", id=f"dp_{T}", charge=first_charge["id"], payment_intent=None,
                            amount=first_charge["amount"], currency="usd", reason="fraudulent",
                            status="needs_response", created=at)
            first_charge["disputed"] = True
            ev("charge.dispute.created", dp, at)
            if i % 10 == 5:
                # in the same second as its charge and sent before it: even in order, before its charge
                evs = self.events[copy_]
                dispute = evs.pop()
                k = next(j for j, e in enumerate(evs) if e["type"] == "charge.succeeded"
                         and e["data"]["object"]["id"] == first_charge["id"])
                evs.insert(k, dispute)

        end = self.now - 2 * DAY
        events_done = set()
        while True:
            ps, pe = self.period(sub)
            # things that happen inside this period
            mid = ps + (pe - ps) // 3
            if sub["status"] in ("active", "past_due") and mid < end:
                if i % 4 == 0 and "up" not in events_done and ps > self.t0 + 20 * DAY:
                    events_done.add("up")
                    key = self.key(sub).replace("professional", "enterprise")
                    self._price(sub, key)
                    inv = new_invoice(sub, mid, "subscription_update", amount=7000)
                    ev("customer.subscription.updated", sub, mid)
                    pay(inv, sub, mid)
                    if i % 9 == 0:      # and back down later in the period
                        self._price(sub, key.replace("enterprise", "professional"))
                        ev("customer.subscription.updated", sub, mid + 5 * DAY)
                elif i % 6 == 0 and "switch" not in events_done and ps > self.t0 + 10 * DAY:
                    events_done.add("switch")
                    self._price(sub, self.key(sub).replace("monthly", "yearly"))
                    sub["billing_cycle_anchor"] = mid
                    self._period(sub, mid, add_months(mid, 12))
                    inv = new_invoice(sub, mid, "subscription_update")
                    ev("customer.subscription.updated", sub, mid)
                    pay(inv, sub, mid)
                    continue
                elif i % 8 == 3 and "cancel" not in events_done and ps > self.t0 + 15 * DAY:
                    events_done.add("cancel")
                    sub.update(status="canceled", canceled_at=mid, ended_at=mid)
                    ev("customer.subscription.deleted", sub, mid)
                    cus_now = cus
                    if i % 16 == 11:    # the customer is deleted too, and comes back as a new one
                        cus["deleted"] = True
                        ev("customer.deleted", cus, mid + 3600)
                        cus_now = self.customer(T, f"cus_{T}b", mid + DAY)
                        ev("customer.created", cus_now, mid + DAY)
                    sub, _ = subscribe(cus_now, mid + 2 * DAY)
                    continue
                elif i % 7 == 5 and "end" not in events_done:
                    events_done.add("end")
                    sub["cancel_at_period_end"] = True
                    sub["cancel_at"] = pe
                    ev("customer.subscription.updated", sub, mid)
            if pe >= end:
                break
            if sub["cancel_at_period_end"]:
                sub.update(status="canceled", canceled_at=mid, ended_at=pe)
                ev("customer.subscription.deleted", sub, pe)
                break
            # renewal at the period's end (a trial's end too)
            anchor = sub["billing_cycle_anchor"]
            step = 12 if self.key(sub).endswith("yearly") else 1
            k = 1
            while add_months(anchor, k * step) <= pe:
                k += 1
            self._period(sub, pe, add_months(anchor, k * step))
            was = sub["status"]
            sub["status"] = "active" if was in ("active", "trialing") else was
            if was == "trialing":
                sub["trial_end"] = sub["trial_end"]
            ev("customer.subscription.updated", sub, pe)
            inv = new_invoice(sub, pe, "subscription_cycle")
            fails = (i + k) % 7 == 0 or (i % 11 == 0 and add_months(pe, step) >= end)
            if not fails:
                pay(inv, sub, pe + 3600)
                continue
            # the renewal's payment fails at once (the same second as the renewal)
            pay(inv, sub, pe, ok=False)
            sub["status"] = "past_due"
            ev("customer.subscription.updated", sub, pe)
            recover = pe + 3600 + (2 + i % 4) * DAY
            if i % 11 == 0 or recover >= end:
                break           # still unpaid at the end
            pay(inv, sub, recover)
            sub["status"] = "active"
            ev("customer.subscription.updated", sub, recover)
        return T

    # ---- what the mirror must hold ------------------------------------------

    def of(self, copy_, type_):
        return [o for oid, o in self.objects.items() if o.get("object") == type_ and f"_{copy_}" in oid]

    def expected(self, copy_):
        """Stripe's final state in qes_billing's terms, with the copy's name
        taken out of every id."""
        strip = lambda s: s.replace(copy_, "", 1) if isinstance(s, str) else s   # noqa: E731
        subs, invs, pays, disputes, custs, tenants = [], [], [], [], [], {}
        for s in self.of(copy_, "subscription"):
            tenant = s["metadata"]["tenant_id"]
            ps, pe = self.period(s)
            key = self.key(s)
            grace = None
            if s["status"] == "past_due":
                failed = [self.first_failed[i["id"]] for i in self.of(copy_, "invoice")
                          if i["parent"]["subscription_details"]["subscription"] == s["id"]
                          and i["status"] == "open" and i["id"] in self.first_failed]
                grace = min(failed) + GRACE
            subs.append((strip(tenant), strip(s["id"]), key.split("_")[0], "year" if key.endswith("yearly") else "month",
                         s["status"], s["cancel_at_period_end"], ps, pe, grace,
                         s["ended_at"] if s["status"] == "canceled" else None))
        for inv in self.of(copy_, "invoice"):
            sub = self.objects[inv["parent"]["subscription_details"]["subscription"]]
            invs.append((strip(sub["metadata"]["tenant_id"]), strip(inv["id"]), inv["status"], inv["amount_due"],
                         inv["amount_paid"], inv["amount_remaining"], strip(sub["id"]),
                         self.first_failed.get(inv["id"])))
        for pi in self.of(copy_, "payment_intent"):
            if "foreign" in pi["id"]:
                continue
            tenant = self._tenant_of_customer(pi["customer"])
            pays.append((strip(tenant), strip(pi["id"]), "subscription" if pi.get("_invoice") else "one_time",
                         "succeeded" if pi["status"] == "succeeded" else "failed", pi["amount"],
                         strip(pi["latest_charge"]), strip(pi.get("_invoice"))))
        for dp in self.of(copy_, "dispute"):
            ch = self.objects[dp["charge"]]
            disputes.append((strip(self._tenant_of_customer(ch["customer"])), strip(dp["id"]), strip(dp["charge"])))
        for c in self.of(copy_, "customer"):
            if "foreign" in c["id"]:
                continue
            tenant = c["metadata"]["tenant_id"]
            custs.append((strip(tenant), strip(c["id"]), c["deleted"]))
            if not c["deleted"] and (tenant not in tenants or c["created"] > tenants[tenant][1]):
                tenants[tenant] = (c["id"], c["created"])
        ten = [(strip(t), strip(c[0]), any(d[0] == strip(t) for d in disputes)) for t, c in tenants.items()]
        for t in {c["metadata"]["tenant_id"] for c in self.of(copy_, "customer") if "foreign" not in c["id"]}:
            if t not in tenants:
                ten.append((strip(t), None, any(d[0] == strip(t) for d in disputes)))
        # a failure is told only if it still holds when the mirror learns it:
        # every event here lies days in the past, so only the invoices still
        # unpaid now (docs/architecture.md, "Mirroring Stripe")
        notes = [(strip(i[0]), "payment.failed", "tenant") for i in invs if i[7] is not None and i[2] == "open"]
        notes += [(d[0], "dispute.created", "operator") for d in disputes]
        notes += [(strip(t), "subscription.trial_will_end", "tenant") for t, s, e in self.trial_notices if copy_ in t]
        return {"subscriptions": sorted(subs, key=repr), "invoices": sorted(invs, key=repr),
                "payments": sorted(pays, key=repr), "disputes": sorted(disputes, key=repr),
                "stripe_customers": sorted(custs, key=repr), "tenants": sorted(ten, key=repr),
                "notifications": sorted(notes, key=repr)}

    def objects_of(self, copy_):
        """The Stripe objects of one copy (foreign customers' aside), by type."""
        out = collections.Counter()
        for oid, o in self.objects.items():
            if f"_{copy_}" in oid and "foreign" not in oid:
                out[o.get("object")] += 1
        return out

    def gets_of(self, copy_):
        """The GETs of single objects of one copy: {object id: GETs}."""
        with self.lock:
            return {oid: n for oid, n in self.gets.items() if f"_{copy_}" in oid}

    def _tenant_of_customer(self, cid):
        return self.objects[cid]["metadata"]["tenant_id"]

    # ---- HTTP: what qes_billing asks Stripe ---------------------------------

    COLLECTIONS = {"subscriptions": "subscription", "invoices": "invoice", "customers": "customer",
                   "charges": "charge", "payment_intents": "payment_intent", "disputes": "dispute"}

    def all_events(self):
        return [e for evs in self.events.values() for e in evs]

    def answer(self, method, path, query):
        parts = [p for p in path.split("/") if p][1:]
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        with self.lock:
            self.requests.append((method, path))
            if method != "GET" or not parts or (parts[0] not in self.COLLECTIONS and parts[0] != "events"):
                return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({path})"}}
            if parts[0] == "events":
                if len(parts) != 1:
                    return 404, {"error": {"type": "invalid_request_error", "message": "No such event"}}
                # Stripe's event log: 30 days, newest first, by type and creation
                types = {v for k, v in pairs if k == "types[]"}
                gte = int(params.get("created[gte]", 0))
                data = [e for e in self.all_events()
                        if e["created"] >= max(gte, self.now - 30 * DAY) and (not types or e["type"] in types)]
            else:
                type_ = self.COLLECTIONS[parts[0]]
                if len(parts) == 2:
                    self.gets[parts[1]] += 1
                    o = self.objects.get(parts[1])
                    if o is None or o.get("object") != type_:
                        return 404, {"error": {"type": "invalid_request_error", "code": "resource_missing",
                                               "message": f"No such {type_}: '{parts[1]}'"}}
                    if type_ == "customer" and o.get("deleted"):
                        return 200, {"id": o["id"], "object": "customer", "deleted": True}
                    return 200, self.render(o, "pinned")
                data = [o for o in self.objects.values() if o.get("object") == type_]
                for f in ("customer", "charge", "payment_intent"):
                    if f in params:
                        data = [o for o in data if o.get(f) == params[f]]
                data = [self.render(o, "pinned") for o in data]
            data.sort(key=lambda o: (-o["created"], o["id"]))
            if "starting_after" in params:
                ids = [o["id"] for o in data]
                data = data[ids.index(params["starting_after"]) + 1:] if params["starting_after"] in ids else []
            limit = int(params.get("limit", 10))
            return 200, {"object": "list", "url": path, "has_more": len(data) > limit, "data": data[:limit]}

    def serve(self):
        world = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                status, body = world.answer("GET", url.path, url.query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b'{"error": {"type": "invalid_request_error", "message": "read-only world"}}'
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
