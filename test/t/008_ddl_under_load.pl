# DDL a DBA runs on a live system, while 4 clients record usage and deliver
# signed webhooks: CREATE INDEX CONCURRENTLY, REINDEX TABLE CONCURRENTLY and
# ALTER TABLE ... ADD COLUMN ... DEFAULT, on billing.usage_events and on
# billing.webhook_events.  The clients are pgbench's, connected before the
# DDL and kept connected through it (the backends that already ran the
# direct-write paths are the ones whose view of the relations must follow
# the DDL).  Each client transaction writes one usage row or one inbox row
# and, in the same transaction, a line in a plain ledger table, so the
# ledger is what the clients were told was recorded.
#
# Afterwards: no client error at all (pgbench exits 0, no failed or aborted
# transaction), no lost or doubled row (every key in the ledger is in the
# table exactly once, read from the heap and through the indexes, and the
# counts match pgbench's own), check_limit's current equals the table sum
# for every tenant, and amcheck (bt_index_check with heapallindexed) is
# clean on every billing index, the new ones included.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time sleep);
use QesTest;

my $secret = 'whsec_ddl_under_load';
my $node = qes_node('ddl_load', conf => [
	"qes_billing.stripe_test_webhook_secret = '$secret'",
	"max_connections = 40"]);
$node->safe_psql('postgres', q{
	CREATE EXTENSION qes_billing;
	CREATE EXTENSION pgcrypto;
	SELECT count(billing.upsert_tenant('ddl' || i, 'DDL ' || i, 'ddl' || i || '@t.example')) FROM generate_series(1, 4) i;
	CREATE SEQUENCE ddl_key_seq;
	CREATE SEQUENCE ddl_event_seq;
	CREATE TABLE ddl_ledger (kind text NOT NULL, key text NOT NULL, tenant_id text, ok boolean NOT NULL,
	                         response text, PRIMARY KEY (kind, key));
});
# at a fixed date through the billing clock (Feb 29 2028, in the evening): no
# period ends while the load runs, whatever day it runs
$node->safe_psql('postgres', q{SELECT billing.set_clock('2028-02-29 20:00:00+00' - now())});

# The two client scripts.  Usage: a new key, one record_usage call, the
# ledger line, in one statement (one transaction).  Webhook: a new event,
# signed with pgcrypto as Stripe signs it (t=...,v1=HMAC-SHA256(secret,
# t.body)), delivered through api.stripe_webhook with the header in
# request.headers; the ledger line says whether it was stored as new.
my $dir = PostgreSQL::Test::Utils::tempdir;
PostgreSQL::Test::Utils::append_to_file("$dir/usage.sql", <<'SQL');
\set t random(1, 4)
INSERT INTO ddl_ledger (kind, key, tenant_id, ok)
SELECT 'usage', k, 'ddl' || :t, (billing.record_usage('ddl' || :t, 'signatures', 1, k)).recorded
  FROM (SELECT 'u' || nextval('ddl_key_seq') AS k) x;
SQL
PostgreSQL::Test::Utils::append_to_file("$dir/webhook.sql", <<"SQL");
WITH e AS (SELECT nextval('ddl_event_seq') AS n OFFSET 0),
     b AS (SELECT json_build_object('id', 'evt_ddl_' || n, 'object', 'event', 'type', 'invoice.paid',
                                    'created', 1700000000 + n, 'livemode', false,
                                    'data', json_build_object('object', json_build_object(
                                       'id', 'in_ddl_' || n, 'object', 'invoice', 'customer', 'cus_not_ours',
                                       'status', 'paid', 'amount_paid', 2900)))::text AS body
             FROM e),
     s AS (SELECT body, set_config('request.headers', json_build_object('stripe-signature',
                      't=4102444800,v1=' || encode(hmac('4102444800.' || body, '$secret', 'sha256'), 'hex'))::text, true)
             FROM b),
     r AS (SELECT s.body::json ->> 'id' AS id, api.stripe_webhook(s.body::json) AS resp FROM s)
INSERT INTO ddl_ledger (kind, key, ok, response)
SELECT 'webhook', id, coalesce(resp ->> 'received' = 'true' AND resp ->> 'duplicate' = 'false', false), resp::text
  FROM r;
SQL

# a first delivery and record by hand: the scripts work before any DDL
for my $script (qw(usage webhook))
{
	my ($rc, $o, $e) = $node->psql('postgres', slurp_file("$dir/$script.sql") =~ s/^\\set t .*$/\\set t 1/mr);
	is($rc, 0, "the $script script works") or diag($e);
}
is($node->safe_psql('postgres', 'SELECT count(*) FILTER (WHERE ok) || \'/\' || count(*) FROM ddl_ledger'), '2/2',
	'a usage row and a webhook stored before the load');

# 4 clients at 1000 transactions a second in all (a steady load that
# leaves 2 cores room for the DDL and amcheck) for 40 s (the six DDL
# statements, each followed by amcheck of every billing index under the
# load, took 26 s on a slower machine: they must be done while it runs)
my $seconds = 40;
my @pgbench = ('pgbench', '-n', '-c', '4', '-j', '2', '-T', $seconds, '-R', '1000', '-P', '5', '--verbose-errors',
	'-f', "$dir/usage.sql\@1", '-f', "$dir/webhook.sql\@1",
	'-h', $node->host, '-p', $node->port, 'postgres');
my ($bench_out, $bench_err) = ('', '');
my $start = time;
my $bench;
{
	local $ENV{PGAPPNAME} = 'ddl_load_client';
	$bench = IPC::Run::start(\@pgbench, '>', \$bench_out, '2>', \$bench_err);
}
# collect pgbench's output so far (it may have ended: clients that all
# failed end it early)
sub pump_bench { eval { $bench->pump_nb if $bench->pumpable; }; }

# the clients are connected and have written before the DDL starts
ok(defined wait_for(sub {
	pump_bench();
	$node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE kind = 'usage') > 50 AND count(*) FILTER (WHERE kind = 'webhook') > 50
	                                 FROM ddl_ledger}) eq 't' }, 30),
	'the 4 clients are recording usage and delivering webhooks');
my $clients = $node->safe_psql('postgres',
	"SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE application_name = 'ddl_load_client'");
is(scalar(split /,/, $clients), 4, 'the 4 pgbench backends are connected');

my @ddl = (
	'CREATE INDEX CONCURRENTLY usage_events_ddl_recorded ON billing.usage_events (metric, recorded_at)',
	'CREATE INDEX CONCURRENTLY webhook_events_ddl_type ON billing.webhook_events (event_type, received_at)',
	'REINDEX TABLE CONCURRENTLY billing.usage_events',
	'REINDEX TABLE CONCURRENTLY billing.webhook_events',
	"ALTER TABLE billing.usage_events ADD COLUMN extra_note text DEFAULT 'x'",
	"ALTER TABLE billing.webhook_events ADD COLUMN extra_note text DEFAULT 'x'");
for my $sql (@ddl)
{
	sleep 1;	# the clients write between one DDL and the next
	pump_bench();
	my $t = time;
	my ($rc, $o, $e) = $node->psql('postgres', $sql);
	is($rc, 0, sprintf('%s (%.1f s into the load, took %.2f s)', $sql, $t - $start, time - $t)) or diag($e);
	# every index holds every row written so far, while the load goes on
	# (a later REINDEX would rebuild an index a client failed to fill)
	sleep 0.5;
	amcheck_all($node, 'postgres', "under load, after: $sql");
}
my $ddl_done = time - $start;
my $after_ddl = $node->safe_psql('postgres', 'SELECT count(*) FROM ddl_ledger');
cmp_ok($ddl_done, '<', $seconds - 3, sprintf('the DDL was done %.1f s into the %d s load', $ddl_done, $seconds));

$bench->finish;
my $bench_rc = ($bench->results)[0];
note("pgbench:\n$bench_out");
note("pgbench stderr:\n$bench_err") if $bench_err ne '';
is($bench_rc, 0, 'pgbench exits 0 (no client aborted)');
my @errors = grep { /ERROR|aborted|FATAL|error:/ } split /\n/, $bench_err;
is(scalar(@errors), 0, 'no client saw an error') or diag(join("\n", @errors[0 .. ($#errors < 9 ? $#errors : 9)]));
like($bench_out, qr/number of failed transactions: 0 /, 'pgbench reports no failed transaction');
is(scalar(split /,/, $node->safe_psql('postgres',
	"SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name = 'ddl_load_client'")), 0,
	'the clients have disconnected');

my %script_tx;
while ($bench_out =~ /SQL script \d+: \S*\/(\w+)\.sql\n - weight: \d+ \([^)]*\)\n - (\d+) transactions/g)
{
	$script_tx{$1} = $2;
}
note("transactions by script: usage $script_tx{usage}, webhook $script_tx{webhook}")
	if defined $script_tx{usage} && defined $script_tx{webhook};

# What the ledger says: every client transaction that committed.
my ($ledger_usage, $ledger_webhook, $not_ok) = split /\|/, $node->safe_psql('postgres',
	q{SELECT count(*) FILTER (WHERE kind = 'usage'), count(*) FILTER (WHERE kind = 'webhook'), count(*) FILTER (WHERE NOT ok)
	    FROM ddl_ledger});
is($not_ok, 0, 'every call recorded a new row (recorded, or received and not a duplicate)');
# pgbench -T counts what its clients saw finish before the deadline; a
# transaction the server committed as the time ran out (at most one per
# client, 4) is in the ledger but may not be in pgbench's count.  Nothing is
# lost (never fewer lines) or doubled (never more than one per client).
for my $kind (['usage', $ledger_usage], ['webhook', $ledger_webhook])
{
	my ($name, $lines) = @$kind;
	my $extra = $lines - 1 - ($script_tx{$name} // 1e9);
	ok($extra >= 0 && $extra <= 4,
		"the ledger holds one $name line per committed pgbench transaction ($lines lines, "
		. ($script_tx{$name} // 'no') . " counted by pgbench, $extra finishing as the time ran out)");
}
cmp_ok($ledger_usage + $ledger_webhook, '>', $after_ddl + 100,
	'the clients connected through the DDL kept recording after it ('
	. ($ledger_usage + $ledger_webhook - $after_ddl) . ' transactions after the last DDL)');

# The tables, read from the heap (a sequential scan: no index can hide or
# invent a row) and through the primary key (a full index scan: what the
# duplicate probes of the hot paths read), against the ledger.
my %ledger = (usage => {}, webhook => {});
for my $row (split /\n/, $node->safe_psql('postgres', 'SELECT kind, key FROM ddl_ledger'))
{
	my ($kind, $k) = split /\|/, $row;
	$ledger{$kind}{$k}++;
}
my %table_sql = (
	usage => q{SELECT idempotency_key FROM billing.usage_events WHERE tenant_id LIKE 'ddl%' ORDER BY tenant_id, idempotency_key},
	webhook => q{SELECT stripe_event_id FROM billing.webhook_events WHERE stripe_event_id LIKE 'evt_ddl_%' ORDER BY stripe_event_id});
for my $how ('heap', 'primary key')
{
	my $set = $how eq 'heap'
		? 'SET enable_indexscan = off; SET enable_indexonlyscan = off; SET enable_bitmapscan = off;'
		: 'SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off;';
	for my $kind ('usage', 'webhook')
	{
		my %seen;
		$seen{$_}++ for split /\n/, $node->safe_psql('postgres', "$set $table_sql{$kind}");
		my $rows = 0;
		$rows += $_ for values %seen;
		my @missing = grep { !$seen{$_} } sort keys %{ $ledger{$kind} };
		my @doubled = grep { $seen{$_} > 1 } sort keys %seen;
		my @unknown = grep { !$ledger{$kind}{$_} } sort keys %seen;
		my $want = scalar keys %{ $ledger{$kind} };
		is(sprintf('%d rows, %d missing, %d doubled, %d unknown', $rows, scalar @missing, scalar @doubled, scalar @unknown),
			"$want rows, 0 missing, 0 doubled, 0 unknown",
			"$kind table read through the $how: one row per ledger key, none missing, none doubled, none unknown")
			or diag("missing: @missing[0 .. ($#missing < 4 ? $#missing : 4)]; doubled: @doubled[0 .. ($#doubled < 4 ? $#doubled : 4)]");
	}
}
is($node->safe_psql('postgres', q{SELECT count(*) FROM billing.usage_events WHERE tenant_id LIKE 'ddl%' AND extra_note IS DISTINCT FROM 'x'}),
	'0', 'every usage row reads the new column\'s default');
is($node->safe_psql('postgres', q{SELECT count(*) FROM billing.webhook_events WHERE stripe_event_id LIKE 'evt_ddl_%' AND extra_note IS DISTINCT FROM 'x'}),
	'0', 'every inbox row reads the new column\'s default');

# The counters: check_limit's current equals the table sum per tenant.
for my $i (1 .. 4)
{
	my ($current, $sum, $ledger) = split /\|/, $node->safe_psql('postgres', qq{
		SELECT (billing.check_limit('ddl$i', 'signatures', 0)).current,
		       (SELECT coalesce(sum(quantity), 0) FROM billing.usage_events WHERE tenant_id = 'ddl$i' AND metric = 'signatures'),
		       (SELECT count(*) FROM ddl_ledger WHERE kind = 'usage' AND tenant_id = 'ddl$i')});
	is("$current|$sum", "$ledger|$ledger", "tenant ddl$i: check_limit current = table sum = ledger ($ledger)");
}

# New sessions after the DDL: the paths work on the new shape.
my ($rc, $o, $e) = $node->psql('postgres', q{SELECT recorded FROM billing.record_usage('ddl1', 'signatures', 1, 'after-ddl')});
is("$rc|$o", '0|t', 'record_usage works in a new session after the DDL') or diag($e);
is($node->safe_psql('postgres', q{SELECT extra_note FROM billing.usage_events WHERE idempotency_key = 'after-ddl'}), 'x',
	'the row recorded after the DDL has the new column\'s default');

# The new indexes are there, valid, and checked by amcheck with the rest.
my %indexes = map { $_->[1] => $_->[2] } billing_indexes($node);
for my $idx (qw(billing.usage_events_ddl_recorded billing.webhook_events_ddl_type))
{
	is($indexes{$idx}, 't', "$idx is valid and ready");
}
is(scalar(grep { /_ccnew|_ccold/ } keys %indexes), 0, 'REINDEX CONCURRENTLY left no _ccnew/_ccold index behind');
amcheck_all($node);

$node->stop;
done_testing();
