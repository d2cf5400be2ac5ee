# A primary and a streaming hot standby (read scale-out on PostgreSQL's own
# replication), then failover.  With synchronous_commit = remote_apply on
# the primary a commit returns only once the standby has applied it, so a
# read on the standby right after a write on the primary must see it.
#
# On the standby, in a session kept open throughout (opened before any of
# the changes below) and in new sessions: check_limit's current equals the
# replicated table's sum; a tenant registered and a limit changed on the
# primary are seen; usage_current and the api.usage view agree with it;
# record_usage fails with SQLSTATE 25006 (read-only transaction), as a
# plain INSERT does.
#
# Failover: the primary's worker sends Stripe requests to a slow fake
# Stripe; the primary is stopped (immediate) with requests succeeded, in
# flight and still queued, and the standby is promoted.  Its worker starts
# at promotion, reclaims the rows left in flight, and sends each with its
# own Idempotency-Key: every logical request creates exactly one object;
# a request queued or answered before the failover reaches Stripe exactly
# once; one in flight at most twice with the same key (Stripe replays its
# first answer).  After promotion and more usage, check_limit's current
# equals the table sum for every tenant, in the old long-lived session
# too.  amcheck on both nodes at the end.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use JSON::PP;
use HTTP::Tiny;
use File::Basename;
use Cwd qw(abs_path);
use QesTest;

# ---------------------------------------------------------------------------
# The fake Stripe: every answer takes 1.5 s, so requests stay in flight.
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my $fake_py = abs_path(dirname(__FILE__) . '/../python/fake_stripe.py');
my ($fake_out, $fake_err) = ('', '');
my $fake = IPC::Run::start(['python3', $fake_py, '--port', $fake_port, '--delay-ms', '1500'],
	'>', \$fake_out, '2>', \$fake_err);
ok(defined wait_for(sub { $fake->pump_nb; $fake_out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($fake_err);

# ---------------------------------------------------------------------------
# Primary and standby.  The backup is taken before the synchronous settings
# are made, so the standby (promoted later, alone) does not wait for a
# standby of its own.
my $primary = qes_node('primary', allows_streaming => 1, conf => [
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_standby'",
	"qes_billing.max_concurrent_requests = 4",
	"qes_billing.request_timeout = '10s'",
	"qes_billing.retry_base_delay = '50ms'",
	"qes_billing.retry_max_delay = '500ms'"]);
$primary->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
# at a fixed date through the billing clock (replicated with the table it
# lives in): no period ends while the test runs, whatever day it runs
$primary->safe_psql('postgres', q{SELECT billing.set_clock('2027-09-30 20:00:00+00' - now())});
$primary->safe_psql('postgres', 'CREATE EXTENSION amcheck');	# for amcheck_all on the standby
$primary->backup('base');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->append_conf('postgresql.conf', "hot_standby = on\nsynchronous_standby_names = ''\n");
$standby->start;

$primary->append_conf('postgresql.conf',
	"synchronous_standby_names = '*'\nsynchronous_commit = remote_apply\n");
$primary->reload;
ok($primary->poll_query_until('postgres',
	"SELECT sync_state = 'sync' FROM pg_stat_replication"), 'the standby is a synchronous standby');
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');

# ---------------------------------------------------------------------------
# What a session reads about one tenant's signatures, as
# "current|usage_limit|table sum|usage_current used|api.usage used".
sub usage_query
{
	my ($t) = @_;
	return qq{SET request.jwt.claims = '{"role": "qes_tenant", "tenant_id": "$t"}';
SELECT c.current, coalesce(c.usage_limit::text, 'unlimited'),
       (SELECT coalesce(sum(quantity), 0) FROM billing.usage_events WHERE tenant_id = '$t' AND metric = 'signatures'),
       (SELECT used FROM billing.usage_current('$t') WHERE metric = 'signatures'),
       (SELECT used FROM api.usage WHERE metric = 'signatures' AND is_current)
  FROM billing.check_limit('$t', 'signatures', 0) c;
RESET request.jwt.claims;};
}

my %recorded;		# tenant -> what the test recorded (the expected table sum)
my $key = 0;
sub record
{
	my ($node, $t, $qty) = @_;
	$key++;
	my $r = $node->safe_psql('postgres',
		"SELECT recorded FROM billing.record_usage('$t', 'signatures', $qty, 'k$key')");
	die "record_usage('$t', $qty) did not record: $r" unless $r eq 't';
	$recorded{$t} += $qty;
}

# A query in the long-lived session: its output, or its error.
sub long_query
{
	my ($long, $sql) = @_;
	my ($o, $failed) = $long->query($sql);
	return $o unless $failed;
	my $e = $long->{stderr};
	$long->{stderr} = '';
	$e =~ s/\s+$//;
	return "ERROR: $e";
}

# Every tenant, in the long-lived session and in a new one: check_limit,
# usage_current and api.usage agree with the table and with what the test
# recorded.
my $limit = 10;		# the free plan's soft limit for signatures
sub check_all
{
	my ($node, $long, $label) = @_;
	for my $t (sort keys %recorded)
	{
		my $want = "$recorded{$t}|$limit|$recorded{$t}|$recorded{$t}|$recorded{$t}";
		is($node->safe_psql('postgres', usage_query($t)), $want,
			"$label: new session: $t: check_limit current = table sum = usage_current = api.usage ($recorded{$t}), limit $limit");
		is(long_query($long, usage_query($t)), $want,
			"$label: long-lived session: $t: check_limit current = table sum = usage_current = api.usage ($recorded{$t}), limit $limit");
	}
}

# The long-lived standby session, opened before any tenant exists.
my $long = $standby->background_psql('postgres', on_error_stop => 0);
$long->query_safe('SELECT 1');

for my $t (qw(s1 s2))
{
	$primary->safe_psql('postgres', "SELECT billing.upsert_tenant('$t', 'Standby $t', '$t\@t.example')");
}
record($primary, 's1', 1) for 1 .. 3;
record($primary, 's2', 2);
check_all($standby, $long, 'standby');

# usage recorded on the primary after the standby sessions read it
record($primary, 's1', 2);
record($primary, 's2', 1);
check_all($standby, $long, 'standby, more usage');

# a tenant registered on the primary after the long-lived session started
# (and after it has read other tenants)
$primary->safe_psql('postgres', "SELECT billing.upsert_tenant('s3', 'Standby s3', 's3\@t.example')");
is(long_query($long, "SELECT count(*) FROM billing.tenants WHERE tenant_id = 's3'"), '1',
	'long-lived standby session: the new tenant is replicated');
record($primary, 's3', 4);
check_all($standby, $long, 'standby, new tenant');

# a limit change on the primary
$primary->safe_psql('postgres',
	"UPDATE billing.plan_limits SET soft_limit = 7 WHERE plan_id = 'free' AND metric = 'signatures'");
$limit = 7;
check_all($standby, $long, 'standby, limit changed to 7');
$primary->safe_psql('postgres',
	"UPDATE billing.plan_limits SET soft_limit = 12 WHERE plan_id = 'free' AND metric = 'signatures'");
$limit = 12;
check_all($standby, $long, 'standby, limit changed to 12');

# record_usage on the standby: 25006 read_only_sql_transaction, like an INSERT
my ($rc, $out, $err) = $standby->psql('postgres',
	"\\set VERBOSITY verbose\nINSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at) VALUES ('s1', 'plain', 'signatures', 1, now(), now())");
like($err, qr/ERROR:  25006:/, 'a plain INSERT on the standby fails with 25006');
($rc, $out, $err) = $standby->psql('postgres',
	"\\set VERBOSITY verbose\nSELECT billing.record_usage('s1', 'signatures', 1, 'on-standby')");
isnt($rc, 0, 'record_usage on the standby fails');
like($err, qr/ERROR:  25006:/, 'new session: record_usage on the standby fails with SQLSTATE 25006')
	or diag($err);
$long->query_safe('\set VERBOSITY verbose');
($out, $rc) = $long->query("SELECT billing.record_usage('s2', 'signatures', 1, 'on-standby-long')");
like($long->{stderr}, qr/ERROR:  25006:/,
	'long-lived session: record_usage on the standby fails with SQLSTATE 25006')
	or diag($long->{stderr});
$long->{stderr} = '';
$long->query_safe('\set VERBOSITY default');
is($standby->safe_psql('postgres', "SELECT count(*) FROM billing.usage_events WHERE idempotency_key LIKE 'on-standby%'"),
	'0', 'nothing was written on the standby');
check_all($standby, $long, 'standby, after the refused writes');

amcheck_all($standby);

# ---------------------------------------------------------------------------
# Failover with Stripe requests succeeded, in flight and queued.
amcheck_all($primary, 'postgres', 'before the failover');
my $n = 24;
$primary->safe_psql('postgres', qq{
	SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                                    jsonb_build_object('name', 'Failover ' || i, 'email', 'f' || i || '\@t.example',
	                                                       'metadata', jsonb_build_object('n', i))))
	  FROM generate_series(1, $n) i;
});
# stop the primary while a batch is in flight, well before its answers
# (claimed less than 0.8 s ago; the fake answers after 1.5 s)
ok(defined wait_for(sub {
	$standby->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE state = 'succeeded') >= 4 AND count(*) FILTER (WHERE state = 'pending') > 0
		        AND min(claimed_at) FILTER (WHERE state = 'in_flight') > now() - interval '0.8 s'
		   FROM billing.stripe_requests") eq 't' }, 60),
	'the primary\'s worker is sending (seen on the standby)');
$primary->stop('immediate');
# (everything the standby received is replayed before it is read)
$standby->poll_query_until('postgres', 'SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()')
	or die 'the standby did not replay what it received';

# what the standby holds at the failover: the promoted node starts from it
my %at_failover;
for my $row (split /\n/, $standby->safe_psql('postgres',
	'SELECT idempotency_key, state FROM billing.stripe_requests ORDER BY request_id'))
{
	my ($k, $state) = split /\|/, $row;
	$at_failover{$k} = $state;
}
my %class;
push @{ $class{$at_failover{$_}} }, $_ for keys %at_failover;
note(sprintf('at the failover: %d succeeded, %d in flight, %d queued',
	map { scalar @{ $class{$_} // [] } } qw(succeeded in_flight pending)));
is(scalar(keys %at_failover), $n, "the standby has all $n requests");
cmp_ok(scalar @{ $class{in_flight} // [] }, '>', 0, 'requests are in flight at the failover');
cmp_ok(scalar @{ $class{pending} // [] }, '>', 0, 'requests are queued at the failover');

$standby->promote;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 'f', 'the standby is promoted');
ok(defined wait_for(sub {
	my ($r, $o) = $standby->psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state <> 'succeeded'");
	$r == 0 && $o eq '0' }, 90), 'the promoted node\'s worker sends every request');
like(slurp_file($standby->logfile), qr/qes_billing worker reclaimed \d+ queue rows left in flight/,
	'the rows left in flight were reclaimed when the worker started');
# a promoted standby did not start from a clean shutdown of a primary: the
# old primary's last claims may be missing here, and the reclaim says so
# (it dates the due requests as possibly sent, docs/architecture.md)
is($standby->safe_psql('postgres', q{
	SELECT details ->> 'unclean_start' FROM billing.audit_log WHERE action = 'worker.reclaimed' AND details ? 'unclean_start'
	 ORDER BY audit_id DESC LIMIT 1}),
	'true', 'the promoted node\'s reclaim knows its start was not clean');
# each request queued at the failover was dated as possibly sent since the
# bound (the checkpoint the standby started from) or its creation, if later;
# the bound is before every request was made
my $queued_keys = join(',', map { "'$_'" } @{ $class{pending} // [] });
is($standby->safe_psql('postgres', qq{
	SELECT count(*) FILTER (WHERE r.first_sent_at = greatest(r.created_at, (a.details ->> 'lost_after')::timestamptz))
	       || ' ' || count(*) || ' ' || bool_and((a.details ->> 'lost_after')::timestamptz <= r.created_at)
	  FROM billing.stripe_requests r,
	       (SELECT details FROM billing.audit_log WHERE action = 'worker.reclaimed' AND details ? 'unclean_start'
	         ORDER BY audit_id DESC LIMIT 1) a
	 WHERE r.idempotency_key IN ($queued_keys)}),
	scalar(@{ $class{pending} // [] }) . ' ' . scalar(@{ $class{pending} // [] }) . ' true',
	'the requests queued at the failover were dated from their creation, after the bound');
sleep 2;		# answers of the old primary's last requests reach the fake's log

my $stats = fake_stats($fake_port);
my %sent;
$sent{$_->[2]}++ for grep { $_->[1] eq '/v1/customers' } @{ $stats->{requests} };
is($stats->{creates}{customer}, $n, "exactly $n customers exist in Stripe: none lost, none doubled");
is(scalar(keys %sent), $n, 'one Idempotency-Key per logical request');
is(scalar(grep { !exists $at_failover{$_} } keys %sent), 0, 'every key sent is the key of an outbox row');
for my $state (qw(succeeded pending))
{
	my @wrong = grep { ($sent{$_} // 0) != 1 } @{ $class{$state} // [] };
	is(scalar(@wrong), 0, "every request $state at the failover reached Stripe exactly once")
		or diag(join(', ', map { "$_: " . ($sent{$_} // 0) } @wrong));
}
my @wrong = grep { ($sent{$_} // 0) < 1 || $sent{$_} > 2 } @{ $class{in_flight} // [] };
is(scalar(@wrong), 0, 'every request in flight at the failover reached Stripe once or twice, with its one key')
	or diag(join(', ', map { "$_: " . ($sent{$_} // 0) } @wrong));
note('requests in flight at the failover sent twice: '
	. scalar(grep { $sent{$_} == 2 } @{ $class{in_flight} // [] }));
is($standby->safe_psql('postgres', "SELECT count(DISTINCT response->>'id') FROM billing.stripe_requests"),
	$n, 'each row recorded the one customer Stripe created for it');

# usage after the promotion, in the old long-lived session too
record($standby, $_, 1) for qw(s1 s2 s3 s1);
$standby->safe_psql('postgres', "SELECT billing.upsert_tenant('s4', 'Promoted s4', 's4\@t.example')");
record($standby, 's4', 3);
my $r = long_query($long, "SELECT recorded FROM billing.record_usage('s2', 'signatures', 2, 'long-after-promotion')");
is($r, 't', 'long-lived session: record_usage works after the promotion');
$recorded{s2} += 2 if $r eq 't';
check_all($standby, $long, 'promoted');
$long->quit;

amcheck_all($standby);
$standby->stop;

# the old primary, after crash recovery (which replays the library's own
# WAL records: it stays loaded), with its worker paused and pointed nowhere
# (it must not send anything more to the fake): its indexes too
$primary->append_conf('postgresql.conf', "qes_billing.worker_paused = on\n"
	. "qes_billing.stripe_api_base = 'http://127.0.0.1:9'\nsynchronous_standby_names = ''\n");
$primary->start;
amcheck_all($primary);
$primary->stop;

$fake->kill_kill;
done_testing();
