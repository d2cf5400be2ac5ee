# Usage counters on a hot standby: cached, following replay, exact.
#
# The primary logs each committing transaction's delta per counter (the
# library's own WAL records); the standby's counters add them as the
# commits replay (src/counters.c, "hot standbys").  This test checks that a
# standby's check_limit is answered from its cache (builds once, then hits)
# and equals, at every moment, the sum of the rows the standby has
# replayed: replay is paused at 30 random points while the primary records
# usage from two clients (single records, several records to one counter in
# one transaction, a savepoint rolled back, gauges) and a DBA deletes rows
# by hand, and at each pause the standby's answer is compared with its own
# table.  Then the standby is compared with its caught-up primary, promoted,
# and compared again after more usage.  amcheck on both nodes at the end.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(usleep);
use QesTest;

my $primary = qes_node('primary', allows_streaming => 1,
	conf => ['qes_billing.worker_paused = on']);
$primary->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
$primary->safe_psql('postgres', q{SELECT billing.set_clock('2027-09-30 20:00:00+00' - now())});
$primary->safe_psql('postgres', 'CREATE EXTENSION amcheck');
my @tenants = map { "t$_" } 0 .. 4;
$primary->safe_psql('postgres',
	"SELECT billing.upsert_tenant(t, t, t || '\@t.example') FROM unnest(ARRAY['heavy', "
	. join(', ', map { "'$_'" } @tenants) . "]) t");
# the heavy tenant: 100,000 records in one transaction (one delta record)
$primary->safe_psql('postgres',
	"SELECT count(billing.record_usage('heavy', 'api_calls', 1, 'h' || i)) FROM generate_series(1, 100000) i");
$primary->safe_psql('postgres',
	"SELECT count(billing.record_usage(t, 'api_calls', 1, 'seed-' || t || '-' || i))"
	. " FROM unnest(ARRAY[" . join(', ', map { "'$_'" } @tenants) . "]) t, generate_series(1, 20) i");
$primary->backup('base');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->append_conf('postgresql.conf', "hot_standby = on\n");
$standby->start;
$primary->wait_for_catchup($standby);

# every tenant's counters as "tenant:metric=check_limit/table sum", one line
my @all = ('heavy', @tenants);
my $compare_sql = "SELECT string_agg(t || ':' || m || '=' || (billing.check_limit(t, m, 0)).current || '/' ||"
	. " (SELECT CASE WHEN m = 'storage'"
	. "   THEN coalesce((SELECT quantity FROM billing.usage_events u WHERE u.tenant_id = t AND u.metric = m"
	. "                   ORDER BY occurred_at DESC, recorded_at DESC LIMIT 1), 0)"
	. "   ELSE coalesce(sum(quantity), 0) END FROM billing.usage_events u WHERE u.tenant_id = t AND u.metric = m),"
	. " ' ' ORDER BY t, m)"
	. " FROM unnest(ARRAY[" . join(', ', map { "'$_'" } @all) . "]) t, unnest(ARRAY['api_calls', 'storage']) m";
sub mismatches
{
	my ($line) = @_;
	return grep { my ($a, $b) = /=(\d+)\/(\d+)$/; $a != $b } split / /, $line;
}

my $first = $standby->safe_psql('postgres', $compare_sql);
is(scalar(mismatches($first)), 0, 'the standby: every counter equals its table') or diag($first);
like($first, qr/heavy:api_calls=100000\/100000/, 'the heavy tenant: 100,000 on the standby');
my ($loads0, $hits0) = split /\|/, $standby->safe_psql('postgres',
	'SELECT loads, hits FROM billing.usage_cache_stats()');
cmp_ok($loads0, '>=', 12, 'the standby built its counters');
$standby->safe_psql('postgres', "SELECT billing.check_limit('heavy', 'api_calls', 0) FROM generate_series(1, 100)");
my ($loads1, $hits1) = split /\|/, $standby->safe_psql('postgres',
	'SELECT loads, hits FROM billing.usage_cache_stats()');
is($loads1, $loads0, 'a hundred more checks on the standby built nothing');
cmp_ok($hits1 - $hits0, '>=', 100, '... and were answered from its counters');

# ---------------------------------------------------------------------------
# The delta of a transaction still in progress, replayed before the standby
# builds the counter: the build finds it in the ring of recent deltas.  The
# primary's session holds its commit for 3 s after logging its delta
# (counter_pre_commit_delay); another commit meanwhile sends that delta to
# the standby.  Then the same with more than the ring holds (4,200 deltas)
# replayed in between: the build must refuse to cache.
$primary->safe_psql('postgres',
	"SELECT count(billing.upsert_tenant(t, t, 'r\@t.example')) FROM unnest(ARRAY['ring', 'ring2']) t");
$primary->safe_psql('postgres',
	"SELECT count(billing.upsert_tenant('m' || i, 'M', 'm\@t.example')) FROM generate_series(1, 4200) i");
$primary->wait_for_catchup($standby);

sub held_commit
{
	my ($tenant) = @_;
	my ($o, $e) = ('', '');
	my $h = IPC::Run::start(['psql', '-X', '-h', $primary->host, '-p', $primary->port, '-d', 'postgres',
		'-c', "SET qes_billing.debug_fault = 'counter_pre_commit_delay'",
		'-c', "BEGIN; SELECT billing.record_usage('$tenant', 'api_calls', 5, '$tenant-1'); COMMIT;"],
		'>', \$o, '2>', \$e);
	# its delta is logged once its xid is assigned (record_usage ran)
	wait_for(sub { $primary->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%$tenant-1%' AND backend_xid IS NOT NULL"
		. " AND pid <> pg_backend_pid()") eq '1' }, 10);
	usleep(300_000);
	return ($h, \$o, \$e);
}
sub cache_stat
{
	my ($what) = @_;
	return $standby->safe_psql('postgres', "SELECT $what FROM billing.usage_cache_stats()");
}

my ($h, $o, $e) = held_commit('ring');
$primary->safe_psql('postgres', "SELECT billing.record_usage('t0', 'api_calls', 1, 'flush-1')");
$primary->wait_for_catchup($standby);
my $loads = cache_stat('loads');
is($standby->safe_psql('postgres', "SELECT (billing.check_limit('ring', 'api_calls', 0)).current"), '0',
	'ring: the standby does not count a transaction whose commit it has not replayed');
is(cache_stat('loads'), $loads + 1, 'ring: ... and built the counter meanwhile');
$h->finish;
is($$e, '', 'ring: the held transaction committed');
$primary->wait_for_catchup($standby);
$loads = cache_stat('loads');
is($standby->safe_psql('postgres', "SELECT (billing.check_limit('ring', 'api_calls', 0)).current"), '5',
	'ring: once its commit is replayed, its delta (replayed before the build) counts');
is(cache_stat('loads'), $loads, 'ring: ... from the cached counter');

($h, $o, $e) = held_commit('ring2');
$primary->safe_psql('postgres',
	"SELECT count(billing.record_usage('m' || i, 'api_calls', 1, 'flood-' || i)) FROM generate_series(1, 4200) i");
$primary->wait_for_catchup($standby);
my $dropped = cache_stat('dropped');
is($standby->safe_psql('postgres', "SELECT (billing.check_limit('ring2', 'api_calls', 0)).current"), '0',
	'ring overrun: not counted before its commit');
is(cache_stat('dropped'), $dropped + 1, 'ring overrun: the build gave up (its delta left the ring unapplied)');
$h->finish;
is($$e, '', 'ring overrun: the held transaction committed');
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', "SELECT (billing.check_limit('ring2', 'api_calls', 0)).current"), '5',
	'ring overrun: counted once its commit is replayed');

# A build whose snapshot had the transaction in progress, still summing
# when that transaction's commit and 4,200 more deltas are replayed (its
# delta overwritten in the ring meanwhile, after it committed): the build
# took the ring's deltas with its snapshot, so it counts the transaction
# once its commit is replayed (counter_build_delay holds the build for 6 s
# after its snapshot).
$primary->safe_psql('postgres', "SELECT billing.upsert_tenant('ring3', 'ring3', 'r\@t.example')");
$primary->wait_for_catchup($standby);
($h, $o, $e) = held_commit('ring3');
$primary->safe_psql('postgres', "SELECT billing.record_usage('t0', 'api_calls', 1, 'flush-3')");
$primary->wait_for_catchup($standby);
$loads = cache_stat('loads');
my ($bo, $be) = ('', '');
my $builder = IPC::Run::start(['psql', '-X', '-qAt', '-h', $standby->host, '-p', $standby->port, '-d', 'postgres',
	'-c', "SET qes_billing.debug_fault = 'counter_build_delay'",
	'-c', "SELECT (billing.check_limit('ring3', 'api_calls', 0)).current"], '>', \$bo, '2>', \$be);
usleep(800_000);
$h->finish;
is($$e, '', 'slow build: the held transaction committed');
# three transactions of 1,400: none overwrites its own deltas while in progress
for my $b (0 .. 2)
{
	$primary->safe_psql('postgres',
		"SELECT count(billing.record_usage('m' || i, 'api_calls', 1, 'flood2-' || i))"
		. " FROM generate_series($b * 1400 + 1, $b * 1400 + 1400) i");
}
$primary->wait_for_catchup($standby);
$builder->finish;
is($bo, "5\n", 'slow build: it counted the transaction whose commit was replayed while it summed') or diag($be);
is(cache_stat('loads'), $loads + 1, 'slow build: ... and cached the counter');
$loads = cache_stat('loads');
is($standby->safe_psql('postgres', "SELECT (billing.check_limit('ring3', 'api_calls', 0)).current"), '5',
	'slow build: the next check: 5, from the cache');
is(cache_stat('loads'), $loads, 'slow build: ... without building again');

# ---------------------------------------------------------------------------
# The primary records usage from two clients while replay is paused and
# resumed on the standby.
my $dir = PostgreSQL::Test::Utils::tempdir();
my $tlist = join(', ', map { "'$_'" } @tenants);
open my $fh, '>', "$dir/usage.sql" or die;
print $fh <<"SQL";
\\set t random(0, 4)
\\set q random(1, 5)
\\set k random(1, 9000000000000000000)
BEGIN;
SELECT billing.record_usage('t' || :t, 'api_calls', :q, 'a-' || :k);
SELECT billing.record_usage('t' || :t, 'api_calls', 1, 'b-' || :k);
SELECT billing.record_usage('t' || :t, 'storage', :q * 1000, 's-' || :k);
SAVEPOINT s;
SELECT billing.record_usage('t' || :t, 'api_calls', 100, 'rolled-back-' || :k);
ROLLBACK TO SAVEPOINT s;
SELECT billing.record_usage('heavy', 'api_calls', :q, 'hv-' || :k);
COMMIT;
SQL
close $fh;
my ($bench_out, $bench_err) = ('', '');
my $bench = IPC::Run::start(['pgbench', '-n', '-c', '2', '-j', '2', '-T', '15', '-R', '400',
	'-f', "$dir/usage.sql", '-h', $primary->host, '-p', $primary->port, 'postgres'],
	'>', \$bench_out, '2>', \$bench_err);
ok(defined wait_for(sub {
	$primary->safe_psql('postgres', "SELECT count(*) > 20 FROM billing.usage_events WHERE idempotency_key LIKE 'a-%'") eq 't' }, 30),
	'the primary is recording usage');

my ($pauses, $bad, $deleted) = (0, 0, 0);
for my $i (1 .. 30)
{
	if ($i == 12)
	{
		# a DBA's hand-made change: the standby's counters start over
		$primary->safe_psql('postgres',
			"DELETE FROM billing.usage_events WHERE idempotency_key LIKE 'seed-t0-%' AND quantity = 1");
		$deleted = 1;
	}
	$standby->safe_psql('postgres', 'SELECT pg_wal_replay_pause()');
	next unless defined wait_for(sub {
		$standby->safe_psql('postgres', 'SELECT pg_get_wal_replay_pause_state()') eq 'paused' }, 10);
	$pauses++;
	my $line = $standby->safe_psql('postgres', $compare_sql);
	my @m = mismatches($line);
	if (@m)
	{
		$bad++;
		diag("pause $i: " . join(' ', @m));
	}
	$standby->safe_psql('postgres', 'SELECT pg_wal_replay_resume()');
	usleep(int(rand(300_000)));
}
$bench->finish;
is($pauses, 30, 'replay was paused 30 times while the primary wrote');
is($bad, 0, 'at every pause, every standby counter equalled the rows the standby had replayed');
like($bench_out, qr/number of failed transactions: 0/, 'the primary\'s clients recorded without a failure')
	or diag($bench_out . $bench_err);
my $stats = $standby->safe_psql('postgres', 'SELECT hits || \' hits, \' || loads || \' builds, \' || uncached || \' uncached, \' || dropped || \' dropped\' FROM billing.usage_cache_stats()');
note("standby counters: $stats");
my ($hits2) = split /\|/, $standby->safe_psql('postgres', 'SELECT hits FROM billing.usage_cache_stats()');
cmp_ok($hits2, '>', $hits1, 'the standby answered from its counters while it replayed');

$primary->wait_for_catchup($standby);
my $on_primary = $primary->safe_psql('postgres', $compare_sql);
my $on_standby = $standby->safe_psql('postgres', $compare_sql);
is(scalar(mismatches($on_primary)), 0, 'the primary: every counter equals its table') or diag($on_primary);
is($on_standby, $on_primary, 'the caught-up standby answers what the primary answers') or diag($on_standby);

# ---------------------------------------------------------------------------
# Promotion: the counters built during recovery are not trusted any more.
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()');
my $promoted = $standby->safe_psql('postgres', $compare_sql);
is($promoted, $on_primary, 'promoted: every counter as before');
$standby->safe_psql('postgres',
	"SELECT billing.record_usage(t, 'api_calls', 3, 'after-' || t) FROM unnest(ARRAY['heavy', $tlist]) t");
my $after = $standby->safe_psql('postgres', $compare_sql);
is(scalar(mismatches($after)), 0, 'promoted, after more usage: every counter equals its table') or diag($after);
like($after, qr/t1:api_calls=(\d+)\/\1/, 'promoted: t1 counted');

amcheck_all($standby);
amcheck_all($primary);
$standby->stop;
$primary->stop;
done_testing();
