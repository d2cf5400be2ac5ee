-- VAT through Stripe Tax: a tenant's billing details (legal name, address,
-- an EU VAT number), validated here (country code, the VAT number's shape
-- for its country) and then by Stripe (tax[validate_location]=immediately on
-- the customer: a location Stripe cannot tax is refused at once).  Stripe's
-- answer comes back through the outbox; the tenant sees it in GET
-- /rpc/billing_details -- a refusal as 422 naming the field.  The VAT number
-- becomes a customer tax ID (eu_vat) whose verification Stripe reports in
-- customer.tax_id.* events (mirrored here); a verified business in another
-- EU member state than qes_billing.tax_origin_country is marked for reverse
-- charge (customer tax_exempt=reverse), and the decision is audited with its
-- basis.

-- The Stripe time of the followed tax ID's state (the event's created, or
-- for the tax_id.create answer the second its request first went out):
-- customer.tax_id.* events arrive in any order, and an older one must not
-- overwrite a newer verification (docs/architecture.md, "Mirroring Stripe").
ALTER TABLE billing.billing_details ADD COLUMN tax_id_state_at timestamptz;
COMMENT ON COLUMN billing.billing_details.tax_id_state_at IS
  'The Stripe time of the state of stripe_tax_id kept here (an event''s created, or the tax_id.create answer''s first attempt); an older state of that tax ID is ignored, and its deletion is final.';

-- ISO 3166-1 alpha-2 codes (officially assigned).
CREATE FUNCTION billing.iso_countries() RETURNS text[]
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN string_to_array(
  'AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ '
  'CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR '
  'GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO '
  'JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR '
  'MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO '
  'RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV '
  'TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW', ' ');
COMMENT ON FUNCTION billing.iso_countries() IS 'The officially assigned ISO 3166-1 alpha-2 country codes.';

-- The shape of an EU VAT number per member state, after its prefix (the
-- country code; EL for Greece), spaces, dots and dashes removed.
CREATE FUNCTION billing.eu_vat_pattern(p_country text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_country
  WHEN 'AT' THEN '^U[0-9]{8}$'           WHEN 'BE' THEN '^[01][0-9]{9}$'
  WHEN 'BG' THEN '^[0-9]{9,10}$'         WHEN 'CY' THEN '^[0-9]{8}[A-Z]$'
  WHEN 'CZ' THEN '^[0-9]{8,10}$'         WHEN 'DE' THEN '^[0-9]{9}$'
  WHEN 'DK' THEN '^[0-9]{8}$'            WHEN 'EE' THEN '^[0-9]{9}$'
  WHEN 'GR' THEN '^[0-9]{9}$'            WHEN 'ES' THEN '^[A-Z0-9][0-9]{7}[A-Z0-9]$'
  WHEN 'FI' THEN '^[0-9]{8}$'            WHEN 'FR' THEN '^[A-HJ-NP-Z0-9]{2}[0-9]{9}$'
  WHEN 'HR' THEN '^[0-9]{11}$'           WHEN 'HU' THEN '^[0-9]{8}$'
  WHEN 'IE' THEN '^([0-9]{7}[A-W][A-I]?|[0-9][A-Z+*][0-9]{5}[A-W])$'
  WHEN 'IT' THEN '^[0-9]{11}$'           WHEN 'LT' THEN '^([0-9]{9}|[0-9]{12})$'
  WHEN 'LU' THEN '^[0-9]{8}$'            WHEN 'LV' THEN '^[0-9]{11}$'
  WHEN 'MT' THEN '^[0-9]{8}$'            WHEN 'NL' THEN '^[0-9]{9}B[0-9]{2}$'
  WHEN 'PL' THEN '^[0-9]{10}$'           WHEN 'PT' THEN '^[0-9]{9}$'
  WHEN 'RO' THEN '^[0-9]{2,10}$'         WHEN 'SE' THEN '^[0-9]{10}01$'
  WHEN 'SI' THEN '^[0-9]{8}$'            WHEN 'SK' THEN '^[0-9]{10}$'
END;
COMMENT ON FUNCTION billing.eu_vat_pattern(text) IS
  'The shape of an EU VAT number of this member state after its prefix (NULL: not an EU member state).';

CREATE FUNCTION billing.eu_vat_prefix(p_country text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_country = 'GR' THEN 'EL' ELSE p_country END;

-- The tenant's details as Stripe's customer parameters.
CREATE FUNCTION billing.billing_details_params(d billing.billing_details) RETURNS jsonb
  LANGUAGE sql STABLE
RETURN jsonb_build_object(
  'name', d.legal_name,
  'address', jsonb_strip_nulls(jsonb_build_object('country', d.country, 'postal_code', d.postal_code,
                                                  'line1', d.line1, 'city', d.city)),
  'tax', jsonb_build_object('validate_location', 'immediately'),
  'expand', jsonb_build_array('tax'));

-- Send the details (and then the VAT number) to Stripe: on the customer if
-- there is one, else once customer.create has answered (billing_details_send
-- is called again then, from billing.outbox_apply).
CREATE FUNCTION billing.billing_details_send(p_tenant text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants;
  d     billing.billing_details;
  v_req bigint;
BEGIN
  SELECT * INTO t FROM billing.tenants x WHERE x.tenant_id = p_tenant;
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = p_tenant FOR UPDATE;
  IF NOT FOUND OR d.state <> 'pending' THEN
    RETURN NULL;
  END IF;
  IF t.stripe_customer_id IS NULL THEN
    PERFORM billing.customer_request(t);   -- the details follow its answer
    RETURN NULL;
  END IF;
  v_req := billing.outbox_enqueue(p_tenant, 'billing_details.update', 'POST', '/v1/customers/' || t.stripe_customer_id,
                                  billing.billing_details_params(d), jsonb_build_object('version', d.version));
  UPDATE billing.billing_details x SET stripe_request = v_req WHERE x.tenant_id = p_tenant;
  RETURN v_req;
END
$$;
COMMENT ON FUNCTION billing.billing_details_send(text) IS
  'Queue the tenant''s pending billing details to its Stripe customer with tax[validate_location]=immediately (after the customer is created, when it is not yet).';

CREATE FUNCTION api.set_billing_details(legal_name text, country text, postal_code text,
                                        line1 text DEFAULT NULL, city text DEFAULT NULL,
                                        vat_number text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t       billing.tenants := billing.calling_tenant();
  v_cc    text := upper(btrim(country));
  v_vat   text := nullif(upper(regexp_replace(coalesce(vat_number, ''), '[[:space:].-]', '', 'g')), '');
  v_name  text := btrim(legal_name);
  v_pc    text := btrim(postal_code);
  d       billing.billing_details;
  v_old   billing.billing_details;
BEGIN
  IF v_name IS NULL OR length(v_name) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'legal_name must have 1 to 200 characters'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the company''s registered name.';
  END IF;
  IF v_cc IS NULL OR NOT v_cc = ANY (billing.iso_countries()) THEN
    RAISE EXCEPTION 'country: % is not an ISO 3166-1 country code', coalesce(quote_literal(country), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give two letters, e.g. DE, FR, NL (GB, not UK).';
  END IF;
  IF v_pc IS NULL OR v_pc !~ '^[A-Za-z0-9][A-Za-z0-9 -]{1,11}$' THEN
    RAISE EXCEPTION 'postal_code: % is not a postal code', coalesce(quote_literal(postal_code), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the postal code of the billing address (Stripe Tax needs it).';
  END IF;
  IF length(line1) > 200 OR length(city) > 100 THEN
    RAISE EXCEPTION 'line1 (at most 200 characters) or city (at most 100) is too long'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Shorten the address.';
  END IF;
  IF v_vat IS NOT NULL THEN
    IF billing.eu_vat_pattern(v_cc) IS NULL THEN
      RAISE EXCEPTION 'vat_number: % is not in the EU; only EU VAT numbers are taken', v_cc
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave vat_number out for a business outside the EU.';
    END IF;
    IF left(v_vat, 2) <> billing.eu_vat_prefix(v_cc)
       OR substr(v_vat, 3) !~ billing.eu_vat_pattern(v_cc) THEN
      RAISE EXCEPTION 'vat_number: % is not a VAT number of %', quote_literal(vat_number), v_cc
        USING ERRCODE = 'invalid_parameter_value',
              HINT = format('A VAT number of %s starts with %s; the rest matches %s.', v_cc,
                            billing.eu_vat_prefix(v_cc), billing.eu_vat_pattern(v_cc));
    END IF;
  END IF;

  SELECT * INTO v_old FROM billing.billing_details x WHERE x.tenant_id = t.tenant_id FOR UPDATE;
  INSERT INTO billing.billing_details AS x (tenant_id, legal_name, country, postal_code, line1, city, vat_number)
  VALUES (t.tenant_id, v_name, v_cc, v_pc, line1, city, v_vat)
  ON CONFLICT (tenant_id) DO UPDATE
     SET legal_name = EXCLUDED.legal_name, country = EXCLUDED.country, postal_code = EXCLUDED.postal_code,
         line1 = EXCLUDED.line1, city = EXCLUDED.city, vat_number = EXCLUDED.vat_number,
         state = 'pending', refusal = NULL, stripe_request = NULL, version = x.version + 1,
         tax_id_status = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.tax_id_status END,
         -- another number: its own tax ID is followed (billing.sync_tax_id), from its first state
         stripe_tax_id = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.stripe_tax_id END,
         tax_id_state_at = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.tax_id_state_at END,
         reverse_charge = x.reverse_charge AND x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number
                          AND x.country = EXCLUDED.country,
         updated_at = now()
  RETURNING * INTO d;
  -- reverse charge rests on a verified VAT number of that country: another
  -- number, none, or another country ends it until the new one is verified
  IF v_old.reverse_charge AND NOT d.reverse_charge AND t.stripe_customer_id IS NOT NULL THEN
    PERFORM billing.tax_exempt_send(t.tenant_id, t.stripe_customer_id, 'none');
    PERFORM billing.audit('tax.reverse_charge', t.tenant_id, jsonb_build_object(
      'reverse_charge', false,
      'basis', jsonb_build_object('vat_number', d.vat_number, 'vat_number_before', v_old.vat_number,
                                  'customer_country', d.country, 'country_before', v_old.country,
                                  'reason', 'the verified VAT number no longer stands'),
      'tax_exempt', 'none'));
  END IF;
  PERFORM billing.billing_details_send(t.tenant_id);
  PERFORM billing.audit('billing_details.set', t.tenant_id,
                        jsonb_build_object('country', v_cc, 'postal_code', v_pc, 'vat_number', v_vat,
                                           'version', d.version));
  RETURN json_build_object('state', 'pending', 'country', v_cc, 'postal_code', v_pc, 'vat_number', v_vat,
                           'version', d.version);
END
$$;
COMMENT ON FUNCTION api.set_billing_details(text, text, text, text, text, text) IS
  'The calling tenant''s billing details: legal name, address (country and postal code required) and optionally an EU VAT number (checked against its country''s shape). Stripe then validates the location; GET /rpc/billing_details shows the outcome (422 naming the field when Stripe refuses). Audited.';

CREATE FUNCTION api.billing_details() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_t text := billing.jwt_tenant_id();
  d   billing.billing_details;
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = v_t;
  IF NOT FOUND THEN
    PERFORM set_config('response.status', '404', true);
    RETURN json_build_object('state', 'none', 'hint', 'Give them with POST /rpc/set_billing_details.');
  END IF;
  IF d.state = 'refused' THEN
    PERFORM set_config('response.status', '422', true);
  END IF;
  RETURN json_build_object('state', d.state, 'legal_name', d.legal_name, 'country', d.country,
                           'postal_code', d.postal_code, 'line1', d.line1, 'city', d.city,
                           'vat_number', d.vat_number, 'vat_verification', d.tax_id_status,
                           'reverse_charge', d.reverse_charge, 'error', d.refusal, 'version', d.version);
END
$$;
COMMENT ON FUNCTION api.billing_details() IS
  'The calling tenant''s billing details and where Stripe''s validation stands: pending, valid, or refused (HTTP 422, error names the field and Stripe''s message); the VAT number''s verification (pending, verified, unverified, unavailable) and whether reverse charge applies.';

-- Stripe's answer to the details (billing.outbox_apply).
CREATE FUNCTION billing.billing_details_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d     billing.billing_details;
  v_req bigint;
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = r.tenant_id FOR UPDATE;
  IF NOT FOUND OR d.version <> (r.subject ->> 'version')::integer THEN
    RETURN;    -- details given again since: their own request decides
  END IF;
  IF r.kind = 'billing_details.update' THEN
    UPDATE billing.billing_details x SET state = 'valid', refusal = NULL, validated_at = now()
     WHERE x.tenant_id = r.tenant_id;
    PERFORM billing.audit('billing_details.valid', r.tenant_id,
                          jsonb_build_object('country', d.country, 'automatic_tax', r.response -> 'tax' ->> 'automatic_tax'));
    IF d.vat_number IS NOT NULL AND d.tax_id_status IS NULL THEN
      v_req := billing.outbox_enqueue(r.tenant_id, 'tax_id.create', 'POST',
                                      '/v1/customers/' || (r.response ->> 'id') || '/tax_ids',
                                      jsonb_build_object('type', 'eu_vat', 'value', d.vat_number),
                                      jsonb_build_object('version', d.version));
    END IF;
  ELSIF r.kind = 'tax_id.create' THEN
    PERFORM billing.sync_tax_id(r.tenant_id, r.response, false, billing.outbox_state_at(r));
  END IF;
END
$$;
COMMENT ON FUNCTION billing.billing_details_apply(billing.stripe_requests) IS
  'Stripe accepted the billing details (valid; the VAT number then sent as a tax ID) or created the tax ID.';

-- A refusal: the field Stripe names, shown to the tenant.
CREATE FUNCTION billing.billing_details_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_param text := coalesce(r.error ->> 'param', r.response -> 'error' ->> 'param');
  v_field text;
BEGIN
  v_field := CASE
    WHEN v_param LIKE 'address[postal_code]%' THEN 'postal_code'
    WHEN v_param LIKE 'address[country]%' THEN 'country'
    WHEN v_param LIKE 'address%' THEN 'address'
    WHEN v_param LIKE 'value%' OR r.kind = 'tax_id.create' THEN 'vat_number'
    WHEN coalesce(r.error ->> 'code', '') = 'customer_tax_location_invalid' THEN 'postal_code'
    ELSE coalesce(v_param, 'billing_details') END;
  UPDATE billing.billing_details x
     SET state = 'refused',
         refusal = jsonb_build_object('field', v_field, 'code', r.error ->> 'code',
                                      'message', coalesce(r.error ->> 'message', 'Stripe refused the billing details.'))
   WHERE x.tenant_id = r.tenant_id AND x.version = (r.subject ->> 'version')::integer;
  PERFORM billing.audit('billing_details.refused', r.tenant_id,
                        jsonb_build_object('field', v_field, 'code', r.error ->> 'code', 'kind', r.kind));
END
$$;
COMMENT ON FUNCTION billing.billing_details_failure(billing.stripe_requests) IS
  'Stripe refused the billing details (e.g. customer_tax_location_invalid) or the VAT number: refused, with the field, shown by GET /rpc/billing_details as 422.';

-- The customer's tax_exempt as decided, sent so that the last decision is
-- the one Stripe keeps: the requests about one customer's tax_exempt go out
-- one after the other.  A decision taken while an earlier request has not
-- gone out yet replaces that request's value (nothing of it reached
-- Stripe); while one may have reached Stripe (in flight, or retried after a
-- 5xx or a lost answer), the new one waits for it (after_request), so a
-- retry of the older value can never land after the newer one
-- (docs/architecture.md, "Tax").  Returns the request that carries it.
CREATE FUNCTION billing.tax_exempt_send(p_tenant text, p_customer text, p_tax_exempt text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_path text := '/v1/customers/' || p_customer;
  v_id   bigint;
  r      billing.stripe_requests;
BEGIN
  IF p_tax_exempt IS NULL OR p_tax_exempt NOT IN ('none', 'exempt', 'reverse') THEN
    RAISE EXCEPTION 'tax_exempt %: not one of Stripe''s values', coalesce(quote_literal(p_tax_exempt), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use none, exempt or reverse.';
  END IF;
  IF p_customer IS NULL THEN
    RAISE EXCEPTION 'tenant % has no Stripe customer to set tax_exempt on', p_tenant
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The customer''s tax_exempt follows once it is created.';
  END IF;
  -- the newest request about this customer's tax_exempt not done yet,
  -- locked (the worker records it under the same lock); looked up again if
  -- it was done between the look and the lock
  FOR i IN 1 .. 5 LOOP
    SELECT x.request_id INTO v_id FROM billing.stripe_requests x
     WHERE x.tenant_id = p_tenant AND x.kind = 'tax_exempt.update' AND x.path = v_path
       AND x.state IN ('waiting', 'pending', 'in_flight')
     ORDER BY x.request_id DESC LIMIT 1;
    EXIT WHEN v_id IS NULL;
    SELECT * INTO r FROM billing.stripe_requests x WHERE x.request_id = v_id FOR UPDATE;
    EXIT WHEN r.state IN ('waiting', 'pending', 'in_flight');
    r := NULL;
    v_id := NULL;
  END LOOP;
  IF v_id IS NULL THEN
    RETURN billing.outbox_enqueue(p_tenant, 'tax_exempt.update', 'POST', v_path,
                                  jsonb_build_object('tax_exempt', p_tax_exempt));
  END IF;
  IF r.state IN ('waiting', 'pending') AND r.first_sent_at IS NULL THEN
    -- not gone out yet: it carries the new decision instead
    UPDATE billing.stripe_requests x SET params = x.params || jsonb_build_object('tax_exempt', p_tax_exempt),
                                         updated_at = now()
     WHERE x.request_id = r.request_id;
    RETURN r.request_id;
  END IF;
  IF r.params ->> 'tax_exempt' = p_tax_exempt THEN
    RETURN r.request_id;     -- already what goes out last
  END IF;
  RETURN billing.outbox_enqueue(p_tenant, 'tax_exempt.update', 'POST', v_path,
                                jsonb_build_object('tax_exempt', p_tax_exempt), '{}'::jsonb, r.request_id);
END
$$;
COMMENT ON FUNCTION billing.tax_exempt_send(text, text, text) IS
  'Queue the customer''s tax_exempt (none, exempt, reverse) so that the last decision is the one Stripe keeps: it replaces the value of a request that has not gone out, or waits for one that may have reached Stripe. Returns the request.';

-- A tax ID as Stripe tells of it (the answer, or customer.tax_id.* events):
-- its verification mirrored; reverse charge decided and audited.  Ordered
-- as every mirror is (docs/architecture.md, "Mirroring Stripe"): p_at is the
-- Stripe time of this state (the event's created; the answer's first
-- attempt; NULL: an operator's call, taken as the newest state); an older
-- state of the followed tax ID is ignored, and in the same second the state
-- further along wins (a decided verification over pending; of two decided
-- ones, the one that does not reverse-charge, so that a tie never leaves
-- VAT uncollected); its deletion is final.  Another tax ID of the same
-- number is followed instead only when the followed one is deleted or it
-- was created after the followed one's newest state.
CREATE FUNCTION billing.sync_tax_id(p_tenant text, o jsonb, p_deleted boolean, p_at timestamptz DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d        billing.billing_details;
  v_status text := CASE WHEN p_deleted THEN 'deleted' ELSE coalesce(o -> 'verification' ->> 'status', 'pending') END;
  v_origin text := upper(nullif(btrim(current_setting('qes_billing.tax_origin_country')), ''));
  v_at     timestamptz := coalesce(p_at, date_trunc('second', billing.now()));
  v_id     text;
  v_rc     boolean;
  v_cust   text := (SELECT t.stripe_customer_id FROM billing.tenants t WHERE t.tenant_id = p_tenant);
  -- the order of states within one second (further along is greater)
  v_rank   text[] := ARRAY['pending', 'verified', 'unavailable', 'unverified'];
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = p_tenant FOR UPDATE;
  IF NOT FOUND OR (o ->> 'value') IS DISTINCT FROM d.vat_number THEN
    RETURN;    -- a tax ID of a VAT number the tenant no longer gives
  END IF;
  v_id := coalesce(o ->> 'id', d.stripe_tax_id);
  IF p_at IS NULL THEN
    -- an operator's statement of the tax ID as it is now: the newest state
    v_at := greatest(v_at, d.tax_id_state_at);
  ELSIF d.stripe_tax_id IS NOT NULL AND v_id <> d.stripe_tax_id THEN
    -- another tax ID of the same number
    IF p_deleted OR NOT (d.tax_id_status = 'deleted' OR d.tax_id_state_at IS NULL
                         -- (its creation; without one, the time of this state)
                         OR coalesce(to_timestamp((o ->> 'created')::double precision), v_at) > d.tax_id_state_at) THEN
      RETURN;
    END IF;
  ELSIF d.stripe_tax_id IS NOT NULL THEN
    IF d.tax_id_status = 'deleted' THEN
      RETURN;    -- deleted is final for this tax ID
    END IF;
    IF NOT p_deleted AND d.tax_id_state_at IS NOT NULL
       AND (v_at < d.tax_id_state_at
            OR (v_at = d.tax_id_state_at
                AND coalesce(array_position(v_rank, v_status), 0) < coalesce(array_position(v_rank, d.tax_id_status), 0))) THEN
      RETURN;    -- an older state of this tax ID
    END IF;
    v_at := greatest(v_at, d.tax_id_state_at);
  END IF;
  IF billing.eu_vat_pattern(v_origin) IS NULL THEN
    v_origin := NULL;    -- not an EU member state's code (GR, not EL): reverse charge is never decided
  END IF;
  -- reverse charge: a verified EU VAT number of another member state than ours
  v_rc := v_status = 'verified' AND billing.eu_vat_pattern(d.country) IS NOT NULL
          AND v_origin IS NOT NULL AND d.country <> v_origin;
  UPDATE billing.billing_details x
     SET stripe_tax_id = v_id, tax_id_status = v_status, reverse_charge = v_rc, tax_id_state_at = v_at
   WHERE x.tenant_id = p_tenant;
  IF d.tax_id_status IS DISTINCT FROM v_status THEN
    PERFORM billing.audit('tax_id.' || v_status, p_tenant,
                          jsonb_build_object('tax_id', v_id, 'vat_number', d.vat_number));
  END IF;
  IF d.reverse_charge IS DISTINCT FROM v_rc AND v_cust IS NOT NULL THEN
    PERFORM billing.tax_exempt_send(p_tenant, v_cust, CASE WHEN v_rc THEN 'reverse' ELSE 'none' END);
    PERFORM billing.audit('tax.reverse_charge', p_tenant, jsonb_build_object(
      'reverse_charge', v_rc,
      'basis', jsonb_build_object('vat_number', d.vat_number, 'verification', v_status,
                                  'customer_country', d.country, 'origin_country', v_origin,
                                  'eu_member', billing.eu_vat_pattern(d.country) IS NOT NULL),
      'tax_exempt', CASE WHEN v_rc THEN 'reverse' ELSE 'none' END));
  END IF;
END
$$;
COMMENT ON FUNCTION billing.sync_tax_id(text, jsonb, boolean, timestamptz) IS
  'Mirror a tenant''s tax ID (verification status) as of Stripe time p_at (older states ignored, deletion final) and decide reverse charge: a verified EU VAT number of another member state than qes_billing.tax_origin_country; the customer''s tax_exempt follows in Stripe, the last decision last; audited with its basis.';

-- ---- the invoices' tax --------------------------------------------------------

-- The first of its arguments that is a JSON array, else [] (Stripe sends
-- null for a list it has nothing in, and older or newer API versions name
-- the same list differently).
CREATE FUNCTION billing.json_array(VARIADIC v jsonb[]) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT x FROM unnest(v) WITH ORDINALITY AS u(x, n) WHERE jsonb_typeof(x) = 'array' ORDER BY n LIMIT 1),
                '[]'::jsonb);
COMMENT ON FUNCTION billing.json_array(jsonb[]) IS
  'The first argument that is a JSON array, else an empty array (Stripe sends null for an empty list).';

-- A line's taxes, in either API shape (tax_amounts before 2025-03-31,
-- taxes since): amount, inclusive or not, the rate (its id, or its
-- percentage when expanded) or the taxability reason.
CREATE FUNCTION billing.invoice_line_taxes(l jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
          'amount', (x ->> 'amount')::bigint,
          'inclusive', coalesce((x ->> 'inclusive')::boolean, x ->> 'tax_behavior' = 'inclusive'),
          'taxable_amount', (x ->> 'taxable_amount')::bigint,
          'rate', coalesce(x -> 'tax_rate' ->> 'percentage', x -> 'tax_rate_details' -> 'tax_rate' ->> 'percentage'),
          'tax_rate', coalesce(CASE WHEN jsonb_typeof(x -> 'tax_rate') = 'string' THEN x ->> 'tax_rate' END,
                               x -> 'tax_rate' ->> 'id',
                               CASE WHEN jsonb_typeof(x -> 'tax_rate_details' -> 'tax_rate') = 'string'
                                    THEN x -> 'tax_rate_details' ->> 'tax_rate' END),
          'taxability_reason', x ->> 'taxability_reason')))
          FROM jsonb_array_elements(billing.json_array(l -> 'tax_amounts', l -> 'taxes')) x), '[]'::jsonb);

-- An invoice event that was applied: keep the invoice's tax (the newest event's).
CREATE FUNCTION billing.keep_invoice_tax() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := (NEW.payload -> 'data' -> 'object')::jsonb;
  v_at    timestamptz := NEW.stripe_created;
  v_tax   bigint;
  v_no    boolean;
  v_old   billing.invoice_taxes;
BEGIN
  IF NEW.tenant_id IS NULL OR NEW.tenant_id = '' OR o ->> 'id' IS NULL
     OR NOT EXISTS (SELECT FROM billing.tenants t WHERE t.tenant_id = NEW.tenant_id) THEN
    RETURN NULL;
  END IF;
  SELECT * INTO v_old FROM billing.invoice_taxes x WHERE x.tenant_id = NEW.tenant_id AND x.stripe_invoice_id = o ->> 'id';
  IF v_old.stripe_state_at > v_at THEN
    RETURN NULL;   -- an older state of the invoice
  END IF;
  v_tax := coalesce((o ->> 'tax')::bigint,
                    (SELECT sum((x ->> 'amount')::bigint) FROM jsonb_array_elements(
                       billing.json_array(o -> 'total_tax_amounts', o -> 'total_taxes')) x),
                    (o ->> 'total')::bigint - (o ->> 'total_excluding_tax')::bigint);
  -- finalized (not a draft) while Stripe could not locate the customer
  v_no := coalesce(o ->> 'status', 'draft') <> 'draft'
          AND coalesce(o -> 'automatic_tax' ->> 'disabled_reason' = 'finalization_requires_location_inputs'
                       OR o -> 'automatic_tax' ->> 'status' = 'requires_location_inputs', false);
  INSERT INTO billing.invoice_taxes AS x (tenant_id, stripe_invoice_id, currency, subtotal, tax, total,
                                          automatic_tax_enabled, automatic_tax_status, automatic_tax_disabled_reason,
                                          finalized_without_tax, tax_lines, stripe_state_at)
  VALUES (NEW.tenant_id, o ->> 'id', coalesce(o ->> 'currency', 'usd'), (o ->> 'subtotal')::bigint, v_tax,
          (o ->> 'total')::bigint, (o -> 'automatic_tax' ->> 'enabled')::boolean, o -> 'automatic_tax' ->> 'status',
          o -> 'automatic_tax' ->> 'disabled_reason', v_no,
          coalesce((SELECT jsonb_agg(jsonb_build_object('line', l ->> 'id', 'description', l ->> 'description',
                                                        'amount', (l ->> 'amount')::bigint,
                                                        'taxes', billing.invoice_line_taxes(l)) ORDER BY n)
                      FROM jsonb_array_elements(billing.json_array(o -> 'lines' -> 'data')) WITH ORDINALITY AS e(l, n)),
                   '[]'::jsonb),
          v_at)
  ON CONFLICT (tenant_id, stripe_invoice_id) DO UPDATE
     SET currency = EXCLUDED.currency, subtotal = EXCLUDED.subtotal, tax = EXCLUDED.tax, total = EXCLUDED.total,
         automatic_tax_enabled = EXCLUDED.automatic_tax_enabled, automatic_tax_status = EXCLUDED.automatic_tax_status,
         automatic_tax_disabled_reason = EXCLUDED.automatic_tax_disabled_reason,
         finalized_without_tax = x.finalized_without_tax OR EXCLUDED.finalized_without_tax,
         tax_lines = EXCLUDED.tax_lines, stripe_state_at = EXCLUDED.stripe_state_at;
  IF v_no AND NOT coalesce(v_old.finalized_without_tax, false) THEN
    PERFORM billing.audit('invoice.finalized_without_tax', NEW.tenant_id,
                          jsonb_build_object('invoice', o ->> 'id', 'number', o ->> 'number',
                                             'automatic_tax', o -> 'automatic_tax'));
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.keep_invoice_tax() IS
  'Trigger: when an invoice event is applied, keep the invoice''s tax as that event shows it (unless a newer event''s is kept); an invoice finalized without tax because the location was missing is marked and audited once.';
CREATE TRIGGER keep_invoice_tax AFTER UPDATE OF state ON billing.webhook_events
  FOR EACH ROW WHEN (NEW.state = 'applied' AND NEW.event_type LIKE 'invoice.%')
  EXECUTE FUNCTION billing.keep_invoice_tax();

-- Prometheus: invoices finalized without tax because the location was
-- missing (the alert QesBillingInvoiceWithoutTax), and tax IDs by status.
CREATE VIEW billing.prometheus_tax AS
SELECT (SELECT count(*) FROM billing.invoice_taxes x WHERE x.finalized_without_tax) AS invoices_without_tax_total,
       (SELECT count(*) FROM billing.billing_details d WHERE d.state = 'refused') AS billing_details_refused,
       (SELECT count(*) FROM billing.billing_details d WHERE d.tax_id_status = 'pending') AS tax_ids_pending,
       (SELECT count(*) FROM billing.billing_details d WHERE d.reverse_charge) AS reverse_charge_customers;
COMMENT ON VIEW billing.prometheus_tax IS
  'Prometheus: invoices Stripe finalized without tax because the customer''s location was missing (a counter: the mark is never removed), billing details Stripe refused, VAT numbers awaiting verification, customers billed by reverse charge.';

-- ---- one-time payments: Stripe Tax's calculation, then a tax transaction ---------
--
-- A payment intent carries no tax of its own.  With qes_billing.automatic_tax
-- on, api.create_payment_intent first asks Stripe Tax for a calculation
-- (the tenant's address, the price's tax_behavior) and the payment intent
-- waits for it; the calculation's answer sets the payment intent's amount
-- to the calculation's total (billing.tax_calculation_apply).  When the
-- payment succeeds, the calculation is recorded as a tax transaction (what
-- Stripe's tax reports count).  Chosen over an invoice per payment: one
-- request more instead of three (invoice item, invoice, finalize), and the
-- payment flow the front end knows stays as it is.

CREATE FUNCTION billing.tax_calculation_request(p_tenant text, p_customer text, p_payment bigint,
                                                p_amount bigint, p_currency text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_req bigint;
BEGIN
  v_req := billing.outbox_enqueue(p_tenant, 'tax.calculation', 'POST', '/v1/tax/calculations',
             jsonb_build_object('currency', p_currency, 'customer', p_customer,
                                'line_items', jsonb_build_array(jsonb_build_object(
                                   'amount', p_amount, 'reference', 'payment_' || p_payment,
                                   'tax_behavior', current_setting('qes_billing.tax_behavior'))),
                                'expand', jsonb_build_array('line_items')),
             jsonb_build_object('payment_id', p_payment));
  INSERT INTO billing.payment_taxes (tenant_id, payment_id, amount_subtotal, calculation_request)
  VALUES (p_tenant, p_payment, p_amount, v_req);
  RETURN v_req;
END
$$;
COMMENT ON FUNCTION billing.tax_calculation_request(text, text, bigint, bigint, text) IS
  'Queue Stripe Tax''s calculation for a one-time payment (the payment intent waits for it).';

CREATE FUNCTION billing.tax_calculation_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := r.response;
  v_pay   bigint := (r.subject ->> 'payment_id')::bigint;
  v_total bigint := (o ->> 'amount_total')::bigint;
  v_tax   bigint := coalesce((o ->> 'tax_amount_exclusive')::bigint, 0) + coalesce((o ->> 'tax_amount_inclusive')::bigint, 0);
BEGIN
  IF r.kind = 'tax.transaction' THEN
    UPDATE billing.payment_taxes x SET transaction_id = o ->> 'id'
     WHERE x.tenant_id = r.tenant_id AND x.payment_id = v_pay;
    RETURN;
  END IF;
  UPDATE billing.payment_taxes x
     SET calculation_id = o ->> 'id', tax = v_tax, amount_total = v_total, tax_breakdown = o -> 'tax_breakdown'
   WHERE x.tenant_id = r.tenant_id AND x.payment_id = v_pay;
  -- the payment intent waiting for this calculation charges its total
  UPDATE billing.stripe_requests c
     SET params = c.params || jsonb_build_object('amount', v_total,
                                                 'metadata', coalesce(c.params -> 'metadata', '{}'::jsonb)
                                                             || jsonb_build_object('tax_calculation', o ->> 'id'))
   WHERE c.after_request = r.request_id AND c.state = 'waiting' AND c.kind = 'payment_intent.create';
  UPDATE billing.payments p SET amount = v_total, updated_at = now()
   WHERE p.tenant_id = r.tenant_id AND p.payment_id = v_pay AND v_total > 0;
  PERFORM billing.audit('tax.calculated', r.tenant_id,
                        jsonb_build_object('payment_id', v_pay, 'calculation', o ->> 'id', 'tax', v_tax,
                                           'amount_total', v_total,
                                           'taxability_reason', o -> 'tax_breakdown' -> 0 ->> 'taxability_reason'));
END
$$;
COMMENT ON FUNCTION billing.tax_calculation_apply(billing.stripe_requests) IS
  'Stripe Tax''s calculation for a one-time payment: kept, and the waiting payment intent charges its total; or the tax transaction recorded.';

-- A one-time payment that succeeded: its calculation becomes a tax transaction.
CREATE FUNCTION billing.record_tax_transaction() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  x billing.payment_taxes;
BEGIN
  SELECT * INTO x FROM billing.payment_taxes t
   WHERE t.tenant_id = NEW.tenant_id AND t.payment_id = NEW.payment_id FOR UPDATE;
  IF FOUND AND x.calculation_id IS NOT NULL AND x.transaction_request IS NULL THEN
    UPDATE billing.payment_taxes t
       SET transaction_request = billing.outbox_enqueue(NEW.tenant_id, 'tax.transaction', 'POST',
                                   '/v1/tax/transactions/create_from_calculation',
                                   jsonb_build_object('calculation', x.calculation_id,
                                                      'reference', 'payment_' || NEW.payment_id),
                                   jsonb_build_object('payment_id', NEW.payment_id))
     WHERE t.tenant_id = NEW.tenant_id AND t.payment_id = NEW.payment_id;
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.record_tax_transaction() IS
  'Trigger: a one-time payment with a tax calculation succeeded: record it as a Stripe Tax transaction, once.';
CREATE TRIGGER record_tax_transaction AFTER UPDATE OF status ON billing.payments
  FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded' AND NEW.kind = 'one_time')
  EXECUTE FUNCTION billing.record_tax_transaction();
