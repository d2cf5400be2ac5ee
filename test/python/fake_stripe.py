"""A stateful fake of the part of Stripe's API qes_billing uses.

stripe-mock (Stripe's own) validates requests but keeps no state; this fake
keeps customers, products, prices, subscriptions, invoices, payment intents
and webhook endpoints in the shapes of API version 2024-06-20, so flows can
be followed end to end:

- Idempotency-Key: the same key with the same parameters replays the first
  answer (status and body); with other parameters it is a 400
  idempotency_error.  (Requests are processed one at a time, so Stripe's
  409 for a key still in flight does not arise here; the worker's handling
  of 409 is tested in pg_regress.)
- Faults, injected at a chosen rate: 500 before doing anything, 500 after
  doing it (the answer is lost, the object exists), 429 with Retry-After,
  a timeout (no answer within the client's timeout) and a dropped
  connection after doing it.  Retrying with the same key must then
  converge to exactly one object per logical request.
- Payments: confirming a payment intent with pm_card_visa succeeds, with
  pm_card_chargeDeclined is declined (402 card_error).  A customer's saved
  card pays subscription changes (payment_behavior=error_if_incomplete
  refuses the change when it is declined).
- An echoing endpoint (`echo`, the share of requests it answers, like a
  misconfigured proxy in front of Stripe): the request's headers, the
  Authorization with our secret key among them, come back in the answer --
  in turn a JSON 500 (retried), a JSON 400 (a final failure), an HTML 502
  and a JSON 200 (a "success" that is no Stripe object).
- Events: every state change appends an event (the 16 the endpoint
  subscribes to) to `events`; `signed(event, secret)` gives the body and
  Stripe-Signature header to deliver it with.
- A clock: every time the fake stamps (objects' and events' `created`,
  periods) is `now()`, the real clock shifted by `set_clock(at)`, so that a
  test sets the fake and the billing clock (Cluster.set_clock) to the same
  date (over HTTP: POST /_fake/clock {"at": <Unix seconds> | null}).
  Signatures and the request log keep the real clock (webhook signatures
  are checked against it).

Run standalone (make run uses it):  python3 fake_stripe.py --port 12112
"""
import argparse
import hashlib
import hmac
import json
import random
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

API_VERSION = "2024-06-20"


def new_id(prefix):
    return f"{prefix}_{secrets.token_hex(8)}"


def parse_form(text):
    """Stripe's bracket notation back into nested dicts and lists."""
    root = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = None if last else parts[i + 1]
            if isinstance(node, list):
                if part == "":
                    if last:
                        node.append(value)
                        break
                    node.append({} if nxt not in ("",) and not nxt.isdigit() else [])
                    node = node[-1]
                    continue
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if (nxt == "" or nxt.isdigit()) else {}
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    if part not in node:
                        node[part] = [] if (nxt == "" or nxt.isdigit()) else {}
                    node = node[part]
    return root


class StripeError(Exception):
    def __init__(self, status, type_, message, code=None, decline_code=None, param=None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {k: v for k, v in {"type": type_, "message": message, "code": code,
                                                 "decline_code": decline_code, "param": param}.items()
                               if v is not None}}


class FakeStripe:
    def __init__(self, fault_rate=0.0, seed=None, timeout_s=3.0, delay_s=0.0):
        self.lock = threading.RLock()
        self.delay_s = delay_s     # every answer waits this long (a slow Stripe)
        self.delay_after_s = 0.0   # ... and this long after the request was carried out
        self.rand = random.Random(seed)
        self.fault_rate = fault_rate
        self.timeout_s = timeout_s
        self.objects = {}          # id -> object
        self.idem = {}             # key -> (params digest, status, body) or "busy"
        self.events = []
        self.creates = {}          # object type -> count of objects created
        self.requests = []         # (method, path, idempotency key, status, time)
        self.faults = {}           # kind -> count
        self.customer_cards = {}   # customer id -> payment method id
        self.echo = 0.0            # share of requests answered by an echoing endpoint
        self.echoed = 0
        self.server = None
        self.clock_offset = 0.0    # seconds now() runs ahead of the real clock
        # Billing meters: events by identifier (Stripe refuses a repeat within
        # its dedup window), those reported later as errors (asynchronous),
        # and a switch that forgets idempotency keys of meter events (as if
        # they had expired: only the identifier deduplicates then)
        self.meter_events = {}     # identifier -> event
        self.meter_errors = []     # the events Stripe reports as errors later
        self.meter_dedup_s = 24 * 3600
        self.meter_forget_keys = False
        self.meter_repeats = 0     # events refused as repeats of an identifier
        self.cancellations = {}    # subscription id -> the parameters of each DELETE (cancel now)
        self.meter_refuse = set()  # customers whose meter events are refused at once (a 400)

    # ---- the clock ----------------------------------------------------

    def now(self):
        """The fake's time in Unix seconds (an int, as Stripe stamps)."""
        return int(time.time() + self.clock_offset)

    def set_clock(self, at):
        """Make now() read `at` (a timezone-aware datetime or Unix seconds)
        from here on; it runs on with the real clock, like the billing clock."""
        at = at.timestamp() if hasattr(at, "timestamp") else float(at)
        self.clock_offset = at - time.time()

    def reset_clock(self):
        self.clock_offset = 0.0

    # ---- objects ------------------------------------------------------

    def _created(self, obj):
        self.objects[obj["id"]] = obj
        self.creates[obj["object"]] = self.creates.get(obj["object"], 0) + 1
        return obj

    def _event(self, type_, obj, previous=None):
        ev = {"id": new_id("evt"), "object": "event", "api_version": API_VERSION, "created": self.now(),
              "livemode": False, "type": type_, "pending_webhooks": 1,
              "request": {"id": None, "idempotency_key": None},
              "data": {"object": json.loads(json.dumps(obj))}}
        if previous:
            ev["data"]["previous_attributes"] = previous
        self.events.append(ev)
        return ev

    def get(self, oid, type_=None):
        obj = self.objects.get(oid)
        if obj is None or (type_ and obj["object"] != type_):
            raise StripeError(404, "invalid_request_error", f"No such {type_ or 'object'}: '{oid}'",
                              code="resource_missing")
        return obj

    def of_type(self, type_):
        return [o for o in self.objects.values() if o["object"] == type_]

    # ---- endpoints ----------------------------------------------------

    def handle(self, method, path, params):
        parts = [p for p in path.split("/") if p][1:]     # drop "v1"
        name = parts[0] if parts else ""
        if method == "GET" and parts == ["balance"]:
            return {"object": "balance", "available": [{"amount": 0, "currency": "usd"}], "livemode": False}
        if name == "customers":
            if method == "POST" and len(parts) == 1:
                c = self._created({"id": new_id("cus"), "object": "customer", "created": self.now(),
                                   "email": params.get("email"), "name": params.get("name"),
                                   "metadata": params.get("metadata", {}), "livemode": False,
                                   "invoice_settings": {"default_payment_method": None}})
                self._event("customer.created", c)
                return c
            if method == "GET" and len(parts) == 2:
                return self.get(parts[1], "customer")
            if method == "GET" and len(parts) == 1:
                return self._list("customer", params, email=params.get("email"))
            if method == "POST" and len(parts) == 2:
                return self._update_customer(self.get(parts[1], "customer"), params)
            if method == "POST" and len(parts) == 3 and parts[2] == "tax_ids":
                return self._create_tax_id(self.get(parts[1], "customer"), params)
        if name == "products":
            if method == "GET" and len(parts) == 2:
                return self.get(parts[1], "product")
            if method == "POST" and len(parts) == 1:
                pid = params.get("id") or new_id("prod")
                if pid in self.objects:
                    raise StripeError(400, "invalid_request_error", f"Product already exists.",
                                      code="resource_already_exists", param="id")
                return self._created({"id": pid, "object": "product", "name": params["name"], "active": True,
                                      "description": params.get("description"),
                                      "metadata": params.get("metadata", {}), "created": self.now()})
        if name == "prices":
            if method == "GET" and len(parts) == 1:
                keys = params.get("lookup_keys", [])
                data = [p for p in self.of_type("price") if (not keys or p["lookup_key"] in keys)]
                return {"object": "list", "url": "/v1/prices", "has_more": False,
                        "data": sorted(data, key=lambda p: -p["created"])[:int(params.get("limit", 10))]}
            if method == "POST" and len(parts) == 1:
                self.get(params["product"], "product")
                key = params.get("lookup_key")
                if key:
                    holders = [p for p in self.of_type("price") if p["lookup_key"] == key]
                    if holders and params.get("transfer_lookup_key") != "true":
                        raise StripeError(400, "invalid_request_error",
                                          f"A price with lookup key {key} already exists.", param="lookup_key")
                    for p in holders:
                        p["lookup_key"] = None
                rec = params.get("recurring")
                if rec and rec.get("usage_type") == "metered":
                    if not rec.get("meter"):
                        raise StripeError(400, "invalid_request_error", "A metered price needs a meter.",
                                          param="recurring[meter]")
                    self.get(rec["meter"], "billing.meter")
                return self._created({
                    "id": new_id("price"), "object": "price", "active": True, "currency": params["currency"],
                    "unit_amount": int(params["unit_amount"]) if "unit_amount" in params else None,
                    "unit_amount_decimal": params.get("unit_amount_decimal"),
                    "billing_scheme": params.get("billing_scheme", "per_unit"),
                    "tiers_mode": params.get("tiers_mode"), "tiers": params.get("tiers"),
                    "product": params["product"], "lookup_key": key,
                    "recurring": {"interval": rec["interval"], "interval_count": 1,
                                  "usage_type": rec.get("usage_type", "licensed"),
                                  "meter": rec.get("meter")} if rec else None,
                    "type": "recurring" if rec else "one_time", "metadata": params.get("metadata", {}),
                    "tax_behavior": params.get("tax_behavior", "unspecified"),
                    "created": self.now() * 1000 + len(self.objects)})
        if name == "webhook_endpoints":
            if method == "GET" and len(parts) == 1:
                data = [dict(w, secret=None) for w in self.of_type("webhook_endpoint")]
                for w in data:
                    del w["secret"]
                return {"object": "list", "url": "/v1/webhook_endpoints", "has_more": False, "data": data}
            if method == "POST" and len(parts) == 1:
                w = self._created({"id": new_id("we"), "object": "webhook_endpoint", "url": params["url"],
                                   "enabled_events": params["enabled_events"], "status": "enabled",
                                   "api_version": params.get("api_version"), "livemode": False,
                                   "secret": "whsec_" + secrets.token_hex(16),
                                   "description": params.get("description"), "metadata": params.get("metadata", {})})
                return w
            if method == "POST" and len(parts) == 2:
                w = self.get(parts[1], "webhook_endpoint")
                if "enabled_events" in params:
                    w["enabled_events"] = params["enabled_events"]
                if params.get("disabled") == "false":
                    w["status"] = "enabled"
                return {k: v for k, v in w.items() if k != "secret"}
        if name == "billing":
            return self._billing(method, parts[1:], params)
        if name == "subscriptions":
            if method == "POST" and len(parts) == 1:
                return self._create_subscription(params)
            if method == "GET" and len(parts) == 2:
                return self._expand(self.get(parts[1], "subscription"), params)
            if method == "GET" and len(parts) == 1:
                return self._list("subscription", params, customer=params.get("customer"))
            if method == "POST" and len(parts) == 2:
                return self._update_subscription(self.get(parts[1], "subscription"), params)
            if method == "DELETE" and len(parts) == 2:
                return self._cancel_subscription(self.get(parts[1], "subscription"), params)
        if name == "invoices":
            if method == "GET" and len(parts) == 2:
                return self.get(parts[1], "invoice")
        if name == "payment_intents":
            if method == "POST" and len(parts) == 1:
                self.get(params["customer"], "customer")
                pi = self._payment_intent(int(params["amount"]), params["currency"], params["customer"],
                                          params.get("description"), params.get("metadata", {}), None)
                return pi
            if method == "GET" and len(parts) == 2:
                return self.get(parts[1], "payment_intent")
            if method == "POST" and len(parts) == 3 and parts[2] == "confirm":
                return self.confirm(parts[1], params.get("payment_method", "pm_card_visa"))
        if name == "tax" and method == "POST" and parts[1:] == ["calculations"]:
            return self._tax_calculation(params)
        if name == "tax" and method == "POST" and parts[1:] == ["transactions", "create_from_calculation"]:
            calc = self.get(params["calculation"], "tax.calculation")
            return self._created({"id": new_id("tax"), "object": "tax.transaction", "reference": params["reference"],
                                  "customer": calc["customer"], "amount_total": calc["amount_total"],
                                  "created": self.now(), "livemode": False})
        if name == "disputes":
            if method == "GET" and len(parts) == 2:
                return self.get(parts[1], "dispute")
            if method == "POST" and len(parts) == 2:
                return self._update_dispute(self.get(parts[1], "dispute"), params)
        raise StripeError(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

    # ---- tax ------------------------------------------------------------

    # postal codes Stripe Tax cannot place (the fake's rule: all zeros)
    def _update_customer(self, c, p):
        """POST /v1/customers/{id}: name, address, tax_exempt; with
        tax[validate_location]=immediately a location that cannot be taxed is
        refused at once (customer_tax_location_invalid)."""
        addr = p.get("address")
        if addr is not None:
            if p.get("tax", {}).get("validate_location") == "immediately" and \
                    (not addr.get("postal_code") or set(addr["postal_code"]) <= {"0"} or not addr.get("country")):
                raise StripeError(400, "invalid_request_error",
                                  "The customer's location isn't recognized. Provide a valid address.",
                                  code="customer_tax_location_invalid", param="address[postal_code]")
            c["address"] = addr
            c["tax"] = {"automatic_tax": "supported", "ip_address": None,
                        "location": {"country": addr.get("country"), "source": "billing_address"}}
        for key in ("name", "tax_exempt"):
            if key in p:
                c[key] = p[key]
        self._event("customer.updated", c)
        return c

    def _create_tax_id(self, c, p):
        if p.get("type") != "eu_vat":
            raise StripeError(400, "invalid_request_error", "Invalid tax id type.", param="type")
        t = self._created({"id": new_id("txi"), "object": "tax_id", "customer": c["id"], "type": "eu_vat",
                           "value": p["value"], "country": p["value"][:2].replace("EL", "GR"),
                           "created": self.now(), "livemode": False,
                           "verification": {"status": "pending", "verified_name": None, "verified_address": None}})
        self._event("customer.tax_id.created", t)
        return t

    def _tax_calculation(self, p):
        """POST /v1/tax/calculations for one customer: exclusive tax at its
        country's rate, none under reverse charge; no location: refused."""
        cust = self.get(p["customer"], "customer")
        country = (cust.get("address") or {}).get("country")
        if not country:
            raise StripeError(400, "invalid_request_error", "The customer's location isn't recognized.",
                              code="customer_tax_location_invalid", param="customer")
        amount = sum(int(li["amount"]) for li in p["line_items"])
        reverse = cust.get("tax_exempt") == "reverse"
        rate = 0 if reverse else self.VAT.get(country, 0)
        tax = amount * rate // 100
        return self._created({
            "id": new_id("taxcalc"), "object": "tax.calculation", "customer": cust["id"], "currency": p["currency"],
            "amount_total": amount + tax, "tax_amount_exclusive": tax, "tax_amount_inclusive": 0,
            "tax_breakdown": [{"amount": tax, "inclusive": False, "taxable_amount": amount,
                               "taxability_reason": "reverse_charge" if reverse else "standard_rated",
                               "tax_rate_details": {"country": country, "percentage_decimal": f"{rate}.0"}}],
            "livemode": False})

    def verify_tax_id(self, tax_id, status, name=None):
        """The tax authority's answer arrives (VIES): customer.tax_id.updated."""
        with self.lock:
            t = self.get(tax_id, "tax_id")
            t["verification"] = {"status": status, "verified_name": name, "verified_address": None}
            self._event("customer.tax_id.updated", t)
            return t

    # ---- disputes -----------------------------------------------------

    def dispute(self, charge_id, reason="fraudulent", due_in_s=7 * 86400):
        """The cardholder disputes a charge: charge.dispute.created, and the
        amount is withdrawn from the balance (charge.dispute.funds_withdrawn)."""
        with self.lock:
            ch = self.get(charge_id, "charge")
            dp = self._created({
                "id": new_id("dp"), "object": "dispute", "amount": ch["amount"], "currency": ch["currency"],
                "charge": ch["id"], "payment_intent": ch.get("payment_intent"), "reason": reason,
                "status": "needs_response", "created": self.now(), "livemode": False, "metadata": {},
                "is_charge_refundable": False, "evidence": {},
                "evidence_details": {"due_by": self.now() + due_in_s, "has_evidence": False,
                                     "past_due": False, "submission_count": 0}})
            ch["disputed"] = True
            self._event("charge.dispute.created", dp)
            self._event("charge.dispute.funds_withdrawn", dp)
            return dp

    def _update_dispute(self, dp, p):
        """POST /v1/disputes/{id}: evidence staged (submit=false) or submitted
        (the default); Stripe takes a submission once."""
        if dp["status"] not in ("needs_response", "warning_needs_response"):
            raise StripeError(400, "invalid_request_error",
                              "This dispute is already closed or under review.", param="submit")
        if dp["evidence_details"]["due_by"] <= self.now():
            raise StripeError(400, "invalid_request_error", "The deadline to respond has passed.")
        previous = {"evidence": dict(dp["evidence"])}
        dp["evidence"].update(p.get("evidence", {}))
        dp["metadata"].update(p.get("metadata", {}))
        dp["evidence_details"]["has_evidence"] = bool(dp["evidence"])
        if p.get("submit", "true") != "false":
            dp["status"] = "under_review" if dp["status"] == "needs_response" else "warning_under_review"
            dp["evidence_details"]["submission_count"] += 1
            previous["status"] = "needs_response"
        self._event("charge.dispute.updated", dp, previous)
        return dp

    def close_dispute(self, dispute_id, outcome):
        """The card network decides: won (the amount comes back:
        charge.dispute.funds_reinstated) or lost."""
        with self.lock:
            dp = self.get(dispute_id, "dispute")
            dp["status"] = outcome
            dp["evidence_details"]["due_by"] = 0 if outcome == "lost" else dp["evidence_details"]["due_by"]
            self._event("charge.dispute.closed", dp, {"status": "under_review"})
            if outcome == "won":
                self._event("charge.dispute.funds_reinstated", dp)
            return dp

    # ---- billing meters ---------------------------------------------------

    def _billing(self, method, parts, params):
        if parts == ["meters"] and method == "POST":
            if any(m["event_name"] == params["event_name"] for m in self.of_type("billing.meter")):
                raise StripeError(400, "invalid_request_error",
                                  f"A meter with event_name {params['event_name']} already exists.", param="event_name")
            return self._created({
                "id": new_id("mtr"), "object": "billing.meter", "created": self.now(), "livemode": False,
                "display_name": params["display_name"], "event_name": params["event_name"], "status": "active",
                "default_aggregation": {"formula": params["default_aggregation"]["formula"]},
                "customer_mapping": {"type": "by_id", "event_payload_key":
                                     params.get("customer_mapping", {}).get("event_payload_key", "stripe_customer_id")},
                "value_settings": {"event_payload_key":
                                   params.get("value_settings", {}).get("event_payload_key", "value")}})
        if parts == ["meters"] and method == "GET":
            data = sorted(self.of_type("billing.meter"), key=lambda m: -m["created"])
            return {"object": "list", "url": "/v1/billing/meters", "has_more": False,
                    "data": data[:int(params.get("limit", 10))]}
        if parts == ["meter_events"] and method == "POST":
            return self._meter_event(params)
        if parts == ["meter_event_adjustments"] and method == "POST":
            ident = params["cancel"]["identifier"]
            ev = self.meter_events.get(ident)
            if ev is None or ev["event_name"] != params["event_name"]:
                raise StripeError(400, "invalid_request_error", f"No meter event with identifier {ident}.")
            if self.now() - ev["received"] > 24 * 3600:
                raise StripeError(400, "invalid_request_error",
                                  "Meter events can only be cancelled within 24 hours of being received.")
            ev["cancelled"] = True
            return {"object": "billing.meter_event_adjustment", "event_name": params["event_name"],
                    "status": "pending", "type": "cancel", "cancel": {"identifier": ident}, "livemode": False}
        if len(parts) == 3 and parts[0] == "meters" and parts[2] == "event_summaries" and method == "GET":
            meter = self.get(parts[1], "billing.meter")
            start, end = int(params["start_time"]), int(params["end_time"])
            if start % 60 or end % 60:
                raise StripeError(400, "invalid_request_error", "start_time and end_time must be minute-aligned.")
            value = self.meter_value(meter["id"], params["customer"], start, end)
            return {"object": "list", "url": f"/v1/billing/meters/{meter['id']}/event_summaries", "has_more": False,
                    "data": [{"id": new_id("mtrusg"), "object": "billing.meter_event_summary",
                              "aggregated_value": float(value), "start_time": start, "end_time": end,
                              "livemode": False, "meter": meter["id"]}]}
        raise StripeError(404, "invalid_request_error",
                          f"Unrecognized request URL ({method}: /v1/billing/{'/'.join(parts)}).")

    def _meter_event(self, p):
        ident = p.get("identifier") or new_id("ident")
        if len(ident) > 100:
            raise StripeError(400, "invalid_request_error", "identifier is too long.", param="identifier")
        old = self.meter_events.get(ident)
        if old is not None and self.now() - old["received"] < self.meter_dedup_s:
            self.meter_repeats += 1
            raise StripeError(400, "invalid_request_error",
                              f"An event already exists with identifier {ident}.", param="identifier")
        if p.get("payload", {}).get("stripe_customer_id") in self.meter_refuse:
            raise StripeError(400, "invalid_request_error", "This customer cannot report usage to this meter.",
                              param="payload[stripe_customer_id]")
        ts = int(p.get("timestamp") or self.now())
        if ts < self.now() - 35 * 24 * 3600 or ts > self.now() + 300:
            raise StripeError(400, "invalid_request_error", "timestamp must be within the past 35 days.",
                              param="timestamp")
        value = p.get("payload", {}).get("value")
        if value is None or not str(value).isdigit():
            raise StripeError(400, "invalid_request_error", "payload[value] must be a whole number.",
                              param="payload[value]")
        ev = {"object": "billing.meter_event", "event_name": p["event_name"], "identifier": ident,
              "timestamp": ts, "payload": p["payload"], "created": self.now(), "livemode": False,
              "received": self.now(), "cancelled": False}
        self.meter_events[ident] = ev
        # asynchronous: accepted now, reported as an error later when nothing matches
        meters = [m for m in self.of_type("billing.meter") if m["event_name"] == p["event_name"]]
        customer = p["payload"].get("stripe_customer_id")
        if not meters or customer not in self.objects:
            ev["error"] = "no_meter" if not meters else "customer_not_found"
            self.meter_errors.append(ev)
        return {k: v for k, v in ev.items() if k not in ("received", "cancelled", "error")}

    def meter_value(self, meter_id, customer, start, end):
        # what Stripe's summary says: the sum, or the last value, of the
        # valid events not cancelled of a customer in [start, end)
        meter = self.get(meter_id, "billing.meter")
        evs = sorted((e for e in self.meter_events.values()
                      if e["event_name"] == meter["event_name"] and not e["cancelled"] and "error" not in e
                      and e["payload"].get("stripe_customer_id") == customer and start <= e["timestamp"] < end),
                     key=lambda e: (e["timestamp"], e["created"]))
        if meter["default_aggregation"]["formula"] == "last":
            return int(evs[-1]["payload"]["value"]) if evs else 0
        if meter["default_aggregation"]["formula"] == "count":
            return len(evs)
        return sum(int(e["payload"]["value"]) for e in evs)

    def _list(self, type_, params, **filters):
        """A list endpoint: newest first, filtered by equal fields, one page."""
        data = [o for o in self.of_type(type_) if all(v is None or o.get(k) == v for k, v in filters.items())]
        data.sort(key=lambda o: -o.get("created", 0))
        limit = int(params.get("limit", 10))
        return {"object": "list", "url": f"/v1/{type_}s", "has_more": len(data) > limit, "data": data[:limit]}

    def _payment_intent(self, amount, currency, customer, description, metadata, invoice):
        pi_id = new_id("pi")
        return self._created({
            "id": pi_id, "object": "payment_intent", "amount": amount, "currency": currency, "customer": customer,
            "description": description, "metadata": metadata, "invoice": invoice, "status": "requires_payment_method",
            "client_secret": f"{pi_id}_secret_{secrets.token_hex(8)}", "latest_charge": None,
            "last_payment_error": None, "livemode": False, "created": self.now()})

    def _invoice(self, sub, customer, amount, status="open", billing_reason="subscription_create"):
        now = self.now()
        inv = self._created({
            "id": new_id("in"), "object": "invoice", "customer": customer, "subscription": sub["id"],
            "status": status, "amount_due": amount, "amount_paid": 0, "amount_remaining": amount,
            "currency": "usd", "number": f"QES-{len(self.of_type('invoice')) + 1:05d}",
            "billing_reason": billing_reason, "period_start": now, "period_end": now, "created": now,
            "hosted_invoice_url": "https://invoice.stripe.test/i/" + secrets.token_hex(6),
            "invoice_pdf": "https://pay.stripe.test/invoice/" + secrets.token_hex(6) + "/pdf",
            "payment_intent": None, "metadata": {}, "livemode": False})
        if sub.get("automatic_tax", {}).get("enabled"):
            self._tax_invoice(inv, self.get(customer, "customer"), amount)
        self._event("invoice.created", inv)
        self._event("invoice.finalized", inv)
        return inv

    # VAT rates the fake's Stripe Tax knows (standard rates)
    VAT = {"DE": 19, "FR": 20, "NL": 21, "AT": 20, "IT": 22, "ES": 21, "BE": 21, "IE": 23, "PL": 23, "SE": 25}

    def _tax_invoice(self, inv, cust, amount):
        """Automatic tax on an invoice: exclusive tax at the customer's
        country's rate; reverse charge for tax_exempt=reverse; no location:
        finalized without tax and automatic tax switched off."""
        line = {"id": new_id("il"), "object": "line_item", "amount": amount, "description": "Subscription",
                "currency": "usd", "tax_amounts": []}
        country = (cust.get("address") or {}).get("country")
        if not country:
            inv["automatic_tax"] = {"enabled": False, "status": "requires_location_inputs",
                                    "disabled_reason": "finalization_requires_location_inputs", "liability": None}
            tax = 0
        else:
            inv["automatic_tax"] = {"enabled": True, "status": "complete", "disabled_reason": None, "liability": None}
            if cust.get("tax_exempt") == "reverse":
                tax = 0
                line["tax_amounts"] = [{"amount": 0, "inclusive": False, "tax_rate": "txr_reverse",
                                        "taxability_reason": "reverse_charge", "taxable_amount": amount}]
            else:
                rate = self.VAT.get(country, 0)
                tax = amount * rate // 100
                line["tax_amounts"] = [{"amount": tax, "inclusive": False, "tax_rate": f"txr_{country.lower()}_{rate}",
                                        "taxability_reason": "standard_rated", "taxable_amount": amount}]
        inv.update({"subtotal": amount, "tax": tax, "total": amount + tax, "total_excluding_tax": amount,
                    "amount_due": amount + tax, "amount_remaining": amount + tax,
                    "lines": {"object": "list", "data": [line], "has_more": False}})

    def _create_subscription(self, p):
        cust = self.get(p["customer"], "customer")
        price = self.get(p["items"][0]["price"], "price")
        now = self.now()
        sub = self._created({
            "id": new_id("sub"), "object": "subscription", "customer": cust["id"], "status": "incomplete",
            "cancel_at_period_end": False, "current_period_start": now,
            "current_period_end": now + (365 if price["recurring"]["interval"] == "year" else 30) * 86400,
            "trial_end": None, "metadata": p.get("metadata", {}), "livemode": False, "created": now,
            "items": {"object": "list", "data": [{"id": new_id("si"), "object": "subscription_item",
                                                  "price": price, "quantity": 1}]},
            "latest_invoice": None, "pending_update": None,
            "automatic_tax": {"enabled": p.get("automatic_tax", {}).get("enabled") == "true"}})
        for it in p["items"][1:]:          # metered items: no quantity
            sub["items"]["data"].append(self._metered_item(it))
        inv = self._invoice(sub, cust["id"], price["unit_amount"])
        pi = self._payment_intent(inv["amount_due"], "usd", cust["id"], None, {}, inv["id"])
        inv["payment_intent"] = pi["id"]
        sub["latest_invoice"] = inv["id"]
        self._event("customer.subscription.created", sub)
        return self._expand(sub, p)

    def _metered_item(self, it):
        price = self.get(it["price"], "price")
        if not price.get("recurring") or price["recurring"].get("usage_type") != "metered":
            raise StripeError(400, "invalid_request_error", "Only one licensed price per subscription here.",
                              param="items")
        if "quantity" in it:
            raise StripeError(400, "invalid_request_error", "A metered price takes no quantity.",
                              param="items[][quantity]")
        return {"id": new_id("si"), "object": "subscription_item", "price": price}

    def _expand(self, sub, p):
        out = json.loads(json.dumps(sub))
        exp = p.get("expand", [])
        if any(e.startswith("latest_invoice") for e in exp) and out["latest_invoice"]:
            inv = json.loads(json.dumps(self.objects[out["latest_invoice"]]))
            if "latest_invoice.payment_intent" in exp and inv.get("payment_intent"):
                inv["payment_intent"] = self.objects[inv["payment_intent"]]
            out["latest_invoice"] = inv
        return out

    def _charge(self, pi, pm):
        declined = pm == "pm_card_chargeDeclined"
        ch = self._created({"id": new_id("ch"), "object": "charge", "amount": pi["amount"], "currency": pi["currency"],
                            "customer": pi["customer"], "payment_intent": pi["id"], "invoice": pi.get("invoice"),
                            "status": "failed" if declined else "succeeded", "paid": not declined,
                            "failure_code": "card_declined" if declined else None,
                            "failure_message": "Your card was declined." if declined else None,
                            "metadata": pi.get("metadata", {}), "livemode": False, "created": self.now()})
        pi["latest_charge"] = ch["id"]
        if declined:
            pi["status"] = "requires_payment_method"
            pi["last_payment_error"] = {"type": "card_error", "code": "card_declined",
                                        "decline_code": "generic_decline", "message": "Your card was declined."}
            self._event("charge.failed", ch)
            self._event("payment_intent.payment_failed", pi)
        else:
            pi["status"] = "succeeded"
            pi["last_payment_error"] = None
            self._event("charge.succeeded", ch)
            self._event("payment_intent.succeeded", pi)
        return not declined

    def confirm(self, pi_id, pm):
        """What Stripe.js does with the client secret on the front end."""
        with self.lock:
            pi = self.get(pi_id, "payment_intent")
            if pi["status"] == "succeeded":
                return pi
            ok = self._charge(pi, pm)
            if pi.get("invoice"):
                inv = self.objects[pi["invoice"]]
                sub = self.objects[inv["subscription"]]
                if ok:
                    self._pay_invoice(inv)
                    self.customer_cards[pi["customer"]] = pm
                    if sub["status"] in ("incomplete", "past_due"):
                        prev = sub["status"]
                        sub["status"] = "active"
                        self._event("customer.subscription.updated", sub, {"status": prev})
                else:
                    self._event("invoice.payment_failed", inv)
            if not ok:
                raise StripeError(402, "card_error", "Your card was declined.", code="card_declined",
                                  decline_code="generic_decline")
            return pi

    def _pay_invoice(self, inv):
        inv.update(status="paid", amount_paid=inv["amount_due"], amount_remaining=0)
        self._event("invoice.paid", inv)

    def _update_subscription(self, sub, p):
        previous = {}
        items = p.get("items")
        if items:
            new_price = self.get(items[0]["price"], "price")
            old_price = sub["items"]["data"][0]["price"]
            if items[0].get("id") != sub["items"]["data"][0]["id"]:
                raise StripeError(400, "invalid_request_error", "No such subscription item", param="items[0][id]")
            proration = p.get("proration_behavior", "create_prorations")
            diff = new_price["unit_amount"] - old_price["unit_amount"]
            if proration == "always_invoice" and diff > 0:
                pm = self.customer_cards.get(sub["customer"])
                inv = self._invoice(sub, sub["customer"], diff, billing_reason="subscription_update")
                pi = self._payment_intent(diff, "usd", sub["customer"], None, {}, inv["id"])
                inv["payment_intent"] = pi["id"]
                if pm is None or not self._charge(pi, pm):
                    self._event("invoice.payment_failed", inv)
                    if p.get("payment_behavior") == "error_if_incomplete":
                        raise StripeError(402, "card_error", "Your card was declined.", code="card_declined",
                                          decline_code="generic_decline")
                else:
                    self._pay_invoice(inv)
                sub["latest_invoice"] = inv["id"]
            previous["items"] = json.loads(json.dumps(sub["items"]))
            sub["items"]["data"][0]["price"] = new_price
            for it in items[1:]:
                if it.get("deleted") == "true":
                    if not any(d["id"] == it.get("id") for d in sub["items"]["data"][1:]):
                        raise StripeError(400, "invalid_request_error", "No such subscription item",
                                          param="items[][id]")
                    sub["items"]["data"] = [d for d in sub["items"]["data"] if d["id"] != it["id"]]
                else:
                    sub["items"]["data"].append(self._metered_item(it))
            if new_price["recurring"]["interval"] != old_price["recurring"]["interval"]:
                now = self.now()
                sub["current_period_start"] = now
                sub["current_period_end"] = now + (365 if new_price["recurring"]["interval"] == "year" else 30) * 86400
        if "cancel_at_period_end" in p:
            previous["cancel_at_period_end"] = sub["cancel_at_period_end"]
            sub["cancel_at_period_end"] = p["cancel_at_period_end"] == "true"
        if "metadata" in p:
            sub["metadata"].update(p["metadata"])
        self._event("customer.subscription.updated", sub, previous)
        return self._expand(sub, p)

    def _cancel_subscription(self, sub, p):
        """DELETE /v1/subscriptions/{id}: canceled at once.  As Stripe:
        invoice_now (default false) issues a final invoice for the metered
        usage not yet invoiced (and, with prorate, a credit for the unused
        time of the licensed item); without it that usage is never billed.
        The parameters each cancel came with are kept in self.cancellations."""
        if sub["status"] in ("canceled", "incomplete_expired"):
            raise StripeError(400, "invalid_request_error",
                              f"No such subscription: '{sub['id']}' is already canceled.", param="id")
        self.cancellations.setdefault(sub["id"], []).append(dict(p))
        now = self.now()
        if p.get("invoice_now") == "true":
            usage = 0
            for it in sub["items"]["data"][1:]:
                price = it["price"]
                used = self.meter_value(price["recurring"]["meter"], sub["customer"], sub["current_period_start"], now + 1)
                usage += int(used * float(price.get("unit_amount_decimal") or price.get("unit_amount") or 0))
            if p.get("prorate") == "true":
                licensed = sub["items"]["data"][0]["price"]["unit_amount"] or 0
                span = max(1, sub["current_period_end"] - sub["current_period_start"])
                usage -= licensed * max(0, sub["current_period_end"] - now) // span
            inv = self._invoice(sub, sub["customer"], max(0, usage), status="open" if usage > 0 else "paid",
                                billing_reason="subscription_cycle")
            inv["final_for_cancel"] = True
            sub["latest_invoice"] = inv["id"]
        sub.update(status="canceled", canceled_at=now, ended_at=now, cancel_at_period_end=False)
        self._event("customer.subscription.deleted", sub)
        return self._expand(sub, p)

    # ---- HTTP ---------------------------------------------------------

    def serve(self, port=0):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", new_id("req"))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

            def _serve(self, method):
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if url.path.startswith("/_fake/"):
                    return self._control(method, url.path, body)
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer sk_test_"):
                    return self._answer(401, {"error": {"type": "authentication_error",
                                                        "message": "Invalid API Key provided."}})
                if fake.echo and fake.echo_now():
                    return self._echo(method, body)
                params = parse_form(url.query if method in ("GET", "DELETE") else body)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                key = self.headers.get("Idempotency-Key") if method == "POST" else None
                status, out, extra = fake.process(method, url.path, params, key, body)
                fake.requests.append((method, url.path, key, status, time.time()))
                if fake.delay_after_s:
                    time.sleep(fake.delay_after_s)
                if status == "timeout":
                    time.sleep(fake.timeout_s)
                    return self._drop()
                if status == "drop":
                    return self._drop()
                self._answer(status, out, extra)

            def _echo(self, method, body):
                """What an endpoint that echoes the request answers (see echo_now)."""
                headers = dict(self.headers.items())
                seen = f"{method} {self.path}\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
                mode = fake.echo_modes[fake.echoed % len(fake.echo_modes)]
                fake.echoed += 1
                fake.faults["echo_" + mode] = fake.faults.get("echo_" + mode, 0) + 1
                if mode == "html_502":
                    data = f"<html><body><h1>502 Bad Gateway</h1><pre>{seen}</pre></body></html>".encode()
                    self.send_response(502)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if mode == "json_500":
                    return self._answer(500, {"error": {"type": "api_error", "message": "upstream failed: " + seen,
                                                        "request": {"headers": headers, "body": body}}})
                if mode == "json_400":
                    return self._answer(400, {"error": {"type": "invalid_request_error",
                                                        "message": "bad request: " + seen, "headers": headers}})
                return self._answer(200, {"object": "echo", "method": method, "path": self.path,
                                          "headers": headers, "body": body})

            def _control(self, method, path, body):
                if path == "/_fake/confirm":
                    p = json.loads(body)
                    try:
                        return self._answer(200, fake.confirm(p["payment_intent"], p["payment_method"]))
                    except StripeError as e:
                        return self._answer(e.status, e.body)
                if path == "/_fake/faults":
                    fake.fault_rate = float(json.loads(body)["rate"])
                    return self._answer(200, {"rate": fake.fault_rate})
                if path == "/_fake/delay":
                    # {"after_ms": n}: carry requests out, then wait n ms before answering
                    fake.delay_after_s = float(json.loads(body).get("after_ms", 0)) / 1000.0
                    return self._answer(200, {"after_ms": fake.delay_after_s * 1000.0})
                if path == "/_fake/stats":
                    return self._answer(200, {"creates": fake.creates, "requests": fake.requests,
                                              "faults": fake.faults})
                if path == "/_fake/events":
                    return self._answer(200, {"data": fake.events})
                if path == "/_fake/objects":
                    # an object as Stripe has it, for a test that hands the
                    # worker events about objects it did not make here
                    o = json.loads(body)
                    with fake.lock:
                        fake.objects[o["id"]] = o
                    return self._answer(200, o)
                if path == "/_fake/clock":
                    at = json.loads(body or "{}").get("at")     # Unix seconds; null: the real clock
                    if at is None:
                        fake.reset_clock()
                    else:
                        fake.set_clock(at)
                    return self._answer(200, {"now": fake.now()})
                return self._answer(404, {"error": {"type": "invalid_request_error", "message": "no such control"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    echo_modes = ("json_500", "json_400", "html_502", "json_200")

    def echo_now(self):
        with self.lock:
            return self.rand.random() < self.echo

    def process(self, method, path, params, key, raw):
        """Returns (status | 'timeout' | 'drop', body, extra headers)."""
        digest = hashlib.sha256(f"{method} {path} {raw}".encode()).hexdigest()
        fault = None
        with self.lock:
            if self.fault_rate and self.rand.random() < self.fault_rate:
                fault = self.rand.choice(["500_before", "500_after", "429", "timeout", "drop_after"])
                self.faults[fault] = self.faults.get(fault, 0) + 1
            if fault == "500_before":
                return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
            if fault == "429":
                return 429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                       "message": "Too many requests"}}, [("Retry-After", "1")]
            if key is not None and self.meter_forget_keys and path == "/v1/billing/meter_events":
                key = None         # as if the key had expired
            if key is not None and key in self.idem:
                first = self.idem[key]
                if first[0] != digest:
                    return 400, {"error": {"type": "idempotency_error",
                                           "message": "Keys for idempotent requests can only be used with the "
                                                      "same parameters they were first used with."}}, []
                status, body = first[1], first[2]
                extra = [("Idempotent-Replayed", "true")]
            else:
                try:
                    status, body = 200, self.handle(method, path, params)
                except StripeError as e:
                    status, body = e.status, e.body
                if key is not None and status != 500:
                    self.idem[key] = (digest, status, json.loads(json.dumps(body)))
                extra = []
                if status == 402:
                    extra.append(("Stripe-Should-Retry", "false"))
            if fault == "500_after":
                return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
            if fault == "timeout":
                return "timeout", None, []
            if fault == "drop_after":
                return "drop", None, []
            return status, body, extra


def signed(event, secret, at=None):
    body = json.dumps(event)
    t = int(at or time.time())
    sig = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return body, f"t={t},v1={sig}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=12112)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    fake = FakeStripe(fault_rate=args.fault_rate, delay_s=args.delay_ms / 1000.0)
    print(fake.serve(args.port), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
