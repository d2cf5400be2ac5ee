# A transaction that wrote a tenant's rows and was prepared (two-phase
# commit) before a partition move's fence: the move waits for it to end,
# also once its session has gone on to other work, and after a clean
# restart or a crash recovered it (from its state file, or from the WAL).
# A prepared transaction has no backend, so the move cannot
# find it by the slot its check left (src/fence.c); the lock it takes as it
# prepares passes to the prepared transaction, is recovered with it, and
# the move waits for every holder.  A prepared transaction that wrote no
# tenant's rows is not waited for.  And a crash while a partition is
# fenced does not stop the worker: its reclaim runs exempt from fences.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use QesTest;

my $node = qes_node('prepared_fence', conf => ['max_prepared_transactions = 4']);
$node->safe_psql('postgres', 'ALTER SYSTEM SET qes_billing.worker_paused = on');
$node->reload;
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
$node->safe_psql('postgres', q{SELECT billing.upsert_tenant('prep_a', 'Prepared A', 'a@prep.example')});

# Twice: recovered by a clean restart (from the prepared transactions'
# state files, written by the shutdown checkpoint) and after a crash (from
# the WAL, replayed since the last checkpoint).
for my $how ('restart', 'crash')
{
	my $name = "Prepared A, $how";
	$node->safe_psql('postgres', 'DELETE FROM billing.partition_fences');
	$node->safe_psql('postgres', qq{
		BEGIN;
		UPDATE billing.tenants SET name = '$name' WHERE tenant_id = 'prep_a';
		PREPARE TRANSACTION 'prep_writer';});
	$node->safe_psql('postgres', q{
		BEGIN;
		SELECT count(*) FROM billing.tenants;
		PREPARE TRANSACTION 'prep_reader';});
	if ($how eq 'restart')
	{
		$node->restart;
	}
	else
	{
		# (no checkpoint since they prepared: they are only in the WAL)
		opendir(my $dh, $node->data_dir . '/pg_twophase') or die "pg_twophase: $!";
		is(scalar(grep { !/^\./ } readdir($dh)), 0, 'crash: the prepared transactions have no state files yet');
		closedir($dh);
		$node->stop('immediate');
		$node->start;
	}
	is($node->safe_psql('postgres', 'SELECT string_agg(gid, \',\' ORDER BY gid) FROM pg_prepared_xacts'),
		'prep_reader,prep_writer', "$how: both prepared transactions were recovered");

	# the mover fences the tenant's partition, then waits
	$node->safe_psql('postgres', q{
		INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
		VALUES (64, billing.tenant_partition('prep_a', 64), 'moving', 'out', 1, 's9')});
	my ($rc, $out, $err) = $node->psql('postgres', q{
		SET lock_timeout = '1s';
		SELECT billing.partition_fence_wait();});
	isnt($rc, 0, "$how: the move waits for the recovered prepared transaction that wrote the tenant's row");
	like($err, qr/lock timeout/, "$how: until its lock_timeout");

	$node->safe_psql('postgres', q{COMMIT PREPARED 'prep_writer'});
	is($node->safe_psql('postgres', q{SET lock_timeout = '5s'; SELECT billing.partition_fence_wait()}), '0',
		"$how: once it is committed the move goes on; the prepared transaction that wrote nothing is not waited for");
	is($node->safe_psql('postgres', q{SELECT name FROM billing.tenants WHERE tenant_id = 'prep_a'}),
		$name, "$how: and the move sees its row");
	($rc, $out, $err) = $node->psql('postgres', q{UPDATE billing.tenants SET name = 'late' WHERE tenant_id = 'prep_a'});
	like($err, qr/is being moved to another shard/, "$how: a write after the fence is refused");

	$node->safe_psql('postgres', q{ROLLBACK PREPARED 'prep_reader'});
}
# (the crash's start is reconciled, so that the next one is a start of its own)
$node->safe_psql('postgres', 'DELETE FROM billing.partition_fences');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET qes_billing.worker_paused');
$node->reload;
ok(defined wait_for(sub {
	$node->safe_psql('postgres', q{SELECT count(*) FROM billing.audit_log
		WHERE action = 'worker.reclaimed' AND details ? 'unclean_start'}) eq '1' }, 30),
	'the worker reconciled the crash');
$node->safe_psql('postgres', 'ALTER SYSTEM SET qes_billing.worker_paused = on');
$node->reload;

# A crash while the partition is fenced, with one of its tenant's Stripe
# requests in flight and one pending: the worker's reclaim at start-up
# finishes work begun before the fence, so it runs exempt from it (puts the
# one back in the queue, dates the other as possibly sent) instead of
# failing on every tick and stopping the worker for every tenant.
$node->safe_psql('postgres', 'DELETE FROM billing.partition_fences');
my $in_flight = $node->safe_psql('postgres', q{
	INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, state, attempts, claimed_at)
	VALUES ('prep_a', 'test.fenced', 'POST', '/v1/customers', 'in_flight', 1, now()) RETURNING request_id});
my $pending = $node->safe_psql('postgres', q{
	INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, next_attempt_at)
	VALUES ('prep_a', 'test.fenced', 'POST', '/v1/customers', now() + interval '1 day') RETURNING request_id});
$node->safe_psql('postgres', q{
	INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
	VALUES (64, billing.tenant_partition('prep_a', 64), 'moving', 'out', 2, 's9')});
$node->safe_psql('postgres', 'ALTER SYSTEM RESET qes_billing.worker_paused');
$node->stop('immediate');
$node->start;
ok(defined wait_for(sub {
	my ($r, $o) = $node->psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $in_flight");
	$r == 0 && $o eq 'pending' }, 30), 'fenced, after a crash: the request left in flight is back in the queue');
is($node->safe_psql('postgres', "SELECT first_sent_at IS NOT NULL FROM billing.stripe_requests WHERE request_id = $pending"),
	't', 'and the pending one is dated as possibly sent');
is($node->safe_psql('postgres', 'SELECT extension_present AND last_error IS NULL FROM billing.worker_state()'), 't',
	'the worker runs, without an error');
$node->safe_psql('postgres', 'DELETE FROM billing.partition_fences');
amcheck_all($node);
$node->stop;
done_testing();
