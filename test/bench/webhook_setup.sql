-- Webhook benchmark fixtures: 100,000 distinct signed events of ~3 KB (an
-- invoice.paid with line items, as Stripe sends it), signed with pgcrypto
-- beforehand so signing is not measured; and the ceiling's plain table.
CREATE EXTENSION IF NOT EXISTS pgcrypto;
DROP TABLE IF EXISTS bench_events, bench_plain_events;
CREATE TABLE bench_events AS
SELECT n, body, 't=4102444800,v1=' || encode(hmac('4102444800.' || body, 'whsec_bench_secret', 'sha256'), 'hex') AS header
  FROM (SELECT n, json_build_object(
          'id', 'evt_bench_' || n, 'object', 'event', 'api_version', '2024-06-20', 'created', 1700000000 + n,
          'livemode', false, 'pending_webhooks', 1, 'type', 'invoice.paid',
          'request', json_build_object('id', 'req_' || md5(n::text), 'idempotency_key', md5('k' || n)),
          'data', json_build_object('object', json_build_object(
            'id', 'in_bench_' || n, 'object', 'invoice', 'customer', 'cus_bench_' || (1 + n % 100),
            'status', 'paid', 'currency', 'usd', 'amount_due', 2900, 'amount_paid', 2900, 'amount_remaining', 0,
            'created', 1700000000 + n, 'period_start', 1700000000, 'period_end', 1702592000,
            'number', 'QES-' || n, 'hosted_invoice_url', 'https://invoice.stripe.com/i/acct_1/' || md5(n::text),
            'invoice_pdf', 'https://pay.stripe.com/invoice/acct_1/' || md5(n::text) || '/pdf',
            'lines', json_build_object('object', 'list', 'has_more', false, 'data',
              (SELECT json_agg(json_build_object('id', 'il_' || md5(n::text || l), 'object', 'line_item',
                                                 'amount', 2900, 'currency', 'usd',
                                                 'description', '1 x Professional (at $29.00 / month)',
                                                 'period', json_build_object('start', 1700000000, 'end', 1702592000),
                                                 'pricing', json_build_object('price_details', json_build_object(
                                                    'price', 'price_professional_monthly', 'product', 'prod_professional')),
                                                 'quantity', 1, 'metadata', json_build_object()))
                 FROM generate_series(1, 6) l)))))::text AS body
          FROM generate_series(1, 100000) n) x;
ALTER TABLE bench_events ADD PRIMARY KEY (n);
DROP SEQUENCE IF EXISTS bench_intake_seq, bench_plain_seq;
CREATE SEQUENCE bench_intake_seq;
CREATE SEQUENCE bench_plain_seq;
CREATE TABLE bench_plain_events (stripe_event_id text PRIMARY KEY, payload json NOT NULL,
                                 received_at timestamptz NOT NULL DEFAULT now());
