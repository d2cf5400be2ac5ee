# DROP EXTENSION and CREATE EXTENSION in one transaction while Stripe
# requests are in flight.  The worker must serve the new
# incarnation at once, with no error (its caches and answers belong to the
# incarnation that was dropped), and the late answers to the old
# incarnation's requests must be dropped: their request ids start again at
# 1 in the new tables, where they would otherwise be recorded on the wrong
# rows.
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
use Time::HiRes qw(usleep);
use QesTest;

# the fake Stripe, answering every request after 1.5 s: requests of the
# old incarnation are still in flight when the new one is created
my $delay_ms = 1500;
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my $fake_py = abs_path(dirname(__FILE__) . '/../python/fake_stripe.py');
my ($out, $err) = ('', '');
my $fake = IPC::Run::start(['python3', $fake_py, '--port', $fake_port, '--delay-ms', $delay_ms],
	'>', \$out, '2>', \$err);
ok(defined wait_for(sub { $fake->pump_nb; $out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($err);

sub fake_requests { return fake_stats($fake_port)->{requests}; }

my $node = qes_node('extension_recreate', conf => [
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_recreate'",
	"qes_billing.max_concurrent_requests = 32",
	"qes_billing.request_timeout = '10s'",
	"qes_billing.retry_base_delay = '50ms'",
	"qes_billing.retry_max_delay = '500ms'"]);
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');

sub enqueue_sql
{
	my ($label, $n) = @_;
	return qq{SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                                    jsonb_build_object('name', '$label ' || i)))
	            FROM generate_series(1, $n) i};
}

sub in_flight
{
	return $node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'in_flight'");
}

my $n = 8;
my $log_offset = -s $node->logfile;
for my $round (1 .. 3)
{
	# the incarnation the recreate below drops, checked while its rows are there
	amcheck_all($node, 'postgres', "round $round, before the recreate");

	# the old incarnation: requests claimed and on the wire
	$node->safe_psql('postgres', enqueue_sql("Old$round", $n));
	ok(defined wait_for(sub { in_flight() == $n }, 20), "round $round: $n requests in flight");

	# the recreate, with new requests queued in the same transaction: the
	# new rows get the ids 1..n again, the same ids and attempt numbers as
	# the requests still in flight
	my $keys_before = scalar @{ fake_requests() };
	$node->safe_psql('postgres', join(";\n",
		'BEGIN',
		'DROP EXTENSION qes_billing',
		'CREATE EXTENSION qes_billing',
		enqueue_sql("New$round", $n),
		'COMMIT'));
	my $took = wait_for(sub {
		$node->safe_psql('postgres',
			"SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'") == $n }, 30);
	ok(defined $took, "round $round: every request of the new incarnation succeeds");
	note(sprintf('round %d: new incarnation served in %.2f s (endpoint delay %.1f s)',
		$round, $took // -1, $delay_ms / 1000));

	# each new row holds the answer to its own request, not to the old
	# request with the same id that was in flight
	is($node->safe_psql('postgres', qq{
		SELECT count(*) FROM billing.stripe_requests
		 WHERE response ->> 'name' = params ->> 'name' AND attempts = 1}),
		$n, "round $round: each new row recorded its own answer, once");
	my %new_keys = map { $_ => 1 } split /,/, $node->safe_psql('postgres',
		"SELECT string_agg(idempotency_key, ',') FROM billing.stripe_requests");
	my @sent = grep { defined $_->[2] && $new_keys{ $_->[2] } } @{ fake_requests() };
	is(scalar(@sent), $n, "round $round: the worker sent each new request once");

	# wait out the old answers, then look at the worker
	sleep(2 * $delay_ms / 1000);
	my ($last_error, $present) = split /\|/,
		$node->safe_psql('postgres', 'SELECT last_error, extension_present FROM billing.worker_state()');
	is($last_error // '', '', "round $round: no error in worker_state()");
	is($present, 't', "round $round: worker sees the extension");
	is($node->safe_psql('postgres', "SELECT api.health() -> 'worker' ->> 'last_error'"), '',
		"round $round: no error in the health answer");
	is($node->safe_psql('postgres', 'SELECT api.health() ->> \'status\''), 'ok', "round $round: healthy");
	is($node->safe_psql('postgres', qq{
		SELECT count(*) FROM billing.stripe_requests
		 WHERE state <> 'succeeded' OR response ->> 'name' <> params ->> 'name'}),
		'0', "round $round: the old answers changed no row of the new incarnation");
}

# The reported error: "function billing.worker_reclaim() does not exist".
# The creating transaction becomes visible before it sends its invalidation
# messages, and its commit wakes the worker in between; a worker that is not
# already waiting for the extension's lock (it is busy with requests in
# flight, outside any transaction) then sees the new extension through a
# fresh catalog snapshot while its caches still name the dropped schema.
# The window is microseconds wide; gdb holds it open: the creating backend
# stops in AtEOXact_Inval (after its commit became visible and woke the
# worker, before its invalidations are sent and its locks released) for 3 s,
# while the worker is kept outside any transaction (stopped in
# curl_multi_poll or WaitLatch) until the creator is held there: only then
# is it let go, woken by the commit, inside the window.  The README promises
# this reproduction: without gdb (test/tools/deps.sh installs it), or where
# gdb may not attach, the test fails; and the window must have been hit --
# the worker, let go inside it, waits for the dropped extension's lock --
# or the test fails too.
my $gdb = `command -v gdb 2>/dev/null`;
chomp $gdb;
ok($gdb ne '', 'gdb is installed to hold the commit window open (test/tools/deps.sh)');
if ($gdb ne '')
{
	amcheck_all($node, 'postgres', 'before the held recreate');
	$node->safe_psql('postgres', enqueue_sql('Held', $n));
	ok(defined wait_for(sub { in_flight() == $n }, 20), "held window: $n requests in flight");
	my $creator = $node->background_psql('postgres');
	my $creator_pid = $creator->query_safe('SELECT pg_backend_pid()');
	my $worker = worker_pid($node);
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $signals = "set pagination off\nhandle SIGUSR1 nostop noprint pass\nhandle SIGUSR2 nostop noprint pass\n";
	open my $fh, '>', "$dir/creator.gdb" or die;
	print $fh $signals, "break AtEOXact_Inval\ndisable 1\nbreak XactLogCommitRecord\ncommands 2\nsilent\nenable 1\ncontinue\nend\n",
		"continue\necho HELD\\n\nshell touch '$dir/held'\nshell sleep 3\ndetach\n";
	close $fh;
	open $fh, '>', "$dir/worker.gdb" or die;
	print $fh $signals, "break curl_multi_poll\nbreak WaitLatch\ncontinue\ndelete\necho FROZEN\\n\n",
		"shell for i in \$(seq 600); do [ -e '$dir/held' ] && break; sleep 0.05; done\necho THAWED\\n\ndetach\n";
	close $fh;
	my ($c_out, $w_out) = ('', '');
	my $c_gdb = IPC::Run::start([$gdb, '-p', $creator_pid, '-batch', '-x', "$dir/creator.gdb"],
		'>', \$c_out, '2>&1', IPC::Run::timeout(60));
	sleep 1;
	my $w_gdb = IPC::Run::start([$gdb, '-p', $worker, '-batch', '-x', "$dir/worker.gdb"],
		'>', \$w_out, '2>&1', IPC::Run::timeout(60));
	my $frozen = wait_for(sub { $w_gdb->pump_nb; $w_out =~ /FROZEN/ }, 10);
	$creator->query_until(qr/committing/, join(";\n", 'BEGIN', 'DROP EXTENSION qes_billing',
		'CREATE EXTENSION qes_billing', enqueue_sql('HeldNew', $n), "\\echo committing\nCOMMIT;\n\\echo recreated\n"));
	my $held = wait_for(sub { $c_gdb->pump_nb; $c_out =~ /HELD/ }, 10);
	# the worker is let go once the creator is held, woken by the commit
	# while the creator still holds its locks (3 s): it waits for the
	# dropped extension's lock instead of using caches that still name the
	# dropped schema
	my $waited = (defined $held && defined $frozen) ? wait_for(sub {
		$node->safe_psql('template1', qq{
			SELECT count(*) FROM pg_locks WHERE pid = $worker AND locktype = 'object' AND NOT granted}) > 0 }, 2.8)
		: undef;
	$creator->query_until(qr/recreated/, '');
	$c_gdb->finish;
	$w_gdb->finish;
	$creator->quit;
	ok(defined $held && defined $frozen,
		'held window: gdb held the creator after its commit became visible, and froze the worker outside any transaction')
		or diag("gdb could not hold the window (creator held: " . ($held ? 'yes' : 'no') . ', worker frozen: '
			. ($frozen ? 'yes' : 'no') . ")\ncreator's gdb: $c_out\nworker's gdb: $w_out");
	ok(defined $waited, 'held window: the worker, woken inside the window, waited for the dropped extension\'s lock');
	note(sprintf('held window: the worker waited for the lock %.2f s into the hold', $waited)) if defined $waited;
	ok(defined wait_for(sub {
		$node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'") == $n }, 30),
		'held window: the new incarnation is served');
	is($node->safe_psql('postgres', 'SELECT last_error FROM billing.worker_state()'), '',
		'held window: no error in worker_state() (before the fix: "function billing.worker_reclaim() does not exist")');
	is($node->safe_psql('postgres', "SELECT api.health() -> 'worker' ->> 'last_error'"), '',
		'held window: no error in the health answer');
	sleep(2 * $delay_ms / 1000);    # the held round's old answers
}

my $log = slurp_file($node->logfile, $log_offset);
unlike($log, qr/does not exist|qes_billing worker loop failed|could not record/,
	'no worker error in the log');
my $dropped = () = $log =~ /dropped the answer to Stripe request \d+ of a dropped incarnation/g;
cmp_ok($dropped, '>=', 3 * $n, 'every answer of an old incarnation was dropped, and said so');

amcheck_all($node);
$node->stop;
$fake->kill_kill;
done_testing();
