# The worker: start, wake on commit (not before, not on rollback), SIGHUP,
# DROP/CREATE EXTENSION while it runs, restart after being killed, crash
# reconciliation of rows left in flight.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use QesTest;

my $node = qes_node('worker');

# It starts with the server, before the extension exists.
ok(defined wait_for(sub { worker_pid($node) ne '' }, 30), 'worker starts with the server');
my $pid = worker_pid($node);
is($node->safe_psql('postgres',
	"SELECT application_name || '/' || datname FROM pg_stat_activity WHERE pid = $pid"),
	'qes_billing worker/postgres', 'worker is visible in pg_stat_activity under its name');

$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
ok(defined wait_for(sub { worker_state($node)->{extension_present} eq 't' }, 10),
	'worker finds the extension once created');
is(worker_state($node)->{pid}, $pid, 'worker_state() reports the running worker');

# SIGHUP: the worker re-reads its settings.
$node->safe_psql('postgres', "ALTER SYSTEM SET qes_billing.worker_naptime = '1h'");
$node->reload;
ok(defined wait_for(sub { worker_state($node)->{naptime_ms} == 3600000 }, 10),
	'worker re-reads settings on SIGHUP');
is(worker_pid($node), $pid, 'SIGHUP does not restart the worker');

# Wake on commit.  With a one-hour naptime, only a wake-up makes it loop.
my $bg = $node->background_psql('postgres');
my $before = worker_state($node);
$bg->query_safe('BEGIN');
$bg->query_safe("INSERT INTO billing.stripe_requests (kind, method, path) VALUES ('test.ping', 'GET', '/v1/balance')");
sleep 1;
my $during = worker_state($node);
is($during->{wake_requests}, $before->{wake_requests}, 'no wake-up before COMMIT');
is($node->safe_psql('postgres', 'SELECT count(*) FROM billing.stripe_requests'), '0',
	'the uncommitted row is invisible');
$bg->query_safe('COMMIT');
my $took = wait_for(sub {
	my $s = worker_state($node);
	$s->{wake_requests} > $before->{wake_requests} && $s->{wakes_served} >= $s->{wake_requests}
		&& $s->{loops} > $during->{loops};
}, 10);
ok(defined $took, 'worker runs a loop right after COMMIT');
note(sprintf('commit-to-worker-loop latency: %.1f ms', ($took // 0) * 1000));

$before = worker_state($node);
$bg->query_safe('BEGIN');
$bg->query_safe("INSERT INTO billing.stripe_requests (kind, method, path) VALUES ('test.ping', 'GET', '/v1/balance')");
$bg->query_safe('ROLLBACK');
sleep 1;
is(worker_state($node)->{wake_requests}, $before->{wake_requests}, 'no wake-up on ROLLBACK');
$bg->quit;

# DROP / CREATE EXTENSION while the worker runs.
amcheck_all($node, 'postgres', 'before DROP EXTENSION');
$node->safe_psql('postgres', 'DROP EXTENSION qes_billing');
$node->safe_psql('postgres', 'SELECT pg_sleep(0.5)');
is(worker_pid($node), $pid, 'worker survives DROP EXTENSION');
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
ok(defined wait_for(sub { worker_state($node)->{extension_present} eq 't' }, 10),
	'worker picks up the re-created extension');
is(worker_pid($node), $pid, 'same worker throughout');
my ($ok, $stdout, $stderr) = $node->psql('postgres', 'SELECT last_error FROM billing.worker_state()');
is($stdout, '', 'no loop error after DROP/CREATE');

# SIGTERM: the postmaster restarts the worker.
kill 'TERM', $pid;
ok(defined wait_for(sub { my $p = worker_pid($node); $p ne '' && $p ne $pid }, 30),
	'worker is restarted after being terminated');
$pid = worker_pid($node);

# Crash: rows left in flight are reclaimed at start-up, keeping their key.
$node->safe_psql('postgres', q{
	INSERT INTO billing.stripe_requests (kind, method, path, state, attempts, claimed_at)
	VALUES ('test.crash', 'POST', '/v1/customers', 'in_flight', 1, now());
	INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload, state)
	VALUES ('evt_crash', 'invoice.paid', false, now(), '{}', 'processing');
});
my $key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE kind = 'test.crash'");
kill 'KILL', $pid;    # a worker killed by SIGKILL makes the postmaster reinitialise
ok(defined wait_for(sub {
	my ($r, $o) = $node->psql('postgres', "SELECT state FROM billing.stripe_requests WHERE kind = 'test.crash'");
	$r == 0 && $o eq 'pending';
}, 60), 'in-flight request is back in the queue after the crash');
is($node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE kind = 'test.crash'"),
	$key, 'reclaimed request keeps its idempotency key');
like($node->safe_psql('postgres', "SELECT state FROM billing.webhook_events WHERE stripe_event_id = 'evt_crash'"),
	qr/^(received|ignored)$/, 'in-flight webhook event is back in the inbox (and then processed)');
ok(defined wait_for(sub { worker_state($node)->{reclaimed} >= 2 }, 10), 'worker reports what it reclaimed');
is($node->safe_psql('postgres', "SELECT details - 'lost_after' FROM billing.audit_log WHERE action = 'worker.reclaimed'"),
	'{"possibly_sent": 0, "unclean_start": true, "webhook_events": 1, "stripe_requests": 1}',
	'reclaim is audited, and a worker killed by SIGKILL (every process restarted) is a start that was not clean');
isnt(worker_pid($node), $pid, 'a new worker runs after the crash');

amcheck_all($node);

# The check can fail: a row inserted while an index was marked not ready has
# no entry in it (what a direct write that skipped an index leaves), and
# amcheck_failures names the index; REINDEX repairs it.
my $index = 'billing.tenants_stripe_customer_id_key';
$node->safe_psql('postgres', qq{
	UPDATE pg_index SET indisready = false WHERE indexrelid = '$index'::regclass;
	SELECT billing.upsert_tenant('amcheck_gate', 'Gate', 'gate\@t.example');
	UPDATE pg_index SET indisready = true WHERE indexrelid = '$index'::regclass;
});
my ($checked, $skipped, $failures) = amcheck_failures($node);
is(scalar(@$failures), 1, 'amcheck finds the row missing from one index');
like($failures->[0] // '', qr/^\Q$index\E: .*lacks matching index tuple/, 'and names the index');
$node->safe_psql('postgres', "REINDEX INDEX $index");
amcheck_all($node, 'postgres', 'after REINDEX');
$node->stop;
done_testing();
