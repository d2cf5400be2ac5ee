# Usage survives crashes exactly once.  Clients record usage concurrently,
# each key retried until the server acknowledges it (as a client does with
# an idempotency key); meanwhile a backend is killed with SIGKILL, forcing
# crash recovery, and later the server is restarted cleanly.  Afterwards,
# per tenant, the shared counter, the table and the keys the client saw
# acknowledged agree: nothing lost, nothing counted twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use POSIX ();
use Time::HiRes qw(usleep);
use QesTest;

my $node = qes_node('usage_crash');
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
# at a fixed date through the billing clock (the last evening of February): no
# period ends while the test runs, whatever day it runs
$node->safe_psql('postgres', q{SELECT billing.set_clock('2027-02-28 21:00:00+00' - now())});
my $clients = 4;
for my $c (1 .. $clients)
{
	$node->safe_psql('postgres', "SELECT billing.upsert_tenant('crash$c', 'Crash $c', 'c$c\@t.example')");
}
$node->safe_psql('postgres', "SELECT billing.upsert_tenant('crash_victim', 'Victim', 'v\@t.example')");

my $dir = PostgreSQL::Test::Utils::tempdir;
my ($host, $port) = ($node->host, $node->port);

sub acknowledged;

# One client: records key 1, 2, 3 ... for its tenant; a key counts as done
# once a call for it returned successfully (recorded or duplicate).
sub start_client
{
	my ($c, $seconds) = @_;
	my $i = acknowledged($c) + 1;	# a second run goes on with new keys
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	return $pid if $pid;
	my $deadline = time + $seconds;
	open(my $done, '>>', "$dir/done$c") or die;
	$done->autoflush(1);
	while (time < $deadline)
	{
		my $out = `psql -XAtq -h '$host' -p $port -d postgres -c "SELECT recorded OR duplicate FROM billing.record_usage('crash$c', 'api_calls', 1, 'k$i')" 2>/dev/null`;
		if ($? == 0 && $out =~ /^t/)
		{
			print $done "$i\n";
			$i++;
		}
		else
		{
			usleep(50_000);
		}
	}
	close($done);
	POSIX::_exit(0);			# not exit: the harness's END blocks would stop the node
}

sub acknowledged
{
	my ($c) = @_;
	return 0 unless -e "$dir/done$c";
	my @lines = split /\n/, slurp_file("$dir/done$c");
	return scalar @lines;
}

sub check_totals
{
	my ($label) = @_;
	for my $c (1 .. $clients)
	{
		my $acked = acknowledged($c);
		my ($counter, $rows, $sum) = split /\|/, $node->safe_psql('postgres', qq{
			SELECT (billing.check_limit('crash$c', 'api_calls', 0)).current,
			       count(*), coalesce(sum(quantity), 0)
			  FROM billing.usage_events WHERE tenant_id = 'crash$c'});
		is($rows, $acked, "$label: tenant $c: one row per acknowledged key ($acked)");
		is($counter, $acked, "$label: tenant $c: the counter equals the acknowledged keys");
	}
}

# Run 1: crash recovery in the middle.
my @pids = map { start_client($_, 8) } 1 .. $clients;
ok(defined wait_for(sub { acknowledged(1) > 20 && acknowledged($clients) > 20 }, 30), 'clients are recording');
# The victim: a backend in the middle of a transaction that recorded usage
# and has not committed.  SIGKILL on it makes the postmaster reinitialise.
my $victim_session = $node->background_psql('postgres', on_error_stop => 0);
# the session names its own backend (a lookup by query text raced with psql
# sending the next statement on a loaded machine)
my $ready = $victim_session->query_until(qr/victim ready \d+/, q{
BEGIN;
SELECT billing.record_usage('crash_victim', 'api_calls', 1, 'never-committed');
SELECT pg_backend_pid() AS victim_pid \gset
\echo victim ready :victim_pid
SELECT pg_sleep(600);
});
my ($victim) = $ready =~ /victim ready (\d+)/;
ok(defined $victim && defined wait_for(sub {
		$node->safe_psql('postgres', qq{
			SELECT count(*) FROM pg_stat_activity
			 WHERE pid = $victim AND state = 'active' AND backend_xid IS NOT NULL}) eq '1' }, 30),
	'a backend is in the middle of recording usage');
die "no victim backend to kill" unless $victim;	# kill 0 would hit our own process group
note("killing backend $victim with SIGKILL");
kill 'KILL', $victim;
waitpid($_, 0) for @pids;
ok(defined wait_for(sub { my ($r) = $node->psql('postgres', 'SELECT 1'); $r == 0 }, 60), 'server is back after crash recovery');
ok(defined wait_for(sub { slurp_file($node->logfile) =~ /terminated by signal 9/
		&& slurp_file($node->logfile) =~ /all server processes terminated; reinitializing/ }, 30),
	'the server went through crash recovery');
eval { $victim_session->quit; };
is($node->safe_psql('postgres', q{
	SELECT (billing.check_limit('crash_victim', 'api_calls', 0)).current || '/' || count(*)
	  FROM billing.usage_events WHERE tenant_id = 'crash_victim'}),
	'0/0', 'the killed, uncommitted usage was not counted');
check_totals('after crash');

# Run 2: a clean restart in the middle.
@pids = map { start_client($_, 6) } 1 .. $clients;
my $before = acknowledged(1);
ok(defined wait_for(sub { acknowledged(1) > $before + 20 }, 30), 'clients are recording again');
$node->restart;
waitpid($_, 0) for @pids;
check_totals('after restart');

my $total = 0;
$total += acknowledged($_) for 1 .. $clients;
note("acknowledged records in all: $total");
cmp_ok($total, '>', 200, 'enough records were made for the test to mean something');

amcheck_all($node);
$node->stop;
done_testing();
