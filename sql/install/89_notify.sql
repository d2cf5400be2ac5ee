-- Delivering billing.notifications: email over SMTP and a signed webhook to
-- the platform, sent by the worker through libcurl (src/notify.c).  The
-- protocol is the outbox's (docs/architecture.md, "One notification"):
--
--   billing.notify_claim()   the worker claims due rows (FOR UPDATE SKIP
--                            LOCKED): each is checked (one that no longer
--                            applies is skipped with its reason), rendered,
--                            marked in_flight; COMMIT; only then is it sent
--   billing.notify_record()  each channel's outcome, in a new transaction:
--                            sent when every channel delivered, else back
--                            to pending with backoff, or failed (audited)
--                            after qes_billing.notify_max_attempts or a
--                            permanent refusal (SMTP 5xx)
--
-- Delivery is at least once: a crash between sending and recording sends
-- again, with the same event_id (the webhook's "id" and QES-Event-Id, the
-- email's Message-ID and X-QES-Event-Id), so receivers can deduplicate.  A
-- channel that delivered is never sent again for the notification.
--
-- Where notifications are queued: usage thresholds (src/usage.c), trial
-- ending and the operator's dispute alert (85_events.sql), payment failed
-- and payment recovered (billing.sync_invoice_failure, 85_events.sql: once
-- per invoice, decided from Stripe's times), grace ended
-- (billing.notify_timers, below).
--
-- What a notification says must hold as Stripe has it when it goes out,
-- not only as the mirror has it (docs/architecture.md, "Mirroring Stripe"):
-- one about a subscription whose mirrored state is older than the moment it
-- is about -- a grace period's end, a trial about to end, learnt from late
-- or replayed events -- waits for one GET of the subscription first
-- (billing.notify_checked, verify_requests), so that events the mirror has
-- not had yet cannot make what the tenant is told depend on their order.

-- ---- formatting ----------------------------------------------------------

-- An amount in the smallest unit of its currency, as people read it.
CREATE FUNCTION billing.notify_money(p_amount bigint, p_currency text) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_amount IS NULL OR p_currency IS NULL THEN NULL
            WHEN lower(p_currency) IN ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg', 'rwf',
                                       'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf')
              THEN upper(p_currency) || ' ' || to_char(p_amount, 'FM999,999,999,999,990')
            ELSE upper(p_currency) || ' ' || to_char(p_amount / 100.0, 'FM999,999,999,999,990.00') END;
COMMENT ON FUNCTION billing.notify_money(bigint, text) IS
  'An amount in the smallest currency unit as text, e.g. USD 29.00 (zero-decimal currencies without decimals).';

CREATE FUNCTION billing.notify_utc(p_at timestamptz) RETURNS text
  LANGUAGE sql STABLE
RETURN to_char(p_at AT TIME ZONE 'UTC', 'FMDD FMMonth YYYY, HH24:MI "UTC"');
COMMENT ON FUNCTION billing.notify_utc(timestamptz) IS 'A time as notifications show it, in UTC.';

CREATE FUNCTION billing.notify_html(p text) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN replace(replace(replace(replace(replace(p, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), '"', '&quot;'), '''', '&#39;');
COMMENT ON FUNCTION billing.notify_html(text) IS 'Text escaped for HTML.';

-- A quantity of a metric: storage in bytes as a size, counters as numbers.
CREATE FUNCTION billing.notify_quantity(p_metric text, p_quantity bigint) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN CASE WHEN p_quantity IS NULL THEN 'unlimited'
            WHEN (SELECT m.unit FROM billing.metrics m WHERE m.metric = p_metric) = 'byte'
              THEN pg_size_pretty(p_quantity)
            ELSE to_char(p_quantity, 'FM999,999,999,999,999,990') END;

CREATE FUNCTION billing.notify_metric_label(p_metric text) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN CASE p_metric WHEN 'api_calls' THEN 'API calls' WHEN 'storage' THEN 'storage'
                     ELSE coalesce((SELECT m.unit || 's' FROM billing.metrics m WHERE m.metric = p_metric), p_metric) END;

-- A plan's limits in one line: "10 signatures, 50 documents, 1,000 API calls, 1024 MB storage".
CREATE FUNCTION billing.notify_plan_limits(p_plan text) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT string_agg(billing.notify_quantity(l.metric, l.soft_limit) || ' ' || billing.notify_metric_label(l.metric),
                    ', ' ORDER BY m.kind, l.metric DESC)
    FROM billing.plan_limits l JOIN billing.metrics m USING (metric)
   WHERE l.plan_id = p_plan
$$;

-- ---- templates -----------------------------------------------------------

-- The template of each kind: subject, headline, paragraphs (what happened,
-- what it means for the limits, what to do) and an action, with
-- {{placeholders}} filled from billing.notify_vars().  Both parts of the
-- email and the webhook's text are rendered from it.
CREATE FUNCTION billing.notify_template(p_kind text) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN CASE p_kind
  WHEN 'usage.threshold' THEN jsonb_build_object(
    'subject', '{{percent}} % of your {{metric_label}} used ({{plan_name}} plan)',
    'headline', 'You have used {{percent}} % of the {{metric_label}} in your plan',
    'paragraphs', jsonb_build_array(
      '{{tenant_name}} has used {{used}} of the {{limit}} {{metric_label}} included in the {{plan_name}} plan in the billing period from {{period_start}} to {{period_end}}.',
      '{{meaning}}',
      '{{todo}}'),
    'action', '{{action_label}}')
  WHEN 'payment.failed' THEN jsonb_build_object(
    'subject', 'Payment of {{amount}} failed{{subject_deadline}}',
    'headline', 'We could not collect your payment',
    'paragraphs', jsonb_build_array(
      'The payment of {{amount}} for invoice {{invoice_number}} of {{tenant_name}} failed.',
      '{{meaning}}',
      'Please pay the invoice or update your payment method{{todo_deadline}}.'),
    'action', 'Pay invoice {{invoice_number}}')
  WHEN 'grace.ended' THEN jsonb_build_object(
    'subject', 'Your grace period has ended: Free plan limits apply',
    'headline', 'Your account now has the Free plan''s limits',
    'paragraphs', jsonb_build_array(
      'The grace period after the failed payment of {{amount}} for invoice {{invoice_number}} ended on {{grace_until}}, and the invoice is still unpaid.',
      'The {{plan_name}} limits no longer apply to {{tenant_name}}: from now on the Free plan''s limits do ({{free_limits}} per period). Usage above them is reported as over the limit.',
      'Pay the open invoice to have the {{plan_name}} limits back at once.'),
    'action', 'Pay invoice {{invoice_number}}')
  WHEN 'payment.recovered' THEN jsonb_build_object(
    'subject', 'Payment received: your {{plan_name}} plan is fully restored',
    'headline', 'Thank you: your payment went through',
    'paragraphs', jsonb_build_array(
      'We received {{amount}} for invoice {{invoice_number}} of {{tenant_name}}.',
      'The {{plan_name}} limits apply again: {{plan_limits}} per period.',
      'Nothing else to do.'),
    'action', 'View your invoices')
  WHEN 'subscription.trial_will_end' THEN jsonb_build_object(
    'subject', 'Your {{plan_name}} trial ends on {{trial_end}}',
    'headline', 'Your trial ends soon',
    'paragraphs', jsonb_build_array(
      'The {{plan_name}} trial of {{tenant_name}} ends on {{trial_end}}.',
      'After it the subscription goes on at {{price}} per {{interval}} and keeps the {{plan_name}} limits ({{plan_limits}} per period). If the first payment fails, they stay for a grace period, then the Free plan''s limits apply ({{free_limits}}).',
      'Check your payment method before {{trial_end}}, or cancel the subscription to stay on the Free plan.'),
    'action', 'Manage your subscription')
  WHEN 'dispute.created' THEN jsonb_build_object(
    'subject', '[QES billing] Dispute of {{amount}} by tenant {{tenant_id}}',
    'headline', 'A payment was disputed',
    'paragraphs', jsonb_build_array(
      'Tenant {{tenant_name}} ({{tenant_id}}) disputed a card payment of {{amount}} (dispute {{dispute}}, charge {{charge}}, reason: {{reason}}).',
      'The tenant''s limits are unchanged; the tenant is flagged as disputed. Stripe holds the amount and the dispute fee until the dispute is decided.',
      'Respond with evidence in the Stripe Dashboard before the deadline Stripe shows.'),
    'action', 'Open the dispute in Stripe')
  ELSE jsonb_build_object(
    'subject', 'Billing notice: {{kind}}',
    'headline', 'Billing notice: {{kind}}',
    'paragraphs', jsonb_build_array('{{payload}}'),
    'action', 'Open billing')
END;
COMMENT ON FUNCTION billing.notify_template(text) IS
  'The template of a notification kind: subject, headline, paragraphs (what happened, what it means for the limits, what to do), action.';

-- Fill {{name}} placeholders in one pass (a value is never read as a
-- template); unknown names become empty.  p_html escapes the values.
CREATE FUNCTION billing.notify_fill(p_template text, p_vars jsonb, p_html boolean DEFAULT false) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(string_agg(CASE WHEN t.n % 2 = 1 THEN CASE WHEN p_html THEN billing.notify_html(t.part) ELSE t.part END
                                  WHEN p_html THEN billing.notify_html(coalesce(p_vars ->> t.part, ''))
                                  ELSE coalesce(p_vars ->> t.part, '') END, '' ORDER BY t.n), '')
    FROM regexp_split_to_table(p_template, '\{\{|\}\}') WITH ORDINALITY AS t(part, n)
$$;

-- ---- what a notification says, and whether it still applies -------------

-- Does the mirror vouch for an object's state (a subscription, an invoice)
-- as of p_as_of?  NULL: yes -- its state is as of then, or fresh, or Stripe
-- was asked for it (once per notification and object): what the answer
-- mirrored, or the mirror's own when there was none.  {"verify": {object,
-- id}}: ask Stripe first; {"defer": reason}: the answer is on its way;
-- {"skip": reason}: Stripe has no such object.
CREATE FUNCTION billing.notify_checked(n billing.notifications, p_object text, p_id text,
                                       p_state_at timestamptz, p_as_of timestamptz) RETURNS jsonb
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r billing.stripe_requests;
BEGIN
  IF p_state_at >= least(p_as_of, billing.now() - billing.fresh_within())
     OR p_id IS NULL OR p_id !~ '^[a-z]{2,4}_[A-Za-z0-9_]+$' THEN
    RETURN NULL;   -- vouched for, or nothing Stripe could be asked about
  END IF;
  SELECT * INTO r FROM billing.stripe_requests x
   WHERE x.request_id = ANY (n.verify_requests)
     AND x.path = CASE p_object WHEN 'subscription' THEN '/v1/subscriptions/' ELSE '/v1/invoices/' END || p_id
   ORDER BY x.request_id DESC LIMIT 1;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('verify', jsonb_build_object('object', p_object, 'id', p_id));
  END IF;
  IF r.state NOT IN ('succeeded', 'failed') THEN
    RETURN jsonb_build_object('defer', format('waiting for Stripe''s answer about %s', p_id));
  END IF;
  IF r.state = 'succeeded' AND r.http_status = 404 THEN
    RETURN jsonb_build_object('skip', format('Stripe has no %s %s', p_object, p_id));
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.notify_checked(billing.notifications, text, text, timestamptz, timestamptz) IS
  'Whether the mirror vouches for an object''s state as of a moment (NULL), or Stripe must be asked first (verify), is being asked (defer), or has no such object (skip).';

-- The values a notification's template needs, read as things are now; or
-- {"skip": reason} when it no longer applies; {"verify": ...} or
-- {"defer": reason} when Stripe must be asked first (billing.notify_checked).
CREATE FUNCTION billing.notify_vars(n billing.notifications) RETURNS jsonb
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  p       jsonb := n.payload;
  t       billing.tenants;
  s       billing.subscriptions;
  i       billing.invoices;
  v       jsonb;
  u       record;
  v_plan  billing.plans;
  v_next  record;
  v_hard  integer;
  v_base  text := rtrim(billing.base_url(), '/');
  v_billing_url text;
  v_chk   jsonb;
  v_told  billing.notifications;
BEGIN
  SELECT * INTO t FROM billing.tenants WHERE tenant_id = n.tenant_id;
  v_billing_url := CASE WHEN v_base ~ '^https?://' THEN v_base || '/billing' END;
  v := jsonb_build_object('tenant_id', n.tenant_id, 'tenant_name', t.name, 'billing_email', t.billing_email,
                          'kind', n.kind, 'event_id', n.event_id, 'created', billing.notify_utc(n.created_at),
                          'action_url', v_billing_url, 'free_limits', billing.notify_plan_limits('free'),
                          'payload', p::text);

  CASE n.kind
  WHEN 'usage.threshold' THEN
    SELECT * INTO u FROM billing.usage_current(n.tenant_id) c WHERE c.metric = p ->> 'metric';
    IF NOT FOUND OR u.period_start IS DISTINCT FROM (p ->> 'period_start')::timestamptz THEN
      RETURN jsonb_build_object('skip', format('the billing period that started on %s has ended',
                                               billing.notify_utc((p ->> 'period_start')::timestamptz)));
    END IF;
    IF u.usage_limit IS NULL THEN
      RETURN jsonb_build_object('skip', format('%s are unlimited on the %s plan now', billing.notify_metric_label(u.metric), u.plan_id));
    END IF;
    IF u.used::numeric * 100 < u.usage_limit::numeric * (p ->> 'threshold_percent')::integer THEN
      RETURN jsonb_build_object('skip', format('usage is below %s %% of the limit now (%s of %s on the %s plan)',
                                               p ->> 'threshold_percent', u.used, u.usage_limit, u.plan_id));
    END IF;
    IF (p ->> 'threshold_percent')::integer < 100 AND u.used >= u.usage_limit
       AND EXISTS (SELECT FROM billing.notifications x
                    WHERE x.tenant_id = n.tenant_id AND x.kind = n.kind AND x.notification_id <> n.notification_id
                      AND x.payload ->> 'metric' = p ->> 'metric' AND x.payload ->> 'period_start' = p ->> 'period_start'
                      AND (x.payload ->> 'threshold_percent')::integer = 100) THEN
      RETURN jsonb_build_object('skip', format('superseded: 100 %% of the %s limit was reached meanwhile',
                                               billing.notify_metric_label(u.metric)));
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = u.plan_id;
    SELECT l.hard_limit_pct INTO v_hard FROM billing.plan_limits l WHERE l.plan_id = u.plan_id AND l.metric = u.metric;
    SELECT pl.name, l.soft_limit INTO v_next
      FROM billing.plans pl LEFT JOIN billing.plan_limits l ON l.plan_id = pl.plan_id AND l.metric = u.metric
     WHERE pl.tier > v_plan.tier AND pl.active ORDER BY pl.tier LIMIT 1;
    v := v || jsonb_build_object(
      'metric', u.metric, 'metric_label', billing.notify_metric_label(u.metric),
      'percent', p ->> 'threshold_percent', 'plan_name', v_plan.name,
      'used', billing.notify_quantity(u.metric, u.used), 'limit', billing.notify_quantity(u.metric, u.usage_limit),
      'period_start', billing.notify_utc(u.period_start), 'period_end', billing.notify_utc(u.period_end),
      'meaning', CASE
        WHEN (p ->> 'threshold_percent')::integer < 100 AND v_hard IS NULL THEN
          'Nothing is limited. Past 100 % you can go on, but every further one is over your plan''s limit and comes with an upgrade prompt.'
        WHEN (p ->> 'threshold_percent')::integer < 100 THEN
          format('Nothing is limited yet. Past 100 %% further ones are over your plan''s limit, and above %s (%s %%) they are refused until the period renews on %s.',
                 billing.notify_quantity(u.metric, u.usage_limit * v_hard / 100), v_hard, billing.notify_utc(u.period_end))
        WHEN v_hard IS NULL THEN
          'You have reached your plan''s limit. You can go on: further ones are counted over the limit and come with an upgrade prompt.'
        ELSE format('You have reached your plan''s limit. Further ones are allowed up to %s (%s %%), then refused until the period renews on %s.',
                    billing.notify_quantity(u.metric, u.usage_limit * v_hard / 100), v_hard, billing.notify_utc(u.period_end))
        END,
      'todo', CASE WHEN v_next.name IS NOT NULL
                   THEN format('Upgrade to %s for %s %s per period, or wait for the allowance to renew on %s.',
                               v_next.name, billing.notify_quantity(u.metric, v_next.soft_limit),
                               billing.notify_metric_label(u.metric), billing.notify_utc(u.period_end))
                   ELSE format('The allowance renews on %s.', billing.notify_utc(u.period_end)) END,
      'action_label', CASE WHEN v_next.name IS NOT NULL THEN 'Upgrade to ' || v_next.name ELSE 'View your usage' END);

  WHEN 'payment.failed' THEN
    SELECT * INTO i FROM billing.invoices WHERE stripe_invoice_id = p ->> 'invoice';
    IF i.status IN ('paid', 'void') THEN
      RETURN jsonb_build_object('skip', format('invoice %s was %s meanwhile', coalesce(i.number, i.stripe_invoice_id),
                                               CASE i.status WHEN 'paid' THEN 'paid' ELSE 'voided' END));
    END IF;
    SELECT * INTO s FROM billing.subscriptions x WHERE x.tenant_id = n.tenant_id AND x.subscription_id = i.subscription_id;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'invoice_number', coalesce(i.number, p ->> 'invoice'),
      'amount', coalesce(billing.notify_money(coalesce(nullif(i.amount_remaining, 0), i.amount_due), i.currency),
                         'the amount due'),
      'plan_name', v_plan.name,
      'grace_until', billing.notify_utc(s.grace_until),
      'subject_deadline', CASE WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL
                               THEN ': please pay by ' || billing.notify_utc(s.grace_until) ELSE '' END,
      'todo_deadline', CASE WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL
                            THEN ' before ' || billing.notify_utc(s.grace_until) ELSE '' END,
      'meaning', CASE
        WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL THEN
          format('Your %s limits stay during a grace period until %s. If the invoice is still unpaid then, the Free plan''s limits apply (%s per period).',
                 v_plan.name, billing.notify_utc(s.grace_until), billing.notify_plan_limits('free'))
        WHEN s.status IN ('incomplete', 'incomplete_expired') THEN
          format('Your %s subscription has not started: the Free plan''s limits (%s per period) apply until the payment succeeds.',
                 v_plan.name, billing.notify_plan_limits('free'))
        WHEN s.status = 'unpaid' OR (s.status = 'past_due' AND s.grace_until <= billing.now()) THEN
          format('The Free plan''s limits apply (%s per period) until the invoice is paid.', billing.notify_plan_limits('free'))
        ELSE 'Your limits are unchanged for now.' END,
      'action_url', CASE WHEN coalesce(i.hosted_invoice_url, p ->> 'hosted_invoice_url') ~ '^https://'
                         THEN coalesce(i.hosted_invoice_url, p ->> 'hosted_invoice_url') ELSE v_billing_url END);

  WHEN 'grace.ended' THEN
    SELECT * INTO s FROM billing.subscriptions x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = (p ->> 'subscription_id')::bigint;
    IF NOT FOUND OR s.status NOT IN ('past_due', 'unpaid') THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s again: the invoice was paid meanwhile', coalesce(s.status, 'gone')));
    END IF;
    IF s.grace_until IS DISTINCT FROM (p ->> 'grace_until')::timestamptz OR s.grace_until > billing.now() THEN
      RETURN jsonb_build_object('skip', 'the grace period was changed: a newer one applies');
    END IF;
    -- still unpaid when it ended, as Stripe has it: the invoice it runs
    -- from (billing.dunning_since) and the subscription, each as of then
    SELECT * INTO i FROM billing.invoices x
     WHERE x.tenant_id = n.tenant_id AND x.stripe_subscription_id = s.stripe_subscription_id
       AND x.status IN ('open', 'uncollectible')
     ORDER BY x.first_failed_at IS NULL AND x.attempt_count = 0, coalesce(x.first_failed_at, x.finalized_at, x.stripe_created)
     LIMIT 1;
    IF FOUND THEN
      v_chk := billing.notify_checked(n, 'invoice', i.stripe_invoice_id, i.stripe_state_at, s.grace_until);
      IF v_chk IS NOT NULL THEN
        RETURN v_chk;
      END IF;
    END IF;
    v_chk := billing.notify_checked(n, 'subscription', s.stripe_subscription_id, s.stripe_state_at, s.grace_until);
    IF v_chk IS NOT NULL THEN
      RETURN v_chk;
    END IF;
    SELECT * INTO i FROM billing.invoices x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = s.subscription_id AND x.status IN ('open', 'uncollectible')
     ORDER BY x.stripe_created DESC LIMIT 1;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'grace_until', billing.notify_utc(s.grace_until),
      'invoice_number', coalesce(i.number, i.stripe_invoice_id, 'of the subscription'),
      'amount', coalesce(billing.notify_money(coalesce(nullif(i.amount_remaining, 0), i.amount_due), i.currency), 'the amount due'),
      'action_url', CASE WHEN i.hosted_invoice_url ~ '^https://' THEN i.hosted_invoice_url ELSE v_billing_url END);

  WHEN 'payment.recovered' THEN
    IF p ? 'invoice' THEN
      -- the invoice it recovers (billing.sync_invoice_failure): told only
      -- after its failure was
      SELECT * INTO v_told FROM billing.notifications x
       WHERE x.tenant_id = n.tenant_id AND x.dedup_key = 'payment_failed:' || (p ->> 'invoice');
      IF v_told.state IN ('pending', 'in_flight') THEN
        RETURN jsonb_build_object('defer', 'the failure it recovers from is being told first',
                                  'until', v_told.next_attempt_at);
      END IF;
      IF v_told.notification_id IS NULL OR v_told.delivered = '{}' THEN
        RETURN jsonb_build_object('skip', format('the tenant was not told that invoice %s failed', p ->> 'invoice'));
      END IF;
      SELECT * INTO i FROM billing.invoices x WHERE x.tenant_id = n.tenant_id AND x.stripe_invoice_id = p ->> 'invoice';
      SELECT * INTO s FROM billing.subscriptions x
       WHERE x.tenant_id = n.tenant_id AND x.stripe_subscription_id = p ->> 'subscription';
    ELSE
      -- queued before recoveries were facts of an invoice: as it was then
      SELECT * INTO s FROM billing.subscriptions x
       WHERE x.tenant_id = n.tenant_id AND x.subscription_id = (p ->> 'subscription_id')::bigint;
      IF NOT FOUND OR s.status NOT IN ('active', 'trialing') THEN
        RETURN jsonb_build_object('skip', format('the subscription is %s now', coalesce(s.status, 'gone')));
      END IF;
      SELECT * INTO i FROM billing.invoices x
       WHERE x.tenant_id = n.tenant_id AND x.subscription_id = s.subscription_id AND x.status = 'paid'
       ORDER BY x.stripe_state_at DESC NULLS LAST, x.stripe_created DESC LIMIT 1;
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'plan_limits', billing.notify_plan_limits(s.plan_id),
      'invoice_number', coalesce(i.number, i.stripe_invoice_id, 'of the subscription'),
      'amount', coalesce(billing.notify_money(i.amount_paid, i.currency), 'the amount due'));

  WHEN 'subscription.trial_will_end' THEN
    SELECT * INTO s FROM billing.subscriptions x WHERE x.stripe_subscription_id = p ->> 'subscription';
    IF FOUND AND s.trial_end <= billing.now() THEN
      RETURN jsonb_build_object('skip', 'the trial has ended already');
    END IF;
    IF FOUND THEN
      -- still in its trial now, as Stripe has it
      v_chk := billing.notify_checked(n, 'subscription', s.stripe_subscription_id, s.stripe_state_at, now());
      IF v_chk IS NOT NULL THEN
        RETURN v_chk;
      END IF;
    END IF;
    IF NOT FOUND OR s.status <> 'trialing' THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s, no longer in its trial', coalesce(s.status, 'gone')));
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'plan_limits', billing.notify_plan_limits(s.plan_id),
      'trial_end', billing.notify_utc(coalesce(s.trial_end, (p ->> 'trial_end')::timestamptz)),
      'interval', s.billing_interval,
      'price', (SELECT billing.notify_money(pr.unit_amount, pr.currency) FROM billing.prices pr
                 WHERE pr.stripe_price_id = s.stripe_price_id
                    OR (pr.plan_id = s.plan_id AND pr.billing_interval = s.billing_interval AND pr.active)
                 ORDER BY pr.stripe_price_id = s.stripe_price_id DESC NULLS LAST LIMIT 1));

  WHEN 'dispute.created' THEN
    v := v || jsonb_build_object(
      'dispute', p ->> 'dispute', 'charge', coalesce(p ->> 'charge', 'unknown'),
      'reason', coalesce(replace(p ->> 'reason', '_', ' '), 'not given'),
      'amount', billing.notify_money((p ->> 'amount')::bigint, coalesce(p ->> 'currency', 'usd')),
      'action_url', 'https://dashboard.stripe.com/' || CASE WHEN billing.stripe_mode() = 'test' THEN 'test/' ELSE '' END
                    || 'disputes/' || (p ->> 'dispute'));
  ELSE
    NULL;
  END CASE;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing.notify_vars(billing.notifications) IS
  'What a notification''s template needs, read as things are now; {"skip": reason} when it no longer applies (an invoice paid meanwhile, a period that ended, a trial that converted).';

-- The email (subject, plain text, HTML) and the webhook's event of a notification.
CREATE FUNCTION billing.notify_render(n billing.notifications, p_vars jsonb, p_to text,
                                      OUT subject text, OUT text_body text, OUT html_body text, OUT event jsonb)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  tpl     jsonb := billing.notify_template(n.kind);
  v_head  text := billing.notify_fill(tpl ->> 'headline', p_vars);
  v_act   text := billing.notify_fill(tpl ->> 'action', p_vars);
  v_url   text := CASE WHEN p_vars ->> 'action_url' ~ '^https?://[^\s<>"]+$' THEN p_vars ->> 'action_url' END;
  v_paras text[];
  v_foot  text;
BEGIN
  subject := regexp_replace(billing.notify_fill(tpl ->> 'subject', p_vars), '[\r\n]+', ' ', 'g');
  SELECT array_agg(billing.notify_fill(x, p_vars) ORDER BY o) INTO v_paras
    FROM jsonb_array_elements_text(tpl -> 'paragraphs') WITH ORDINALITY AS a(x, o)
   WHERE billing.notify_fill(x, p_vars) <> '';
  v_foot := format('Sent by QES billing to %s about the account %s (%s). Notification %s.',
                   coalesce(p_to, 'the platform'), p_vars ->> 'tenant_name', n.tenant_id, n.event_id);
  text_body := v_head || E'\n\n' || array_to_string(v_paras, E'\n\n')
               || CASE WHEN v_url IS NOT NULL THEN E'\n\n' || v_act || ': ' || v_url ELSE '' END
               || E'\n\n-- \n' || v_foot || E'\n';
  html_body := '<!DOCTYPE html>' || E'\n<html><head><meta charset="utf-8"><title>' || billing.notify_html(subject)
               || E'</title></head>\n<body style="font-family: Helvetica, Arial, sans-serif; color: #1f2933; max-width: 600px;">\n'
               || '<h1 style="font-size: 20px;">' || billing.notify_html(v_head) || E'</h1>\n'
               || (SELECT string_agg('<p>' || billing.notify_html(x) || '</p>', E'\n' ORDER BY o)
                     FROM unnest(v_paras) WITH ORDINALITY AS a(x, o))
               || CASE WHEN v_url IS NOT NULL
                       THEN E'\n<p><a href="' || billing.notify_html(v_url)
                            || '" style="display: inline-block; padding: 10px 16px; background: #1a56db; color: #ffffff; text-decoration: none; border-radius: 4px;">'
                            || billing.notify_html(v_act) || '</a></p>'
                       ELSE '' END
               || E'\n<hr>\n<p style="font-size: 12px; color: #6b7280;">' || billing.notify_html(v_foot) || E'</p>\n</body></html>\n';
  event := jsonb_build_object(
    'id', n.event_id, 'object', 'event', 'type', n.kind, 'api_version', 'qes_billing/1',
    'created', floor(extract(epoch FROM n.created_at))::bigint, 'livemode', billing.stripe_mode() = 'live',
    'data', jsonb_build_object('object', jsonb_build_object(
      'object', 'notification', 'tenant_id', n.tenant_id, 'notification_id', n.notification_id,
      'audience', n.audience, 'kind', n.kind, 'payload', n.payload,
      'subject', subject, 'text', text_body, 'action_url', v_url,
      'created_at', to_char(n.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))));
END
$$;
COMMENT ON FUNCTION billing.notify_render(billing.notifications, jsonb, text) IS
  'Render a notification from its kind''s template: the email''s subject, plain-text and HTML parts, and the platform webhook''s event.';

-- ---- timers --------------------------------------------------------------

-- Grace periods that have ended: limits are lowered to Free's (check_limit
-- does that by itself from grace_until); queue the notice, once per
-- subscription and grace period.  Whether it goes out (and is audited as
-- dunning.grace_ended) is decided when it is claimed, once the mirror
-- vouches that the subscription was still unpaid then (billing.notify_vars).
CREATE FUNCTION billing.notify_timers() RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n integer;
BEGIN
  -- (an INSERT of no rows would still fire the wake-up trigger: the worker
  -- would wake itself and claim again, forever)
  IF NOT EXISTS (SELECT FROM billing.subscriptions s
                  WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL
                    AND s.grace_until <= billing.now() AND NOT billing.tenant_fenced(s.tenant_id)
                    AND NOT EXISTS (SELECT FROM billing.notifications x
                                     WHERE x.tenant_id = s.tenant_id
                                       AND x.dedup_key = 'grace_ended:' || s.subscription_id || ':'
                                                         || extract(epoch FROM s.grace_until)::bigint)) THEN
    RETURN 0;
  END IF;
  WITH due AS (
    SELECT s.tenant_id, s.subscription_id, s.stripe_subscription_id, s.plan_id, s.grace_until,
           'grace_ended:' || s.subscription_id || ':' || extract(epoch FROM s.grace_until)::bigint AS dedup_key
      FROM billing.subscriptions s
     WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL AND s.grace_until <= billing.now()
       AND NOT billing.tenant_fenced(s.tenant_id)),   -- its partition is moving (src/fence.c)
  ins AS (
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    SELECT d.tenant_id, 'grace.ended', d.dedup_key,
           jsonb_build_object('subscription', d.stripe_subscription_id, 'subscription_id', d.subscription_id,
                              'plan_id', d.plan_id, 'grace_until', d.grace_until)
      FROM due d
     WHERE NOT EXISTS (SELECT FROM billing.notifications x WHERE x.tenant_id = d.tenant_id AND x.dedup_key = d.dedup_key)
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING
    RETURNING tenant_id)
  SELECT count(*) INTO v_n FROM ins;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.notify_timers() IS
  'Queue a grace.ended notification for each subscription whose grace period ended unpaid, once per grace period (audited as dunning.grace_ended when it is claimed and still holds).';

-- A changed grace period wakes the worker, whose next due time includes it.
-- (A recovery is no transition the mirror passed through, which depends on
-- the order it saw states in: it is a fact of the invoice that was paid,
-- billing.sync_invoice_failure.)
CREATE FUNCTION billing.notify_subscription_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NEW.grace_until IS DISTINCT FROM OLD.grace_until THEN
    PERFORM billing.wake_worker();
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER notify_on_change AFTER UPDATE OF status, grace_until ON billing.subscriptions
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.grace_until IS DISTINCT FROM NEW.grace_until)
  EXECUTE FUNCTION billing.notify_subscription_changed();

-- queued notifications and a moved billing clock wake the worker at commit
CREATE TRIGGER wake_worker AFTER INSERT ON billing.notifications
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();
CREATE TRIGGER wake_worker AFTER UPDATE ON billing.clock
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

-- ---- the worker's protocol -----------------------------------------------

-- Claim due notifications for delivery on the channels the worker has
-- (p_email, p_webhook; p_operator_email is where operators' email goes, NULL
-- for none).  Commits before any byte leaves.
CREATE FUNCTION billing.notify_claim(p_limit integer, p_email boolean, p_webhook boolean, p_operator_email text)
  RETURNS TABLE (tenant_id text, notification_id bigint, attempt integer, event_id text, kind text,
                 email_to text, subject text, text_body text, html_body text, webhook_body text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
#variable_conflict use_column
DECLARE
  n        billing.notifications;
  v        jsonb;
  r        record;
  v_to     text;
  v_chan   text[];
  v_err    text;
BEGIN
  PERFORM billing.notify_timers();
  -- in flight for longer than twice the timeout: this worker lost the answer
  UPDATE billing.notifications x
     SET state = 'pending', claimed_at = NULL, channels_due = '{}', next_attempt_at = now(), updated_at = now()
   WHERE x.state = 'in_flight'
     AND x.claimed_at < now() - 2 * current_setting('qes_billing.notify_timeout')::interval
     AND NOT billing.tenant_fenced(x.tenant_id);

  FOR n IN
    SELECT * FROM billing.notifications x
     WHERE x.state = 'pending' AND x.next_attempt_at <= now()
     ORDER BY x.next_attempt_at, x.notification_id
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  LOOP
    IF billing.tenant_fenced(n.tenant_id) THEN
      CONTINUE;   -- its partition is moving (src/fence.c): it goes with its rows
    END IF;
    BEGIN
      v := billing.notify_vars(n);
      v_to := CASE WHEN n.audience = 'tenant' THEN v ->> 'billing_email' ELSE nullif(p_operator_email, '') END;
      v_chan := '{}';
      IF p_email AND v_to IS NOT NULL AND NOT n.delivered ? 'email' THEN
        v_chan := v_chan || 'email'::text;
      END IF;
      IF p_webhook AND NOT n.delivered ? 'webhook' THEN
        v_chan := v_chan || 'webhook'::text;
      END IF;
      IF NOT (v ?| ARRAY['skip', 'verify', 'defer']) AND cardinality(v_chan) > 0 THEN
        r := billing.notify_render(n, v, v_to);   -- the same text on every channel and attempt
      END IF;
    EXCEPTION WHEN OTHERS THEN
      -- a notification that cannot be rendered must not hold up the others
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
      UPDATE billing.notifications x
         SET state = 'failed', attempts = x.attempts + 1, last_error = 'render: ' || v_err, updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      PERFORM billing.audit('notification.failed', n.tenant_id,
                            jsonb_build_object('notification_id', n.notification_id, 'kind', n.kind,
                                               'event_id', n.event_id, 'error', 'render: ' || v_err));
      CONTINUE;
    END;
    IF v ? 'verify' THEN
      -- ask Stripe first (once per object); the answer wakes the worker
      UPDATE billing.notifications x
         SET verify_requests = x.verify_requests
                               || billing.fetch_object(n.tenant_id, v -> 'verify' ->> 'object', v -> 'verify' ->> 'id'),
             next_attempt_at = now() + interval '1 second', updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF v ? 'defer' THEN
      UPDATE billing.notifications x
         SET next_attempt_at = greatest(now() + interval '1 second', (v ->> 'until')::timestamptz), updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF v ? 'skip' THEN
      UPDATE billing.notifications x SET state = 'skipped', skip_reason = v ->> 'skip', updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF n.kind = 'grace.ended' AND n.attempts = 0 AND n.delivered = '{}' THEN
      -- the grace period ended unpaid, as Stripe has it: audited once, when decided
      PERFORM billing.audit('dunning.grace_ended', n.tenant_id, n.payload);
    END IF;
    IF cardinality(v_chan) = 0 THEN
      -- nothing left that a configured channel can deliver
      UPDATE billing.notifications x
         SET state = CASE WHEN x.delivered = '{}' THEN 'skipped' ELSE 'sent' END,
             sent_at = CASE WHEN x.delivered = '{}' THEN NULL ELSE clock_timestamp() END,
             skip_reason = CASE WHEN x.delivered = '{}'
                                THEN 'no channel delivers ' || x.audience || ' notifications'
                                     || CASE WHEN x.audience = 'operator'
                                             THEN ' (set qes_billing.notify_operator_email or the platform webhook)' ELSE '' END
                           END,
             updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    UPDATE billing.notifications x
       SET state = 'in_flight', attempts = x.attempts + 1, claimed_at = now(), channels_due = v_chan,
           attempt_errors = '{}', updated_at = now()
     WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id
     RETURNING * INTO n;
    tenant_id := n.tenant_id;
    notification_id := n.notification_id;
    attempt := n.attempts;
    event_id := n.event_id;
    kind := n.kind;
    email_to := CASE WHEN 'email' = ANY (v_chan) THEN v_to END;
    subject := r.subject;
    text_body := r.text_body;
    html_body := r.html_body;
    webhook_body := CASE WHEN 'webhook' = ANY (v_chan) THEN r.event::text END;
    RETURN NEXT;
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.notify_claim(integer, boolean, boolean, text) IS
  'Run by the worker: queue timers, skip what no longer applies, mark up to p_limit due notifications in flight and return them rendered for each channel.';

-- Seconds until a notification is due (a retry, or a grace period that
-- ends); NULL when none is: the worker sleeps until then.
CREATE FUNCTION billing.notify_next_due() RETURNS double precision
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  -- (greatest() ignores a NULL: only a due time, if any, goes into it)
  SELECT CASE WHEN d.due IS NOT NULL THEN greatest(0, extract(epoch FROM d.due - now()))::double precision END
    FROM (SELECT least(
            (SELECT min(x.next_attempt_at) FROM billing.notifications x WHERE x.state = 'pending'),
            (SELECT min(s.grace_until) FROM billing.subscriptions s
              WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL
                AND s.grace_until > billing.now()) - (billing.now() - now()),
            (SELECT min(x.claimed_at) FROM billing.notifications x WHERE x.state = 'in_flight')
              + 2 * current_setting('qes_billing.notify_timeout')::interval) AS due) d
$$;
COMMENT ON FUNCTION billing.notify_next_due() IS
  'Seconds until the next notification is due (retry, grace period end); NULL when none.';

-- The delay before attempt n+1 (billing.backoff with the notification settings).
CREATE FUNCTION billing.notify_backoff(p_attempts integer) RETURNS interval
  LANGUAGE sql VOLATILE
RETURN billing.backoff(p_attempts, current_setting('qes_billing.notify_retry_base_delay')::interval,
                       current_setting('qes_billing.notify_retry_max_delay')::interval);

-- One channel's outcome.  Returns the notification's state, NULL when the
-- row was reclaimed meanwhile (a later attempt owns it).  p_error is
-- redacted by the worker (never a secret).
CREATE FUNCTION billing.notify_record(p_tenant text, p_notification_id bigint, p_attempt integer, p_channel text,
                                      p_ok boolean, p_permanent boolean DEFAULT false, p_error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  n     billing.notifications;
  v_max integer := current_setting('qes_billing.notify_max_attempts')::integer;
BEGIN
  SELECT * INTO n FROM billing.notifications x
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id FOR UPDATE;
  IF NOT FOUND OR n.state <> 'in_flight' OR n.attempts <> p_attempt OR NOT p_channel = ANY (n.channels_due) THEN
    RETURN NULL;
  END IF;
  UPDATE billing.notifications x
     SET channels_due = array_remove(x.channels_due, p_channel),
         delivered = CASE WHEN p_ok THEN x.delivered || jsonb_build_object(p_channel, clock_timestamp()) ELSE x.delivered END,
         attempt_errors = CASE WHEN p_ok THEN x.attempt_errors
                               ELSE x.attempt_errors || jsonb_build_object(p_channel, jsonb_build_object(
                                      'error', left(p_error, 1000), 'permanent', p_permanent)) END,
         last_error = CASE WHEN p_ok THEN x.last_error ELSE p_channel || ': ' || left(p_error, 1000) END,
         updated_at = now()
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id
   RETURNING * INTO n;
  IF cardinality(n.channels_due) > 0 THEN
    RETURN 'in_flight';   -- the other channel is still on its way
  END IF;
  IF n.attempt_errors = '{}' THEN
    UPDATE billing.notifications x SET state = 'sent', sent_at = clock_timestamp(), claimed_at = NULL, updated_at = now()
     WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
    RETURN 'sent';
  END IF;
  IF n.attempts >= v_max OR jsonb_path_exists(n.attempt_errors, '$.*.permanent ? (@ == true)') THEN
    UPDATE billing.notifications x SET state = 'failed', claimed_at = NULL, updated_at = now()
     WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
    PERFORM billing.audit('notification.failed', p_tenant,
                          jsonb_build_object('notification_id', n.notification_id, 'kind', n.kind, 'event_id', n.event_id,
                                             'attempts', n.attempts, 'errors', n.attempt_errors,
                                             'delivered', n.delivered));
    RETURN 'failed';
  END IF;
  UPDATE billing.notifications x
     SET state = 'pending', claimed_at = NULL, next_attempt_at = now() + billing.notify_backoff(n.attempts), updated_at = now()
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
  RETURN 'pending';
END
$$;
COMMENT ON FUNCTION billing.notify_record(text, bigint, integer, text, boolean, boolean, text) IS
  'Run by the worker for each channel''s outcome: sent when every channel delivered; else back to pending with backoff, or failed (audited) after qes_billing.notify_max_attempts or a permanent refusal.';

-- Crash reconciliation: rows in flight when the worker starts were left by
-- a crash; they go out again (same event_id).
CREATE FUNCTION billing.notify_reclaim() RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.notifications
     SET state = 'pending', claimed_at = NULL, channels_due = '{}', next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight'
     AND NOT billing.tenant_fenced(tenant_id);   -- its partition is moving: the target reclaims it
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL, jsonb_build_object('notifications', v_n));
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.notify_reclaim() IS
  'Run by the worker before its first delivery: put notifications left in flight by a crash back in the queue.';

-- ---- for operators ---------------------------------------------------------

CREATE FUNCTION billing.notify_channels(OUT channel text, OUT enabled boolean, OUT target text, OUT problem text)
  RETURNS SETOF record
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_notify_channels';
COMMENT ON FUNCTION billing.notify_channels() IS
  'The delivery channels as the settings configure them: email (SMTP) and the platform webhook; what is missing when one is off. Never a secret.';

CREATE VIEW billing.notification_failures AS
SELECT n.tenant_id, n.notification_id, n.kind, n.audience, n.event_id, n.attempts, n.last_error,
       n.attempt_errors AS errors, n.delivered, n.created_at, n.updated_at AS failed_at
  FROM billing.notifications n
 WHERE n.state = 'failed';
COMMENT ON VIEW billing.notification_failures IS
  'Notifications that could not be delivered after qes_billing.notify_max_attempts (or were refused for good): replay them with billing.replay_notification().';

CREATE VIEW billing.notification_metrics AS
SELECT (SELECT count(*) FROM billing.notifications WHERE state = 'pending') AS pending,
       (SELECT count(*) FROM billing.notifications WHERE state = 'in_flight') AS in_flight,
       (SELECT count(*) FROM billing.notifications WHERE state = 'pending' AND attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.notifications WHERE state = 'sent' AND sent_at > now() - interval '1 hour') AS sent_last_hour,
       (SELECT count(*) FROM billing.notifications WHERE state = 'skipped' AND updated_at > now() - interval '1 hour') AS skipped_last_hour,
       (SELECT count(*) FROM billing.notifications WHERE state = 'failed') AS failed,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at))
          FROM billing.notifications WHERE sent_at > now() - interval '1 hour') AS latency_p50_s,
       (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at))
          FROM billing.notifications WHERE sent_at > now() - interval '1 hour') AS latency_p99_s;
COMMENT ON VIEW billing.notification_metrics IS
  'Notifications: queued, in flight, retrying, sent and skipped in the last hour, failed; latency queued -> sent (p50, p99 over the last hour).';

CREATE FUNCTION billing.replay_notification(p_tenant text DEFAULT NULL, p_notification_id bigint DEFAULT NULL)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE billing.notifications
     SET state = 'pending', attempts = 0, next_attempt_at = now(), claimed_at = NULL, channels_due = '{}',
         attempt_errors = '{}', updated_at = now()
   WHERE state = 'failed' AND (p_tenant IS NULL OR tenant_id = p_tenant)
     AND (p_notification_id IS NULL OR notification_id = p_notification_id);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF p_notification_id IS NOT NULL AND v_n = 0 THEN
    RAISE EXCEPTION 'no failed notification % of tenant %', p_notification_id, coalesce(p_tenant, '(any)')
      USING ERRCODE = 'no_data_found', HINT = 'List them with: SELECT * FROM billing.notification_failures.';
  END IF;
  PERFORM billing.audit('notification.replayed', p_tenant,
                        jsonb_build_object('notification_id', p_notification_id, 'notifications', v_n));
  PERFORM billing.wake_worker();
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.replay_notification(text, bigint) IS
  'Deliver failed notifications again (one, a tenant''s, or all), with their event ids; channels that delivered are not sent again. Audited.';

GRANT SELECT ON billing.notification_failures, billing.notification_metrics TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.replay_notification(text, bigint), billing.notify_channels() TO qes_admin;
