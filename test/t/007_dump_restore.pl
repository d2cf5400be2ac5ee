# pg_dump and restore of a live billing database (docs/architecture.md, rule 11).
#
# After real activity -- setup against the (fake) Stripe, tenants,
# subscriptions through the API and through webhooks, invoices, payments, a
# dispute, usage, notifications, a refused webhook, an operator's limit
# change, a shifted billing clock -- the database is dumped and restored
# twice into a second cluster: `pg_dump | psql` into the database the
# worker serves, and `pg_dump -Fc` + `pg_restore` into another one.  Each
# restore must hold every billing table row for row and every sequence as
# dumped, no seed row twice, a verifying audit chain, the same check_limit
# answer for every tenant and metric, and no stored secret; then it must
# work: audited calls, usage, new outbox rows, notifications, payments and
# refusals get fresh ids, and the worker carries on with what was queued.
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
use QesTest;

my $whsec = 'whsec_tap_dump_restore';
my $stored_secret = 'whsec_stored_never_dumped';
my $json = JSON::PP->new->canonical;

# the fake Stripe both clusters talk to
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my $fake_py = abs_path(dirname(__FILE__) . '/../python/fake_stripe.py');
my ($fake_out, $fake_err) = ('', '');
my $fake = IPC::Run::start(['python3', $fake_py, '--port', $fake_port], '>', \$fake_out, '2>', \$fake_err);
ok(defined wait_for(sub { $fake->pump_nb; $fake_out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($fake_err);

my @conf = (
	"qes_billing.environment = 'development'",
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_dump_restore'",
	"qes_billing.stripe_test_webhook_secret = '$whsec'",
	"qes_billing.retry_base_delay = '50ms'",
	"qes_billing.retry_max_delay = '500ms'",
	"timezone = 'UTC'");
my $src = qes_node('dump_source', conf => \@conf);
# the restore target starts with its worker paused, so that what is
# compared is exactly what was restored; it is resumed afterwards
my $dst = qes_node('dump_target', conf => [ @conf, 'qes_billing.worker_paused = on' ]);

# ---------------------------------------------------------------------------
# helpers

# run SQL; a failure is a failed test (not a die), so that every broken
# step of a bad restore is reported
sub sql_ok
{
	my ($node, $db, $sql, $name) = @_;
	my ($rc, $out, $err) = $node->psql($db, $sql, on_error_stop => 1);
	ok($rc == 0, $name) or diag("$name: $err");
	return $rc == 0 ? $out : undef;
}

sub q1
{
	my ($node, $db, $sql) = @_;
	return $node->safe_psql($db, $sql);
}

sub as_tenant
{
	my ($node, $db, $tenant, $sql, $name) = @_;
	return sql_ok($node, $db, qq{
		SET ROLE qes_tenant;
		SET request.jwt.claims = '{"role": "qes_tenant", "tenant_id": "$tenant"}';
		$sql}, $name);
}

# POST /rpc/stripe_webhook as PostgREST calls it; returns the HTTP status
sub deliver
{
	my ($node, $db, $event, $secret) = @_;
	my $body = $json->encode($event);
	my $t = time;
	my $sig = "t=$t,v1=" . hmac_sha256_hex("$t.$body", $secret // $whsec);
	my $headers = $json->encode({ 'content-type' => 'application/json', 'stripe-signature' => $sig });
	return $node->safe_psql($db, qq{
		BEGIN;
		SET LOCAL ROLE qes_anon;
		SET LOCAL request.jwt.claims = '{"role": "qes_anon"}';
		SET LOCAL request.headers = '$headers';
		SET LOCAL response.status = '';
		SELECT api.stripe_webhook(\$body\$$body\$body\$::json) AS answer \\gset
		SELECT coalesce(nullif(current_setting('response.status', true), ''), '200');
		COMMIT;});
}

# refusals may be counted in shared memory and written later: write them now
sub flush_rejections
{
	my ($node, $db) = @_;
	$node->safe_psql($db, q{
		DO $$ BEGIN
		  IF pg_catalog.to_regprocedure('billing.flush_webhook_rejections()') IS NOT NULL THEN
		    PERFORM billing.flush_webhook_rejections();
		  END IF;
		END $$});
}

sub event
{
	my ($id, $type, $created, $object) = @_;
	return { id => $id, object => 'event', type => $type, created => $created, livemode => JSON::PP::false,
			 api_version => '2024-06-20', data => { object => $object } };
}

sub set_paused
{
	my ($node, $on) = @_;
	my $before = worker_state($node)->{loops};
	$node->safe_psql('postgres', 'ALTER SYSTEM SET qes_billing.worker_paused = ' . ($on ? 'on' : 'off'));
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	# the loop after the one that reads the new setting has ended
	ok(defined wait_for(sub { worker_state($node)->{loops} >= $before + 2 }, 30),
		$node->name . ': worker ' . ($on ? 'paused' : 'resumed'));
}

sub queue_idle
{
	my ($node, $db) = @_;
	return q1($node, $db, "SELECT count(*) FROM billing.stripe_requests WHERE state IN ('waiting', 'pending', 'in_flight')") eq '0'
		&& q1($node, $db, "SELECT count(*) FROM billing.webhook_events WHERE state IN ('received', 'processing')") eq '0';
}

# the tables and sequences of schema billing
sub relations
{
	my ($node, $db, $kinds) = @_;
	return grep { $_ ne '' } split /\n/, q1($node, $db,
		"SELECT relname FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind IN ($kinds) ORDER BY 1");
}

sub rows_of
{
	my ($node, $db, $table) = @_;
	return [ split /\n/, q1($node, $db, "SELECT t::text FROM billing.$table t ORDER BY 1") ];
}

# everything a restore must reproduce, by name
sub snapshot
{
	my ($node, $db) = @_;
	my %s;
	$s{"table $_"} = rows_of($node, $db, $_) for relations($node, $db, "'r', 'p'");
	$s{"sequence $_"} = q1($node, $db, "SELECT last_value || ' ' || is_called FROM billing.$_")
		for relations($node, $db, "'S'");
	$s{check_limit} = q1($node, $db, q{
		SELECT string_agg(format('%s %s %s', t.tenant_id, m.metric, billing.check_limit(t.tenant_id, m.metric, 0)),
		                  E'\n' ORDER BY t.tenant_id, m.metric)
		  FROM billing.tenants t CROSS JOIN billing.metrics m});
	$s{usage_current} = q1($node, $db, q{
		SELECT string_agg(format('%s %s', t.tenant_id, u), E'\n' ORDER BY t.tenant_id, u::text)
		  FROM billing.tenants t, billing.usage_current(t.tenant_id) u});
	return \%s;
}

# compare a restored database with the source snapshot, table by table
sub compare
{
	my ($want, $node, $db) = @_;
	my $got = snapshot($node, $db);
	my $label = $node->name . "/$db";
	for my $k (sort keys %$want)
	{
		next if $k eq 'table stripe_secrets';
		if (ref $want->{$k})
		{
			my %w = map { $_ => 1 } @{ $want->{$k} };
			# (the target's own identity, which its CREATE EXTENSION wrote, beside
			# the source's: that is how the worker there knows; the clusters differ)
			if ($k eq 'table cluster_identity')
			{
				my $own = q1($node, $db, 'SELECT system_identifier FROM pg_control_system()');
				isnt($own, q1($src, 'postgres', 'SELECT system_identifier FROM pg_control_system()'),
					"$label: another cluster than the source");
				$got->{$k} = [ grep { !/^\($own,/ } @{ $got->{$k} // [] } ];
			}
			my %g = map { $_ => 1 } @{ $got->{$k} // [] };
			my @missing = grep { !$g{$_} } @{ $want->{$k} };
			my @extra = grep { !$w{$_} } @{ $got->{$k} // [] };
			ok(!@missing && !@extra && @{ $want->{$k} } == @{ $got->{$k} // [] },
				"$label: $k restored row for row (" . scalar(@{ $want->{$k} }) . ' rows)')
				or diag("$k missing after restore:\n  " . join("\n  ", @missing[0 .. ($#missing < 9 ? $#missing : 9)])
					. "\n$k not in the source:\n  " . join("\n  ", @extra[0 .. ($#extra < 9 ? $#extra : 9)]));
		}
		else
		{
			is($got->{$k}, $want->{$k}, "$label: $k as dumped");
		}
	}
	is(join(',', sort grep { /^(table|sequence) / } keys %$got), join(',', sort grep { /^(table|sequence) / } keys %$want),
		"$label: the same tables and sequences");
	is(q1($node, $db, 'SELECT count(*) FROM billing.stripe_secrets'), '0', "$label: stored secrets are not restored");
	is(q1($node, $db, 'SELECT ok FROM billing.verify_audit_chain()'), 't', "$label: the audit chain verifies");
}

sub max_id
{
	my ($node, $db, $table, $col) = @_;
	return q1($node, $db, "SELECT coalesce(max($col), 0) FROM billing.$table");
}

# ---------------------------------------------------------------------------
# real activity on the source

$src->safe_psql('postgres', 'CREATE EXTENSION qes_billing');

# what pg_dump keeps: every billing table and sequence but the two that must
# not be (seed_rows is made by CREATE EXTENSION, stripe_secrets holds secrets)
is($src->safe_psql('postgres', q{
	SELECT string_agg(c.relname, ',' ORDER BY c.relname)
	  FROM pg_class c
	 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'S')
	   AND c.oid <> ALL (SELECT unnest(e.extconfig) FROM pg_extension e WHERE e.extname = 'qes_billing')}),
	'seed_rows,stripe_secrets', 'every billing table and sequence is dumped but seed_rows and stripe_secrets');

# setup: products and prices created in Stripe, their ids kept in the catalog
$src->safe_psql('postgres', "SELECT billing.setup_products('dump-setup')");
is($src->safe_psql('postgres', "SELECT billing.setup_wait('dump-setup', 60)"), 't', 'setup run finished');
is($src->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE stripe_price_id IS NOT NULL) || '/' || count(*) FILTER (WHERE unit_amount > 0)
	  FROM billing.prices}), '4/4', 'setup stored the Stripe price ids');
my $price_pro_month = $src->safe_psql('postgres',
	"SELECT stripe_price_id FROM billing.prices WHERE price_key = 'professional_monthly'");

# the operator's changes to seeded rows
$src->safe_psql('postgres', q{
	UPDATE billing.plan_limits SET soft_limit = 5, hard_limit_pct = 200 WHERE plan_id = 'free' AND metric = 'signatures';
	UPDATE billing.plan_limits SET soft_limit = 250 WHERE plan_id = 'professional' AND metric = 'signatures';
	UPDATE billing.plans SET description = 'For regulated organisations, with an SLA' WHERE plan_id = 'enterprise';
});
# a shifted billing clock: the activity runs at a fixed date (the last evening
# of a year), with the fake Stripe's clock at the same date, so that the day
# the test runs changes nothing
my $at = $src->safe_psql('postgres', q{SELECT extract(epoch FROM timestamptz '2027-12-31 20:00:00+00')::bigint});
$src->safe_psql('postgres', "SELECT billing.set_clock(to_timestamp($at) - now())");
my $clock = HTTP::Tiny->new->post("http://127.0.0.1:$fake_port/_fake/clock",
	{ content => $json->encode({ at => $at + 0 }), headers => { 'Content-Type' => 'application/json' } });
ok($clock->{success}, 'the fake Stripe\'s clock is set too') or diag($clock->{content});

# tenants, subscriptions through the API
$src->safe_psql('postgres', q{
	SELECT count(billing.upsert_tenant(t, initcap(t) || ' Ltd', t || '@dump.example'))
	  FROM unnest(ARRAY['acme', 'beta', 'gamma', 'delta']) t;
});
as_tenant($src, 'postgres', 'beta', "SELECT api.create_subscription('professional', 'month')",
	'beta subscribes to professional');
as_tenant($src, 'postgres', 'gamma', "SELECT api.create_subscription('free', 'month')", 'gamma subscribes to free');
ok(defined wait_for(sub { queue_idle($src, 'postgres') }, 60), 'the worker sent every request');
as_tenant($src, 'postgres', 'beta', "SELECT api.create_payment_intent(1500, 'usd', 'extra signatures')",
	'beta starts a one-time payment');

# webhooks: acme's customer, subscription, invoices, payment, dispute
my $base = $at - 3600;
my %acme_cust = (customer => 'cus_acme_dump');
my @events = (
	event('evt_dump_1', 'customer.created', $base,
		{ id => 'cus_acme_dump', object => 'customer', metadata => { tenant_id => 'acme' } }),
	event('evt_dump_2', 'customer.subscription.created', $base + 1,
		{ id => 'sub_acme_dump', object => 'subscription', %acme_cust, status => 'active',
		  cancel_at_period_end => JSON::PP::false, current_period_start => $base,
		  current_period_end => $base + 30 * 86400,
		  items => { data => [ { price => { id => $price_pro_month, lookup_key => 'professional_monthly',
											recurring => { interval => 'month' } } } ] } }),
	event('evt_dump_3', 'invoice.paid', $base + 2,
		{ id => 'in_acme_dump_1', object => 'invoice', %acme_cust, subscription => 'sub_acme_dump',
		  status => 'paid', amount_due => 2900, amount_paid => 2900, amount_remaining => 0, currency => 'usd',
		  created => $base + 2, period_start => $base, period_end => $base + 30 * 86400 }),
	event('evt_dump_4', 'payment_intent.succeeded', $base + 3,
		{ id => 'pi_acme_dump_1', object => 'payment_intent', %acme_cust, amount => 2900, currency => 'usd',
		  status => 'succeeded', latest_charge => 'ch_acme_dump_1', invoice => 'in_acme_dump_1' }),
	event('evt_dump_5', 'charge.dispute.created', $base + 4,
		{ id => 'dp_acme_dump_1', object => 'dispute', charge => 'ch_acme_dump_1', payment_intent => 'pi_acme_dump_1',
		  amount => 2900, currency => 'usd', reason => 'fraudulent', status => 'needs_response', created => $base + 4 }),
	event('evt_dump_6', 'invoice.payment_failed', $base + 5,
		{ id => 'in_acme_dump_2', object => 'invoice', %acme_cust, subscription => 'sub_acme_dump',
		  status => 'open', amount_due => 2900, amount_paid => 0, amount_remaining => 2900, currency => 'usd',
		  created => $base + 5, period_start => $base, period_end => $base + 30 * 86400 }));
# the disputed charge's dispute as Stripe has it (the worker stages evidence on it)
is(HTTP::Tiny->new->post("http://127.0.0.1:$fake_port/_fake/objects",
	{ content => JSON::PP::encode_json({ %{ $events[4]{data}{object} }, livemode => JSON::PP::false,
		metadata => {}, evidence => {},
		evidence_details => { due_by => $at + 7 * 86400, has_evidence => JSON::PP::false,
							  past_due => JSON::PP::false, submission_count => 0 } }) })->{status},
	200, 'the fake Stripe knows the dispute');
is(deliver($src, 'postgres', $_), '200', "webhook $_->{id} accepted") for @events;
is(deliver($src, 'postgres', event('evt_dump_forged', 'invoice.paid', $base, {}), 'whsec_wrong'), '400',
	'a forged webhook is refused');
flush_rejections($src, 'postgres');
ok(defined wait_for(sub { queue_idle($src, 'postgres') }, 60), 'the worker applied every event');
is($src->safe_psql('postgres', "SELECT string_agg(state, ',' ORDER BY stripe_event_id) FROM billing.webhook_events"),
	join(',', ('applied') x @events), 'every event applied');

# usage, in the same transactions a host application would use
$src->safe_psql('postgres', q{
	SELECT billing.record_usage('acme', 'signatures', 7, 'dump-acme-1');
	SELECT billing.record_usage('acme', 'documents', 3, 'dump-acme-2');
	SELECT billing.record_usage('acme', 'storage', 123456789, 'dump-acme-3');
	SELECT billing.record_usage('beta', 'api_calls', 50, 'dump-beta-1');
	SELECT billing.record_usage('beta', 'signatures', 90, 'dump-beta-2');
	SELECT billing.record_usage('gamma', 'signatures', 3, 'dump-gamma-1');
	SELECT billing.record_usage('delta', 'documents', 1, 'dump-delta-1');
});

# a secret learnt from Stripe (what qes_billing_setup --setup-webhook stores)
$src->safe_psql('postgres', qq{
	INSERT INTO billing.stripe_secrets (mode, kind, endpoint, secret) VALUES ('test', 'webhook', 'we_dump', '$stored_secret')});

# work queued at the time of the dump, for the restored worker to carry on
set_paused($src, 1);
as_tenant($src, 'postgres', 'delta', "SELECT api.create_subscription('professional', 'year')",
	'delta subscribes while the worker is paused');
# and one of its requests in flight at the time of the dump, as a claim leaves it
$src->safe_psql('postgres', q{
	UPDATE billing.stripe_requests SET state = 'in_flight', claimed_at = now(), attempts = attempts + 1
	 WHERE tenant_id = 'delta' AND kind = 'customer.create'});
my $late_invoice = { id => 'in_acme_dump_3', object => 'invoice', %acme_cust, subscription => 'sub_acme_dump',
	status => 'open', amount_due => 2900, amount_paid => 0, amount_remaining => 2900, currency => 'usd',
	created => $base + 6, period_start => $base, period_end => $base + 30 * 86400, livemode => JSON::PP::false };
# Stripe still has it unpaid: a failure learnt late is looked up before the
# tenant is told of it (docs/architecture.md, "Mirroring Stripe")
is(HTTP::Tiny->new->post("http://127.0.0.1:$fake_port/_fake/objects",
	{ content => JSON::PP::encode_json($late_invoice) })->{status}, 200, 'the fake Stripe knows the unpaid invoice');
is(deliver($src, 'postgres', event('evt_dump_7', 'invoice.payment_failed', $base + 6, $late_invoice)),
	'200', 'an event arrives while the worker is paused');

# the activity reached every table it should
for my $t (qw(tenants subscriptions usage_events invoices payments disputes notifications stripe_requests
			  webhook_events webhook_rejections audit_log))
{
	cmp_ok($src->safe_psql('postgres', "SELECT count(*) FROM billing.$t"), '>', 0, "source has rows in $t");
}
is($src->safe_psql('postgres', q{
	SELECT string_agg(DISTINCT state, ',' ORDER BY state) FROM billing.stripe_requests WHERE tenant_id = 'delta'})
	. ' ' . $src->safe_psql('postgres', "SELECT state FROM billing.webhook_events WHERE stripe_event_id = 'evt_dump_7'"),
	'in_flight,waiting received', 'work is queued and in flight at the time of the dump');
is($src->safe_psql('postgres', 'SELECT ok FROM billing.verify_audit_chain()'), 't', 'source audit chain verifies');
my $want = snapshot($src, 'postgres');

# ---------------------------------------------------------------------------
# pg_dump | psql, into the database the target's worker serves

my ($dump_err, $restore_out, $restore_err) = ('', '', '');
ok(IPC::Run::run(['pg_dump', '-d', $src->connstr('postgres')], '2>', \$dump_err, '|',
		['psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $dst->connstr('postgres')],
		'>', \$restore_out, '2>', \$restore_err),
	'pg_dump | psql succeeds') or diag("pg_dump: $dump_err\npsql: $restore_err");
unlike($restore_err, qr/ERROR/, 'the plain restore reports no error');
compare($want, $dst, 'postgres');

# pg_dump -Fc by a backup role that is not a superuser (it reads every
# table, past row-level security, and executes no billing function), then
# pg_restore in one transaction, into another database
my $archive = $PostgreSQL::Test::Utils::tmp_check . '/billing.dump';
$src->safe_psql('postgres', 'CREATE ROLE backup_reader LOGIN BYPASSRLS IN ROLE pg_read_all_data');
command_ok(['pg_dump', '-Fc', '-f', $archive, '-U', 'backup_reader', '-d', $src->connstr('postgres')],
	'pg_dump -Fc by a pg_read_all_data role succeeds');
$dst->safe_psql('postgres', 'CREATE DATABASE restored_fc');
command_ok(['pg_restore', '--single-transaction', '--exit-on-error', '-d', $dst->connstr('restored_fc'), $archive],
	'pg_restore --single-transaction succeeds');
compare($want, $dst, 'restored_fc');

my ($script, $script_err) = ('', '');
IPC::Run::run(['pg_restore', '-f', '-', $archive], '>', \$script, '2>', \$script_err);
like($script, qr/COPY billing\.audit_log/, 'the archive holds the billing data');
unlike($script, qr/\Q$stored_secret\E/, 'no stored secret is in the dump');
unlike($script, qr/\Q$whsec\E|sk_test_tap_dump_restore/, 'no configured key is in the dump');

# ---------------------------------------------------------------------------
# the restored databases work

for my $db ('postgres', 'restored_fc')
{
	my $label = "$db (restored)";
	my $audit = max_id($dst, $db, 'audit_log', 'audit_id');
	my %max = map { $_->[0] => max_id($dst, $db, @$_) }
		(['stripe_requests', 'request_id'], ['notifications', 'notification_id'], ['payments', 'payment_id'],
		 ['subscriptions', 'subscription_id'], ['webhook_rejections', 'rejection_id']);

	sql_ok($dst, $db, "SELECT billing.upsert_tenant('epsilon', 'Epsilon Ltd', 'epsilon\@dump.example')",
		"$label: an audited call works");
	is(q1($dst, $db, "SELECT max(audit_id) FROM billing.audit_log"), $audit + 1, "$label: the audit chain continues");

	my $acme_before = q1($dst, $db, "SELECT (billing.check_limit('acme', 'signatures', 0)).current");
	is(sql_ok($dst, $db, "SELECT total FROM billing.record_usage('acme', 'signatures', 1, 'after-restore-1')",
			"$label: record_usage works"), $acme_before + 1, "$label: usage adds to the restored total");
	# gamma reaches the operator's limit of 5: threshold notifications with new ids
	is(sql_ok($dst, $db, "SELECT total || ' of ' || usage_limit FROM billing.record_usage('gamma', 'signatures', 2, 'after-restore-2')",
			"$label: record_usage up to the operator's limit"), '5 of 5', "$label: the operator's limit applies");
	cmp_ok(q1($dst, $db, "SELECT min(notification_id) FROM billing.notifications WHERE tenant_id = 'gamma'"),
		'>', $max{notifications}, "$label: new notifications get new ids");

	as_tenant($dst, $db, 'epsilon', "SELECT api.create_subscription('professional', 'month')",
		"$label: create_subscription finds the Stripe price");
	cmp_ok(q1($dst, $db, "SELECT min(subscription_id) FROM billing.subscriptions WHERE tenant_id = 'epsilon'"),
		'>', $max{subscriptions}, "$label: a new subscription gets a new id");
	cmp_ok(q1($dst, $db, "SELECT min(request_id) FROM billing.stripe_requests WHERE tenant_id = 'epsilon'"),
		'>', $max{stripe_requests}, "$label: new outbox rows get new ids");
	as_tenant($dst, $db, 'beta', "SELECT api.create_payment_intent(990, 'usd', 'after restore')",
		"$label: a payment can be started");
	cmp_ok(q1($dst, $db, "SELECT max(payment_id) FROM billing.payments"), '>', $max{payments},
		"$label: a new payment gets a new id");
	is(deliver($dst, $db, event('evt_dump_forged_2', 'invoice.paid', $base, {}), 'whsec_wrong'), '400',
		"$label: a forged webhook is refused");
	flush_rejections($dst, $db);
	cmp_ok(q1($dst, $db, "SELECT max(rejection_id) FROM billing.webhook_rejections"), '>', $max{webhook_rejections},
		"$label: a refusal gets a new id");
	is(q1($dst, $db, "SELECT count(*) FROM billing.plans") . '/' . q1($dst, $db, "SELECT count(*) FROM billing.prices"),
		'3/6', "$label: no seed row twice");
	my ($rc, $out, $err) = $dst->psql($db, "INSERT INTO billing.plan_limits VALUES ('free', 'signatures', 1, NULL)");
	like($err, qr/duplicate key value violates unique constraint "plan_limits_pkey"/,
		"$label: a changed seed row is not replaced by an insert");
	is(q1($dst, $db, 'SELECT ok FROM billing.verify_audit_chain()'), 't', "$label: the audit chain still verifies");
}

# the worker carries on with what was queued at the time of the dump
set_paused($dst, 0);
ok(defined wait_for(sub { q1($dst, 'postgres', 'SELECT reclaimed FROM billing.worker_state()') > 0 }, 30),
	'the restored worker reclaimed the request in flight at the time of the dump');
# the data came from another cluster, which may have sent what was queued
# after the dump: the request waiting at the time of the dump is dated as
# possibly sent (from its creation), so it goes out only under its key's
# lifetime (billing.worker_reclaim, billing.cluster_identity)
is(q1($dst, 'postgres', q{
	SELECT (details ->> 'other_cluster') || ' ' || ((details ->> 'possibly_sent')::integer > 0)
	  FROM billing.audit_log WHERE action = 'worker.reclaimed' AND details ? 'other_cluster'}),
	'true true', 'the restored worker knew the data came from another cluster');
# (dated: its first_sent_at is its creation; sent undated, it would be its claim)
my $dumped_requests = q1($src, 'postgres', 'SELECT max(request_id) FROM billing.stripe_requests');
is(q1($dst, 'postgres', qq{
	SELECT count(*) > 0 AND bool_and(first_sent_at = created_at) FROM billing.stripe_requests
	 WHERE tenant_id = 'delta' AND kind <> 'customer.create' AND method <> 'GET' AND request_id <= $dumped_requests}),
	't', 'and dated the requests that waited at the time of the dump as possibly sent');
is(q1($dst, 'postgres', 'SELECT system_identifier = (SELECT c.system_identifier FROM pg_control_system() c)
                           FROM billing.cluster_identity'), 't', 'and now records this cluster');
ok(defined wait_for(sub {
	q1($dst, 'postgres', "SELECT stripe_subscription_id IS NOT NULL FROM billing.subscriptions
	                        WHERE tenant_id = 'delta' AND status <> 'canceled'") eq 't' }, 60),
	'the restored worker sent the requests queued before the dump');
ok(defined wait_for(sub {
	q1($dst, 'postgres', "SELECT state FROM billing.webhook_events WHERE stripe_event_id = 'evt_dump_7'") eq 'applied' }, 60),
	'the restored worker applied the event received before the dump');
ok(defined wait_for(sub {
	q1($dst, 'postgres', "SELECT count(*) FROM billing.notifications WHERE dedup_key = 'payment_failed:in_acme_dump_3'") eq '1' }, 60),
	'its notification is queued (once Stripe said the invoice is still unpaid)')
	or diag(q1($dst, 'postgres', "SELECT string_agg(row(f.*)::text, ' ') FROM billing.invoice_failures f")
		. "\n" . q1($dst, 'postgres', "SELECT string_agg(row(r.request_id, r.kind, r.state, r.http_status, r.error)::text, ' ') FROM billing.stripe_requests r WHERE r.kind LIKE 'mirror.%'"));
ok(defined wait_for(sub { queue_idle($dst, 'postgres') }, 60), 'and everything queued after the restore');
is(q1($dst, 'postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed'"), '0',
	'no request failed');
is(q1($dst, 'postgres', "SELECT extension_present::text || ' ' || coalesce(last_error, 'no error') FROM billing.worker_state()"),
	'true no error', 'the worker runs without error');
is(q1($dst, 'postgres', 'SELECT ok FROM billing.verify_audit_chain()'), 't', 'the audit chain verifies after the worker');

# ---------------------------------------------------------------------------
# every billing index holds every row

sub amcheck_db
{
	my ($node, $db) = @_;
	if (defined &QesTest::amcheck_all)
	{
		QesTest::amcheck_all($node, $db);
		return;
	}
	$node->safe_psql($db, 'CREATE EXTENSION IF NOT EXISTS amcheck');
	my ($rc, $out, $err) = $node->psql($db, q{
		SELECT count(bt_index_check(c.oid, true))
		  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		 WHERE n.nspname IN ('billing', 'api') AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'btree')});
	ok($rc == 0 && $out > 0, $node->name . "/$db: amcheck of $out billing indexes") or diag($err);
}
amcheck_db($src, 'postgres');
amcheck_db($dst, 'postgres');
amcheck_db($dst, 'restored_fc');

$src->stop;
$dst->stop;
$fake->kill_kill;
done_testing();
