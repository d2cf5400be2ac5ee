# Idle is free (docs/architecture.md, rule 14): with nothing
# due the worker sleeps for its naptime and runs no transaction; a commit
# that queues work still has it picked up within milliseconds; and its
# transactions never overflow the 64-entry subtransaction xid cache of its
# PGPROC (a batch of events, a batch of Stripe answers).
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
use Time::HiRes qw(time usleep);
use QesTest;

my $naptime_ms = 200;

# a fake Stripe answering at once (the wire latency part), later slowly
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my $fake_py = abs_path(dirname(__FILE__) . '/../python/fake_stripe.py');
my ($out, $err) = ('', '');
my $fake = IPC::Run::start(['python3', $fake_py, '--port', $fake_port], '>', \$out, '2>', \$err);
ok(defined wait_for(sub { $fake->pump_nb; $out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($err);

sub fake_requests { return fake_stats($fake_port)->{requests}; }

my $node = qes_node('idle', naptime => "${naptime_ms}ms", conf => [
	# nothing but the worker may run transactions in the database
	"autovacuum = off",
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_idle'",
	"qes_billing.max_concurrent_requests = 64",
	"qes_billing.request_timeout = '10s'"]);
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
ok(defined wait_for(sub { worker_state($node)->{extension_present} eq 't' }, 10), 'the worker found the extension');

sub state
{
	my $row = $node->safe_psql('postgres',
		'SELECT loops, timeout_wakeups, latch_wakeups, xacts, max_subxids, subxid_overflows, last_error
		   FROM billing.worker_state()');
	my @f = split /\|/, $row, -1;
	return { loops => $f[0], timeout_wakeups => $f[1], latch_wakeups => $f[2], xacts => $f[3],
			 max_subxids => $f[4], subxid_overflows => $f[5], last_error => $f[6], at => time };
}

# transactions committed in the database, read from another database so
# that reading them adds none (the worker sends its statistics within a
# second or so)
sub db_commits
{
	return $node->safe_psql('template1',
		"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'postgres'");
}

# ---- idle ------------------------------------------------------------------

sleep 2;    # let the creation settle, its statistics be sent
my $s0 = state();
sleep 1.5;  # (the statistics of the session that read it)
my $c0 = db_commits();
my $idle_s = 4;
sleep $idle_s;
my $c1 = db_commits();
my $s1 = state();
my $elapsed = $s1->{at} - $s0->{at};
my $loops = $s1->{loops} - $s0->{loops};
my $allowed = int($elapsed * 1000 / $naptime_ms) + 1;
note(sprintf('idle %.1f s at naptime %d ms: %d loops (%.1f/s; %d timeout, %d latch wake-ups), %d worker transactions, %d commits in the database',
	$elapsed, $naptime_ms, $loops, $loops / $elapsed, $s1->{timeout_wakeups} - $s0->{timeout_wakeups},
	$s1->{latch_wakeups} - $s0->{latch_wakeups}, $s1->{xacts} - $s0->{xacts}, $c1 - $c0));
cmp_ok($loops, '<=', $allowed, "idle: at most one loop per naptime ($loops in ${elapsed}s, allowed $allowed)");
cmp_ok($loops, '>=', int($elapsed * 1000 / $naptime_ms / 2), 'idle: the heartbeat goes on (a loop per naptime)');
is($s1->{xacts} - $s0->{xacts}, 0, 'idle: the worker ran no transaction');
is($c1 - $c0, 0, "idle: no transaction committed in the worker's database (pg_stat_database)");
is($s1->{latch_wakeups} - $s0->{latch_wakeups}, 0, 'idle: nothing woke it');
is($node->safe_psql('postgres', 'SELECT alive FROM billing.worker_status'), 't', 'idle: the worker is alive');
is($node->safe_psql('postgres', 'SELECT billing.outbox_next_due() IS NULL'), 't',
	'an empty outbox is due never (NULL), not now (0)');

# ---- a commit wakes it within milliseconds -----------------------------------

sub percentile
{
	my ($p, @v) = @_;
	@v = sort { $a <=> $b } @v;
	return $v[ int($p / 100 * $#v + 0.5) ];
}

# events: commit -> applied (received_at is the inserting statement's start)
my $n = 40;
my $bg = $node->background_psql('postgres');
for my $i (1 .. $n)
{
	$bg->query_safe(qq{
		INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload)
		VALUES ('evt_idle_$i', 'customer.updated', false, now(),
		        '{"id": "evt_idle_$i", "type": "customer.updated", "created": 1700000000,
		          "data": {"object": {"id": "cus_not_ours_$i", "object": "customer"}}}')});
	usleep(50_000);
}
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE applied_at IS NOT NULL") == $n }, 20),
	"all $n events applied");
my @event_ms = split /\n/, $node->safe_psql('postgres',
	"SELECT round(extract(epoch FROM applied_at - received_at) * 1000, 2) FROM billing.webhook_events");
my ($e50, $e99) = (percentile(50, @event_ms), percentile(99, @event_ms));
note("commit -> event applied, $n events 50 ms apart: p50 $e50 ms, p99 $e99 ms, max " . percentile(100, @event_ms) . ' ms');
cmp_ok($e50, '<', 25, 'an event is applied within milliseconds of its commit (p50)');
cmp_ok($e99, '<', 150, 'and p99');

# outbox: commit -> request on the wire (the fake notes when it answered)
for my $i (1 .. $n)
{
	$bg->query_safe(qq{SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                                                 '{"name": "Idle $i"}')});
	usleep(50_000);
}
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'") == $n }, 20),
	"all $n requests answered");
$bg->quit;
my @claim_ms = split /\n/, $node->safe_psql('postgres',
	"SELECT round(extract(epoch FROM claimed_at - created_at) * 1000, 2) FROM billing.stripe_requests");
note(sprintf('commit -> request claimed, %d requests 50 ms apart: p50 %.2f ms, p99 %.2f ms', $n,
	percentile(50, @claim_ms), percentile(99, @claim_ms)));
my %created = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
	"SELECT idempotency_key, extract(epoch FROM created_at) FROM billing.stripe_requests");
my @wire_ms = map { ($_->[4] - $created{ $_->[2] }) * 1000 } grep { defined $_->[2] && $created{ $_->[2] } } @{ fake_requests() };
is(scalar(@wire_ms), $n, 'each request reached the fake once');
my ($w50, $w99) = (percentile(50, @wire_ms), percentile(99, @wire_ms));
note(sprintf('commit -> request on the wire (as the Python fake notes its answer), %d requests 50 ms apart: p50 %.2f ms, p99 %.2f ms', $n, $w50, $w99));
cmp_ok($w50, '<', 25, 'a request is on the wire within milliseconds of its commit (p50)');
cmp_ok($w99, '<', 150, 'and p99');

# idle again afterwards: the retries, stale and due timers are all quiet
sleep 2;
$s0 = state();
sleep 3;
$s1 = state();
is($s1->{xacts} - $s0->{xacts}, 0, 'idle again after the work: no transaction');
cmp_ok($s1->{loops} - $s0->{loops}, '<=', int(($s1->{at} - $s0->{at}) * 1000 / $naptime_ms) + 1,
	'idle again: at most one loop per naptime');

# an UPDATE that makes work due wakes it too (an operator's replay, a test)
$node->safe_psql('postgres', "UPDATE billing.webhook_events SET state = 'received', next_attempt_at = now()
                               WHERE stripe_event_id = 'evt_idle_1'");
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT state FROM billing.webhook_events WHERE stripe_event_id = 'evt_idle_1'") ne 'received' }, 5),
	'an UPDATE that makes an event due wakes the worker');

# a retry with backoff is due later: the worker sleeps until then, not longer
$node->safe_psql('postgres', "UPDATE billing.webhook_events SET state = 'received', next_attempt_at = now() + interval '1.5 seconds'
                               WHERE stripe_event_id = 'evt_idle_2'");
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT state FROM billing.webhook_events WHERE stripe_event_id = 'evt_idle_2'") ne 'received' }, 5),
	'an event due in 1.5 s is applied when it falls due');
cmp_ok($node->safe_psql('postgres', "SELECT applied_at - next_attempt_at < interval '0.3 s' FROM billing.webhook_events WHERE stripe_event_id = 'evt_idle_2'"),
	'eq', 't', 'within the naptime of its due time');

# ---- subtransactions: a batch never overflows the 64-entry cache -------------

# 200 events committed at once: applied in transactions of at most 50
my $before = state();
$node->safe_psql('postgres', q{
	INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload)
	SELECT 'evt_many_' || i, 'customer.updated', false, now(),
	       json_build_object('id', 'evt_many_' || i, 'type', 'customer.updated', 'created', 1700000000,
	                         'data', json_build_object('object', json_build_object('id', 'cus_many_' || i, 'object', 'customer')))
	  FROM generate_series(1, 200) i});
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE stripe_event_id LIKE 'evt_many_%' AND applied_at IS NOT NULL") == 200 }, 30),
	'200 events committed at once are all applied');
is($node->safe_psql('postgres', "SELECT count(*) FILTER (WHERE attempts = 1) FROM billing.webhook_events WHERE stripe_event_id LIKE 'evt_many_%'"),
	'200', 'each exactly once');
my $after = state();
note("200 events: $after->{xacts} - $before->{xacts} worker transactions, most subxids cached by one: $after->{max_subxids}");
cmp_ok($after->{max_subxids}, '<', 64, 'no worker transaction cached 64 subtransaction xids');
is($after->{subxid_overflows}, 0, 'none overflowed the cache');
cmp_ok($after->{xacts} - $before->{xacts}, '>=', 4, 'the batch took several transactions');

# 128 Stripe answers arriving together (64 in flight to an endpoint that
# answers each after 0.3 s): each successful answer takes two subxids (its
# subtransaction and outbox_record's block), so a batch of 64 is recorded in
# more than one transaction
my $slow_port = PostgreSQL::Test::Cluster::get_free_port();
my $slow_py = abs_path(dirname(__FILE__) . '/../bench/slow_endpoint.py');
my ($sout, $serr) = ('', '');
my $slow = IPC::Run::start(['python3', $slow_py, 'serve', $slow_port, '300'], '>', \$sout, '2>', \$serr);
ok(defined wait_for(sub { $slow->pump_nb; $sout =~ /listening/ }, 20), 'the slow endpoint is listening')
	or diag($serr);
$node->safe_psql('postgres', "ALTER SYSTEM SET qes_billing.stripe_api_base = 'http://127.0.0.1:$slow_port'");
$node->reload;
ok(defined wait_for(sub { $node->safe_psql('postgres', 'SHOW qes_billing.stripe_api_base') =~ /$slow_port/ }, 10),
	'the worker talks to it');
$node->safe_psql('postgres', q{
	SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', jsonb_build_object('name', 'Many ' || i)))
	  FROM generate_series(1, 128) i});
my $t0 = time;
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded' AND params ->> 'name' LIKE 'Many %'") == 128 }, 60),
	'128 requests answered and recorded');
note(sprintf('128 requests, 64 in flight, 0.3 s each: %.2f s', time - $t0));
is($node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE params ->> 'name' LIKE 'Many %' AND attempts = 1 AND response ->> 'id' LIKE 'cus_bench%'"),
	'128', 'each sent and recorded once');
$after = state();
note("128 answers: most subxids cached by one worker transaction: $after->{max_subxids}");
cmp_ok($after->{max_subxids}, '<', 64, 'recording 64 answers at once caches fewer than 64 subxids per transaction');
is($after->{subxid_overflows}, 0, 'none overflowed the cache');
is($after->{last_error}, '', 'no error in the worker');
$slow->kill_kill;

amcheck_all($node);
$node->stop;
$fake->kill_kill;
done_testing();
