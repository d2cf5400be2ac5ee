# ALTER EXTENSION qes_billing UPDATE from 0.1 to 0.2 (docs/operations.md,
# "Upgrades").
#
# The 0.1 library is not built here (its sources are history), so the test
# starts where a real upgrade stands after its restart: the 0.2 library is
# loaded and the database holds 0.1's SQL (CREATE EXTENSION qes_billing
# VERSION '0.1', from the frozen sql/qes_billing--0.1.sql).  The worker must
# see the mismatch, keep its heartbeat and do nothing.  0.1's own SQL makes
# the activity -- tenants, subscriptions through the API and through
# webhooks (applied by 0.1's billing.worker_tick(), as 0.1's worker did),
# invoices, payments, refusals, usage rows as 0.1's record_usage wrote them,
# an operator's catalog changes, the audit rows of all of it.  Then ALTER
# EXTENSION qes_billing UPDATE runs while the worker runs, and:
#
#   * the schema is exactly a fresh 0.2 install's: pg_dump of the updated
#     database and of a fresh one (binary-upgrade mode, the only one that
#     dumps an extension's member objects; OIDs and xids left out), the
#     extension's members (pg_describe_object of every pg_depend 'e' row),
#     its pg_dump marks (extconfig, extcondition) and its seed rows;
#   * every 0.1 row and sequence is still there, as it was, but for what the
#     upgrade script says it migrates (checked for what it should be); the
#     audit chain verifies and its 0.1 rows are untouched; check_limit
#     counts the 0.1 usage;
#   * the worker kept its heartbeat through the update, resumed by itself
#     when it committed, applies the event that waited, sends the requests
#     0.1 queued, applies a new event and writes the refusals it counted.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use JSON::PP;
use HTTP::Tiny;
use Digest::SHA qw(hmac_sha256_hex);
use File::Basename;
use Cwd qw(abs_path);
use Time::HiRes qw(time usleep);
use QesTest;

my $whsec = 'whsec_tap_upgrade';
my $json = JSON::PP->new->canonical;
my $root = abs_path(dirname(__FILE__) . '/../..');

# the fake Stripe
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my ($fake_out, $fake_err) = ('', '');
my $fake = IPC::Run::start(['python3', "$root/test/python/fake_stripe.py", '--port', $fake_port],
	'>', \$fake_out, '2>', \$fake_err);
ok(defined wait_for(sub { $fake->pump_nb; $fake_out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($fake_err);
my $http = HTTP::Tiny->new(default_headers => { Authorization => 'Bearer sk_test_tap_upgrade' });

sub stripe_post
{
	my ($path, $form) = @_;
	my $r = $http->post_form("http://127.0.0.1:$fake_port$path", $form);
	die "fake Stripe $path: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}

sub fake_requests { return fake_stats($fake_port)->{requests}; }

my $node = qes_node('upgrade', conf => [
	"qes_billing.environment = 'development'",
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_upgrade'",
	"qes_billing.stripe_test_webhook_secret = '$whsec'",
	"qes_billing.retry_base_delay = '50ms'",
	"qes_billing.retry_max_delay = '500ms'",
	"timezone = 'UTC'"]);

sub q1 { return $node->safe_psql($_[1] // 'postgres', $_[0]); }

sub as_tenant
{
	my ($tenant, $sql) = @_;
	return q1(qq{
		SET ROLE qes_tenant;
		SET request.jwt.claims = '{"role": "qes_tenant", "tenant_id": "$tenant"}';
		$sql});
}

# POST /rpc/stripe_webhook as PostgREST calls it; returns the HTTP status
sub deliver
{
	my ($event, $secret) = @_;
	my $body = $json->encode($event);
	my $t = int(time);
	my $sig = "t=$t,v1=" . hmac_sha256_hex("$t.$body", $secret // $whsec);
	my $headers = $json->encode({ 'content-type' => 'application/json', 'stripe-signature' => $sig });
	return q1(qq{
		BEGIN;
		SET LOCAL ROLE qes_anon;
		SET LOCAL request.jwt.claims = '{"role": "qes_anon"}';
		SET LOCAL request.headers = '$headers';
		SET LOCAL response.status = '';
		SELECT api.stripe_webhook(\$body\$$body\$body\$::json) AS answer \\gset
		SELECT coalesce(nullif(current_setting('response.status', true), ''), '200');
		COMMIT;});
}

sub event
{
	my ($id, $type, $created, $object) = @_;
	return { id => $id, object => 'event', type => $type, created => $created, livemode => JSON::PP::false,
			 api_version => '2024-06-20', data => { object => $object } };
}

sub event_state
{
	return q1("SELECT state FROM billing.webhook_events WHERE stripe_event_id = '$_[0]'");
}

# ---------------------------------------------------------------------------
# 0.1's SQL on the 0.2 library

my $log_offset = -s $node->logfile;
q1("CREATE EXTENSION qes_billing VERSION '0.1'");
is(q1("SELECT extversion FROM pg_extension WHERE extname = 'qes_billing'"), '0.1', 'version 0.1 installed');

# every C function the frozen 0.1 script declares exists in this library:
# CREATE FUNCTION ... LANGUAGE c loads its symbol, so the CREATE EXTENSION
# above resolved each one
my $script01 = slurp_file("$root/sql/qes_billing--0.1.sql");
my %symbols = map { $_ => 1 } ($script01 =~ /'MODULE_PATHNAME',\s*'(\w+)'/g);
cmp_ok(scalar(keys %symbols), '>', 10, 'the 0.1 script declares C functions');
is(q1(q{SELECT string_agg(DISTINCT p.prosrc, ',' ORDER BY p.prosrc)
          FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'qes_billing'
         WHERE p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')}),
	join(',', sort keys %symbols), 'each C symbol of the 0.1 script was found in the 0.2 library');

# the worker pauses: heartbeat only, and it says why
my $paused = qr/^paused: extension qes_billing is version 0\.1 in database "postgres", the library is version 0\.2; run ALTER EXTENSION qes_billing UPDATE$/;
ok(defined wait_for(sub { (q1('SELECT last_error FROM billing.worker_state()') // '') =~ $paused }, 30),
	'worker_state().last_error says the worker waits for ALTER EXTENSION UPDATE');
like(q1("SELECT api.health() -> 'worker' ->> 'last_error'"), $paused, 'so does api.health');
my $loops = worker_state($node)->{loops};
ok(defined wait_for(sub { worker_state($node)->{loops} >= $loops + 3 }, 30), 'its heartbeat goes on');

# ---------------------------------------------------------------------------
# activity under 0.1

# what 0.1's setup made: products and prices in Stripe, their ids in the catalog
my %price;
for my $plan (['professional', 2900, 29000], ['enterprise', 9900, 99000])
{
	my $prod = stripe_post('/v1/products', { id => "prod_qes_$plan->[0]", name => ucfirst $plan->[0] });
	for my $iv (['month', $plan->[1]], ['year', $plan->[2]])
	{
		my $key = "$plan->[0]_" . ($iv->[0] eq 'month' ? 'monthly' : 'yearly');
		$price{$key} = stripe_post('/v1/prices', { product => $prod->{id}, currency => 'usd',
			unit_amount => $iv->[1], 'recurring[interval]' => $iv->[0], lookup_key => $key })->{id};
		q1("UPDATE billing.prices SET stripe_price_id = '$price{$key}' WHERE price_key = '$key'");
	}
	q1("UPDATE billing.plans SET stripe_product_id = '$prod->{id}' WHERE plan_id = '$plan->[0]'");
}
# an operator's changes to seeded rows
q1(q{UPDATE billing.plan_limits SET soft_limit = 5, hard_limit_pct = 200 WHERE plan_id = 'free' AND metric = 'signatures';
     UPDATE billing.plan_limits SET soft_limit = 250 WHERE plan_id = 'professional' AND metric = 'signatures'});

q1(q{SELECT count(billing.upsert_tenant(t, initcap(t) || ' Ltd', t || '@upgrade.example'))
       FROM unnest(ARRAY['acme', 'beta', 'gamma', 'delta']) t});
as_tenant('gamma', "SELECT api.create_subscription('free', 'month')");
# beta subscribes: 0.1 queues the customer and the subscription; the worker
# is paused, so they are sent after the update
as_tenant('beta', "SELECT api.create_subscription('professional', 'month')");

# at a fixed date through the billing clock, so that the day it runs changes
# nothing: half an hour into a month (the subscriptions' periods start in the
# month before), and in the past of any day it runs, as Stripe's events are
my $at = q1(q{SELECT extract(epoch FROM timestamptz '2026-11-01 00:30:00+00')::bigint});
q1("SELECT billing.set_clock(to_timestamp($at) - now())");

# webhooks, applied by 0.1's handlers
my $base = $at - 3600;
my $period_end = $base + 30 * 86400;
sub sub_object
{
	my ($id, $cust, $tenant, $status) = @_;
	return { id => $id, object => 'subscription', customer => $cust, status => $status, created => $base,
			 billing_cycle_anchor => $base, cancel_at_period_end => JSON::PP::false,
			 current_period_start => $base, current_period_end => $period_end, metadata => { tenant_id => $tenant },
			 items => { data => [ { price => { id => $price{professional_monthly}, lookup_key => 'professional_monthly',
											   recurring => { interval => 'month' } } } ] } };
}
my @events = (
	event('evt_up_01', 'customer.created', $base,
		{ id => 'cus_up_acme', object => 'customer', created => $base, metadata => { tenant_id => 'acme' } }),
	event('evt_up_02', 'customer.subscription.created', $base + 1, sub_object('sub_up_acme', 'cus_up_acme', 'acme', 'active')),
	event('evt_up_03', 'invoice.paid', $base + 2,
		{ id => 'in_up_acme_1', object => 'invoice', customer => 'cus_up_acme', subscription => 'sub_up_acme',
		  status => 'paid', amount_due => 2900, amount_paid => 2900, amount_remaining => 0, currency => 'usd',
		  attempt_count => 1, payment_intent => 'pi_up_acme_1', created => $base + 1,
		  status_transitions => { finalized_at => $base + 1, paid_at => $base + 2 },
		  period_start => $base, period_end => $period_end }),
	event('evt_up_04', 'payment_intent.succeeded', $base + 3,
		{ id => 'pi_up_acme_1', object => 'payment_intent', customer => 'cus_up_acme', amount => 2900,
		  currency => 'usd', status => 'succeeded', latest_charge => 'ch_up_acme_1', invoice => 'in_up_acme_1' }),
	event('evt_up_05', 'customer.created', $base + 4,
		{ id => 'cus_up_delta', object => 'customer', created => $base + 4, metadata => { tenant_id => 'delta' } }),
	event('evt_up_06', 'customer.subscription.created', $base + 5, sub_object('sub_up_delta', 'cus_up_delta', 'delta', 'active')),
	event('evt_up_07', 'invoice.payment_failed', $base + 60,
		{ id => 'in_up_delta_1', object => 'invoice', customer => 'cus_up_delta', subscription => 'sub_up_delta',
		  status => 'open', amount_due => 2900, amount_paid => 0, amount_remaining => 2900, currency => 'usd',
		  attempt_count => 1, created => $base + 50, status_transitions => { finalized_at => $base + 50 },
		  period_start => $base, period_end => $period_end }),
	event('evt_up_08', 'customer.subscription.updated', $base + 61, sub_object('sub_up_delta', 'cus_up_delta', 'delta', 'past_due')),
	# a customer that is nobody's (yet): 0.1 ignores it
	event('evt_up_09', 'invoice.paid', $base + 62,
		{ id => 'in_up_stranger', object => 'invoice', customer => 'cus_up_stranger', status => 'paid',
		  amount_due => 100, amount_paid => 100, amount_remaining => 0, currency => 'usd', created => $base + 62 }));
is(deliver($_), '200', "webhook $_->{id} accepted") for @events;
$loops = worker_state($node)->{loops};
ok(defined wait_for(sub { worker_state($node)->{loops} >= $loops + 3 }, 30), 'the worker loops (woken by the deliveries)');
is(q1("SELECT count(*) FROM billing.webhook_events WHERE state <> 'received'"), '0', 'and applies nothing');
is(q1('SELECT applied FROM billing.worker_tick()'), scalar(@events), "0.1's billing.worker_tick() applies them");
is(q1("SELECT string_agg(state, ',' ORDER BY stripe_event_id) FROM billing.webhook_events"),
	join(',', ('applied') x 8, 'ignored'), 'applied (one ignored: an unknown customer)');
is(q1("SELECT status || ' ' || (grace_until IS NOT NULL) FROM billing.subscriptions WHERE stripe_subscription_id = 'sub_up_delta'"),
	'past_due true', "delta is past due, in 0.1's grace period");

# an event that arrives late, applied after the update
is(deliver(event('evt_up_10', 'customer.updated', $base + 70,
		{ id => 'cus_up_acme', object => 'customer', created => $base, metadata => { tenant_id => 'acme' } })),
	'200', 'an event that waits for the update');
# a refusal as 0.1's intake wrote it, and one the 0.2 library counts in memory
is(q1("SELECT billing.webhook_reject('mismatch', 'evt_up_forged_01', 'invoice.paid') ->> 'reason'"), 'mismatch',
	"0.1's refusal row");
is(deliver(event('evt_up_forged_02', 'invoice.paid', $base, {}), 'whsec_wrong'), '400', 'a forged webhook is refused');
# a secret 0.1 stored in clear (the answer to creating the webhook endpoint)
q1(q{INSERT INTO billing.stripe_requests (kind, method, path, state, attempts, http_status, response)
     VALUES ('setup.webhook_endpoint', 'POST', '/v1/webhook_endpoints', 'succeeded', 1, 200,
             '{"id": "we_up", "object": "webhook_endpoint", "secret": "whsec_stored_in_clear_by_01"}')});

# usage, as 0.1's record_usage wrote it (its C function belongs to the 0.1
# library; the 0.2 one reads 0.2's tables): the tenant's period, Free in
# calendar months
q1(q{
	INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at, total_after)
	SELECT u.t, u.k, u.m, u.q,
	       coalesce((SELECT s.current_period_start FROM billing.subscriptions s
	                  WHERE s.tenant_id = u.t AND s.status IN ('active', 'trialing', 'past_due')
	                    AND s.current_period_start IS NOT NULL),
	                date_trunc('month', billing.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
	       billing.now() - interval '1 minute', NULL
	  FROM (VALUES ('acme', 'up-acme-1', 'signatures', 7), ('acme', 'up-acme-2', 'documents', 3),
	               ('acme', 'up-acme-3', 'storage', 123456789), ('beta', 'up-beta-1', 'api_calls', 50),
	               ('beta', 'up-beta-2', 'signatures', 4), ('gamma', 'up-gamma-1', 'signatures', 3),
	               ('gamma', 'up-gamma-2', 'signatures', 2)) u(t, k, m, q)});

for my $t (qw(tenants subscriptions usage_events invoices payments stripe_requests webhook_events
			  webhook_rejections audit_log))
{
	cmp_ok(q1("SELECT count(*) FROM billing.$t"), '>', 0, "0.1 has rows in $t");
}
is(q1('SELECT ok FROM billing.verify_audit_chain()'), 't', "0.1's audit chain verifies");

# what must carry over: every 0.1 table's 0.1 columns, row by row
my %columns = map { my ($t, $c) = split /\|/; $t => $c } split /\n/, q1(q{
	SELECT c.relname, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
	  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
	 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
	 GROUP BY 1});
my @sequences = split /\n/, q1(q{
	SELECT relname FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind = 'S' ORDER BY 1});
sub snapshot_sql
{
	return join("\n", (map {
		"SELECT 'table $_', coalesce(string_agg(r::text, E'\\x1f' ORDER BY r::text), '') FROM (SELECT $columns{$_} FROM billing.$_) r;"
	} sort keys %columns), (map {
		"SELECT 'sequence $_', last_value || ' ' || is_called FROM billing.$_;"
	} @sequences));
}
sub parse_snapshot
{
	my %s;
	for (split /\n/, $_[0])
	{
		my ($k, $v) = split /\|/, $_, 2;
		$s{$k} = [ split /\x1f/, $v // '' ];
	}
	return \%s;
}
my $before = parse_snapshot(q1(snapshot_sql()));
my $usage_before = q1(q{
	SELECT string_agg(format('%s %s %s', tenant_id, metric, sum), ',' ORDER BY tenant_id, metric)
	  FROM (SELECT tenant_id, metric, sum(quantity) FROM billing.usage_events
	         WHERE metric <> 'storage' GROUP BY 1, 2) x});
my $audit_before = q1('SELECT max(audit_id) FROM billing.audit_log');

# ---------------------------------------------------------------------------
# ALTER EXTENSION qes_billing UPDATE, while the worker runs

my $worker_pid = worker_pid($node);
my $updater = $node->background_psql('postgres');
my $t0 = time;
$updater->query_safe('BEGIN');
$updater->query_safe('ALTER EXTENSION qes_billing UPDATE');
my $update_s = time - $t0;
note(sprintf('ALTER EXTENSION qes_billing UPDATE: %.2f s', $update_s));
# not committed yet: the worker still sees 0.1 and keeps its heartbeat
$loops = worker_state($node)->{loops};
ok(defined wait_for(sub { worker_state($node)->{loops} >= $loops + 3 }, 30),
	'the heartbeat goes on while the update is not committed');
is(q1("SELECT extversion FROM pg_extension WHERE extname = 'qes_billing'"), '0.1', 'others still see 0.1');
# the updated data, as the update leaves it (before the worker touches it)
my $after = parse_snapshot($updater->query_safe(snapshot_sql()));
$updater->query_safe('COMMIT');
$updater->quit;

is(q1("SELECT extversion FROM pg_extension WHERE extname = 'qes_billing'"), '0.2', 'version 0.2');
ok(defined wait_for(sub { (q1('SELECT last_error FROM billing.worker_state()') // '') eq '' }, 30),
	'the worker resumed by itself: its pause message is gone');
is(worker_pid($node), $worker_pid, 'the same worker process ran through the update');
my $log = slurp_file($node->logfile, $log_offset);
my @pauses = $log =~ /LOG:  qes_billing worker paused: extension qes_billing in database "postgres" is version 0\.1, the library is version 0\.2/g;
is(scalar(@pauses), 1, 'the pause was logged once');
like($log, qr/LOG:  qes_billing worker resumed: extension qes_billing in database "postgres" is version 0\.2 now/,
	'and so was the resumption');

# ---------------------------------------------------------------------------
# the schema is a fresh 0.2 install's

q1('CREATE DATABASE fresh');
q1('CREATE EXTENSION qes_billing', 'fresh');

# pg_dump leaves an extension's member objects out -- but in binary-upgrade
# mode, which dumps them all with their membership; what differs between
# two databases made alike (OIDs, relfilenodes, xids, the dump's random
# \restrict key) is left out, and comments
sub schema_dump
{
	my ($db) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(['pg_dump', '--binary-upgrade', '--schema-only', '-d', $node->connstr($db)],
		'>', \$out, '2>', \$err) or die "pg_dump $db: $err";
	$out =~ s/^\\(un)?restrict .*\n//mg;
	$out =~ s/^--.*\n//mg;
	$out =~ s/^SELECT pg_catalog\.binary_upgrade_set_next_\w+\(.*\);\n//mg;
	# the identity sequences are config tables: their values are data
	$out =~ s/^SELECT pg_catalog\.setval\(.*\);\n//mg;
	$out =~ s/^UPDATE pg_catalog\.pg_class\nSET relfrozenxid = '\d+', relminmxid = '\d+'\nWHERE oid = [^;]*;\n//mg;
	# the config tables by OID: compared by name below
	$out =~ s/(binary_upgrade_create_empty_extension\('qes_billing', '\w+', \w+, '[^']*'), '\{[\d,]*\}', .*\);/$1, <extconfig>);/mg;
	$out =~ s/\n{2,}/\n/g;
	return $out;
}

sub same_text
{
	my ($got, $want, $name) = @_;
	return pass($name) if $got eq $want;
	my ($dir) = PostgreSQL::Test::Utils::tempdir();
	open my $fh, '>', "$dir/updated" or die; print $fh $got; close $fh;
	open $fh, '>', "$dir/fresh" or die; print $fh $want; close $fh;
	my $diff = `diff -u $dir/fresh $dir/updated`;
	fail($name);
	diag("$name: - fresh 0.2 install, + updated from 0.1\n" . substr($diff, 0, 20000));
}

my $dump_updated = schema_dump('postgres');
my $dump_fresh = schema_dump('fresh');
cmp_ok(length($dump_fresh), '>', 100_000, 'the fresh dump holds the extension\'s objects');
like($dump_fresh, qr/ALTER EXTENSION qes_billing ADD TABLE billing\.subscriptions;/, 'with their membership');
same_text($dump_updated, $dump_fresh, 'pg_dump --schema-only: the updated schema is a fresh 0.2 install\'s');

my $members_sql = q{
	SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
	  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'qes_billing'
	 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	 ORDER BY 1};
my $members = q1($members_sql, 'fresh');
cmp_ok(scalar(my @m = split /\n/, $members), '>', 100, 'the fresh install has its members');
same_text(q1($members_sql), $members, 'the same member objects of the extension');

my $marks_sql = q{
	SELECT c.c::regclass::text || ' ' || coalesce(c.w, '')
	  FROM pg_extension e, unnest(e.extconfig, e.extcondition) c(c, w)
	 WHERE e.extname = 'qes_billing' ORDER BY 1};
same_text(q1($marks_sql), q1($marks_sql, 'fresh'), 'the same pg_dump marks (extconfig, extcondition)');
my $seeds_sql = q{SELECT relname || ' ' || "row"::text FROM billing.seed_rows ORDER BY 1};
same_text(q1($seeds_sql), q1($seeds_sql, 'fresh'), 'the same seed rows (the rows as installed, not as changed)');

# ---------------------------------------------------------------------------
# the data carried over

# what the upgrade script migrates (checked below); the audit log and its
# head move on (a migrated grace period is audited); everything else as it was
my %appended = ('table audit_log' => 1, 'table audit_head' => 1);
my %migrated = (
	'table subscriptions' => 'grace_until of a past-due subscription',
	'table stripe_requests' => 'a stored secret, redacted');
for my $k (sort keys %$before)
{
	next if $migrated{$k} || $appended{$k};
	is_deeply($after->{$k}, $before->{$k}, "$k carried over (" . scalar(@{ $before->{$k} }) . ' rows)');
}
for my $k (sort keys %migrated)
{
	is(scalar(@{ $after->{$k} }), scalar(@{ $before->{$k} }), "$k: every row carried over");
	my %b = map { $_ => 1 } @{ $before->{$k} };
	my @changed = grep { !$b{$_} } @{ $after->{$k} };
	is(scalar(@changed), 1, "$k: one row migrated ($migrated{$k})") or diag(join("\n", @changed));
}
like(join('', @{ $after->{'table stripe_requests'} }), qr/\[redacted\]/, 'the secret stored in clear is redacted');
unlike(join('', @{ $after->{'table stripe_requests'} }), qr/whsec_stored_in_clear_by_01/, 'and gone');

is(q1('SELECT ok FROM billing.verify_audit_chain()'), 't', 'the audit chain verifies after the update');
is(q1("SELECT count(*) FROM billing.audit_log WHERE audit_id <= $audit_before"), $audit_before,
	'with the 0.1 rows');
my %log_after = map { $_ => 1 } @{ $after->{'table audit_log'} };
is(scalar(grep { !$log_after{$_} } @{ $before->{'table audit_log'} }), 0, '0.1 audit rows untouched');

# usage totals: check_limit counts what 0.1 recorded
is(q1(q{
	SELECT string_agg(format('%s %s %s', u.tenant_id, u.metric, (billing.check_limit(u.tenant_id, u.metric, 0)).current),
	                  ',' ORDER BY u.tenant_id, u.metric)
	  FROM (SELECT DISTINCT tenant_id, metric FROM billing.usage_events WHERE metric <> 'storage') u}),
	$usage_before, 'check_limit counts the 0.1 usage');
is(q1(q{SELECT (billing.check_limit('acme', 'storage', 0)).current}), '123456789', 'and the storage gauge');
is(q1(q{SELECT (billing.check_limit('gamma', 'signatures', 1)).usage_limit}), '5', 'the operator\'s limit holds');

# the facts 0.2 keeps, from what 0.1 kept of them
is(q1(q{SELECT stripe_subscription_id || ' ' || attempt_count || ' ' || extract(epoch FROM finalized_at)::bigint
               || ' ' || extract(epoch FROM paid_at)::bigint
          FROM billing.invoices WHERE stripe_invoice_id = 'in_up_acme_1'}),
	'sub_up_acme 1 ' . ($base + 1) . ' ' . ($base + 2), 'an invoice: its subscription, attempts, transitions');
is(q1(q{SELECT extract(epoch FROM first_failed_at)::bigint FROM billing.invoices WHERE stripe_invoice_id = 'in_up_delta_1'}),
	$base + 60, 'a failed invoice: its first failed attempt (the event\'s time)');
is(q1(q{SELECT string_agg(tenant_id || ' ' || stripe_payment_intent_id || ' ' || stripe_invoice_id, ',')
          FROM billing.invoice_payments}), 'acme pi_up_acme_1 in_up_acme_1', 'which payment pays which invoice');
is(q1(q{SELECT kind || ' ' || stripe_invoice_id FROM billing.payments WHERE stripe_payment_intent_id = 'pi_up_acme_1'}),
	'subscription in_up_acme_1', 'the payment knows its invoice');
is(q1(q{SELECT string_agg(tenant_id || ' ' || stripe_customer_id || ' ' || coalesce(extract(epoch FROM stripe_created)::bigint::text, '-'),
                          ',' ORDER BY tenant_id) FROM billing.stripe_customers}),
	"acme cus_up_acme $base,delta cus_up_delta " . ($base + 4), 'the tenants\' Stripe customers');
is(q1(q{SELECT string_agg(extract(epoch FROM billing_cycle_anchor)::bigint || ' ' || extract(epoch FROM stripe_created)::bigint, ',')
          FROM billing.subscriptions WHERE stripe_subscription_id IS NOT NULL}),
	"$base $base,$base $base", 'subscriptions: cycle anchor and creation time');
is(q1(q{SELECT s.grace_until = i.first_failed_at + current_setting('qes_billing.grace_period')::interval
          FROM billing.subscriptions s JOIN billing.invoices i ON i.stripe_subscription_id = s.stripe_subscription_id
         WHERE s.stripe_subscription_id = 'sub_up_delta'}),
	't', 'the grace period runs from the first failed attempt');
is(q1(q{SELECT count(*) FROM billing.audit_log WHERE audit_id > } . $audit_before . q{ AND action LIKE 'dunning.%'}),
	'1', 'and its change is audited');
is(q1(q{SELECT state || ' ' || array_to_string(waits_for, ',') FROM billing.webhook_events WHERE stripe_event_id = 'evt_up_09'}),
	'ignored cus_up_stranger', 'the ignored event waits for its customer');
is(q1(q{SELECT count(*) FROM billing.webhook_rejections WHERE deliveries = 1 AND stripe_event_id = 'evt_up_forged_01'}),
	'1', "0.1's refusal is one delivery");

# a pg_dump keeps the operator's change to a seed row, and no seed row
my ($data, $derr) = ('', '');
IPC::Run::run(['pg_dump', '--data-only', '-t', 'billing.plan_limits', '-d', $node->connstr('postgres')],
	'>', \$data, '2>', \$derr) or diag($derr);
my @limit_rows = grep { /^(free|professional|enterprise)\t/ } split /\n/, $data;
is(join(';', sort @limit_rows), "free\tsignatures\t5\t200;professional\tsignatures\t250\t\\N",
	'pg_dump keeps exactly the seed rows 0.1\'s operator changed');

# ---------------------------------------------------------------------------
# the worker carries on

ok(defined wait_for(sub { event_state('evt_up_10') eq 'applied' }, 30), 'the event that waited is applied');
ok(defined wait_for(sub {
	q1(q{SELECT count(*) FILTER (WHERE state = 'succeeded') || '/' || count(*) FROM billing.stripe_requests
	      WHERE tenant_id = 'beta'}) eq '2/2' }, 60),
	'the requests 0.1 queued are sent and answered');
is(q1(q{SELECT status || ' ' || (stripe_subscription_id IS NOT NULL) FROM billing.subscriptions
         WHERE tenant_id = 'beta' AND plan_id = 'professional'}), 'incomplete true', 'beta\'s subscription is mirrored');
my @sent = grep { $_->[1] =~ m{^/v1/(customers|subscriptions)$} } @{ fake_requests() };
is(scalar(@sent), 2, 'Stripe got each request once');
is(deliver(event('evt_up_11', 'customer.subscription.updated', $base + 80,
		sub_object('sub_up_acme', 'cus_up_acme', 'acme', 'active'))), '200', 'a new event');
ok(defined wait_for(sub { event_state('evt_up_11') eq 'applied' }, 30), 'applied by the 0.2 worker');
ok(defined wait_for(sub {
	q1(q{SELECT count(*) FROM billing.webhook_rejections WHERE reason = 'mismatch' AND stripe_event_id IS NULL}) ne '0' }, 90),
	'the refusal the 0.2 library counted under 0.1 is written');
is(q1('SELECT ok FROM billing.verify_audit_chain()'), 't', 'the audit chain verifies');
is(q1(q{SELECT api.health() ->> 'status'}), 'ok', 'healthy');
$log = slurp_file($node->logfile, $log_offset);
unlike($log, qr/qes_billing worker loop failed|could not record/, 'no worker error in the log');

amcheck_all($node);
amcheck_all($node, 'fresh');
$node->stop;
$fake->kill_kill;
done_testing();
