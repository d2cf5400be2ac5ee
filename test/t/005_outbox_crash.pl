# The server crashes while Stripe requests are in flight.  Each outbox row
# is claimed and committed before it is sent, and keeps its Idempotency-Key,
# so after crash recovery the rows left in flight are sent again with the
# same key: the (stateful, fake) Stripe replays its first answer, and every
# logical request creates exactly one object -- none lost, none doubled.
# After an outage longer than Stripe keeps a key, a row that went out is not
# sent again but looked up.
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

# the fake Stripe, answering every request after 150 ms
my $fake_port = PostgreSQL::Test::Cluster::get_free_port();
my $fake_py = abs_path(dirname(__FILE__) . '/../python/fake_stripe.py');
my ($out, $err) = ('', '');
my $fake = IPC::Run::start(['python3', $fake_py, '--port', $fake_port, '--delay-ms', '150'],
	'>', \$out, '2>', \$err);
ok(defined wait_for(sub { $fake->pump_nb; $out =~ /http:/ }, 20), 'the fake Stripe is listening')
	or diag($err);

my $node = qes_node('outbox_crash', conf => [
	"qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port'",
	"qes_billing.stripe_test_secret_key = 'sk_test_tap_outbox_crash'",
	"qes_billing.max_concurrent_requests = 8",
	"qes_billing.request_timeout = '5s'",
	"qes_billing.retry_base_delay = '50ms'",
	"qes_billing.retry_max_delay = '500ms'",
	# WAL of an asynchronous commit (a claim's) stays in the WAL buffers
	# until something writes it out: a later synchronous commit, or the WAL
	# writer at its next round (at most every 10 s), not the background
	# writer, a checkpoint or autovacuum here (the lost claim below)
	"wal_writer_delay = '10s'",
	"wal_writer_flush_after = '1GB'",
	"bgwriter_lru_maxpages = 0",
	"checkpoint_timeout = '1h'",
	"autovacuum = off"]);
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
my $n = 300;
$node->safe_psql('postgres', qq{
	SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                                    jsonb_build_object('name', 'Crash ' || i, 'email', 'c' || i || '\@t.example',
	                                                       'metadata', jsonb_build_object('n', i))))
	  FROM generate_series(1, $n) i;
});

ok(defined wait_for(sub {
	$node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE state = 'succeeded') > 20 AND count(*) FILTER (WHERE state = 'in_flight') > 0
		   FROM billing.stripe_requests") eq 't' }, 60),
	'requests are being sent');
# (read in a transaction that writes WAL and commits synchronously, so its
# commit flushes the claims it sees, whereas a claim's own commit does not
# wait; a transaction that only took an xid writes no WAL but its commit
# record, and PostgreSQL does not wait for that one)
my $in_flight = $node->safe_psql('postgres', q{
	BEGIN;
	SELECT pg_logical_emit_message(true, 'qes_tap', 'flush') \g /dev/null
	SELECT string_agg(request_id::text, ',') FROM billing.stripe_requests WHERE state = 'in_flight';
	COMMIT;});
my $done_before = $node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'");
note("crash with requests $in_flight in flight, $done_before of $n done");
$node->stop('immediate');
$node->start;

ok(defined wait_for(sub {
	my ($rc, $o) = $node->psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE state <> 'succeeded'");
	$rc == 0 && $o eq '0' }, 120), 'after the restart every request succeeds');
like(slurp_file($node->logfile), qr/qes_billing worker reclaimed \d+ queue rows left in flight/,
	'the rows left in flight were reclaimed at start-up');

my $stats = fake_stats($fake_port);
is($stats->{creates}{customer}, $n, "exactly $n customers exist in Stripe: none lost, none doubled");

# the requests in flight at the crash were sent again with their own key
my %sent;
$sent{$_->[2]}++ for grep { $_->[1] eq '/v1/customers' } @{ $stats->{requests} };
my @resent = grep { $sent{$_} > 1 } keys %sent;
cmp_ok(scalar(@resent), '>', 0, scalar(@resent) . ' keys were sent twice (once before the crash, once after)');
my $keys = $node->safe_psql('postgres', "SELECT string_agg(idempotency_key, ',') FROM billing.stripe_requests");
my %ours = map { $_ => 1 } split /,/, $keys;
is(scalar(grep { !$ours{$_} } keys %sent), 0, 'every key sent is the key of an outbox row');
is(scalar(keys %sent), $n, 'one key per logical request');
is($node->safe_psql('postgres', "SELECT count(DISTINCT response->>'id') FROM billing.stripe_requests"),
	$n, 'each row recorded the one customer Stripe created for it');
# a row claimed just before the crash may not have reached Stripe: it is
# sent once, after the restart, yet shows two attempts
my @in_flight = split /,/, $in_flight;
my $second = $node->safe_psql('postgres', "SELECT string_agg(request_id::text, ',') FROM billing.stripe_requests WHERE attempts > 1");
is_deeply([sort { $a <=> $b } split /,/, $second], [sort { $a <=> $b } @in_flight],
	'exactly the rows in flight at the crash were sent again');
cmp_ok(scalar(@resent), '<=', scalar(@in_flight), 'and only they reached Stripe twice');

# A claim lost in a crash.  A transaction that only claims commits without
# waiting for its WAL flush (src/outbox.c): Stripe carries the request out,
# the server crashes before the answer is recorded and before anything
# wrote the claim out of the WAL buffers, so after recovery the row is
# pending again as if never claimed.  It is sent again with its key,
# Stripe replays its first answer, and there is still one customer.
# The server crashes as soon as Stripe has the request.  The claim may be
# written out all the same (with a later page of WAL, by the WAL writer):
# then the row was in flight at the crash, is sent again as in the part
# above and shows a second attempt, and the part goes again with another
# request, up to three times.
#
# Only a claim of the worker's own can be lost so: the direct lane's claim
# is the queuing transaction's, and durable (its part is at the end).  The
# lane is off for these parts.
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET qes_billing.direct_lane = off;
	SELECT pg_reload_conf();});
ok(defined wait_for(sub {
	$node->safe_psql('postgres', 'SELECT NOT open FROM billing.outbox_lane_state()') eq 't' }, 30),
	'the direct lane is closed');
my $lost;
for my $try (1 .. 3)
{
	fake_control($fake_port, 'delay', { after_ms => 8000 });	# carried out at once, answered 8 s later
	$lost = $node->safe_psql('postgres', qq{
		SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
		                              jsonb_build_object('name', 'Lost claim', 'metadata', jsonb_build_object('n', 'lost$try')))});
	ok(defined wait_for(sub { (fake_stats($fake_port)->{creates}{customer} // 0) == $n + $try }, 30),
		"request $try: Stripe carried it out (its answer held back)");
	$node->stop('immediate');
	fake_control($fake_port, 'delay', { after_ms => 0 });
	$node->start;
	ok(defined wait_for(sub {
		my ($rc, $o) = $node->psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $lost");
		$rc == 0 && $o eq 'succeeded' }, 60), "request $try: after the crash it is sent again and succeeds");
	last if $node->safe_psql('postgres', "SELECT attempts FROM billing.stripe_requests WHERE request_id = $lost") eq '1';
	note("request $try: its claim was written out before the crash; another one");
}
is($node->safe_psql('postgres', "SELECT attempts FROM billing.stripe_requests WHERE request_id = $lost"),
	'1', 'the claim did not survive the crash: the resend is the first attempt the row counts');
$stats = fake_stats($fake_port);
my $lost_n = $stats->{creates}{customer} - $n;
is($node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE params->>'name' = 'Lost claim'"),
	$lost_n, 'Stripe replayed its first answer: one customer for each request');
my $lost_key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = $lost");
is(scalar(grep { $_->[1] eq '/v1/customers' && $_->[2] eq $lost_key } @{ $stats->{requests} }), 2,
	'the key went out twice, before and after the crash');
is($node->safe_psql('postgres', "SELECT response->>'name' FROM billing.stripe_requests WHERE request_id = $lost"),
	'Lost claim', 'and the row recorded the customer Stripe created the first time');

# A long outage.  Stripe keeps an Idempotency-Key's result for 24 hours:
# a request that went out before the crash and is resent after that would
# act twice.  A tenant's customer is created in Stripe, the server crashes
# before the answer is recorded, and comes back "a day later" (here the
# window, qes_billing.idempotency_window, is cut to 1 s, past which the row
# is kept waiting).  The row is not sent again: it fails as expired, the
# customer is looked up by the tenant's email and metadata, found, and
# linked -- one customer, its key sent once.
$node->safe_psql('postgres', "SELECT billing.upsert_tenant('outage', 'Outage Ltd', 'billing\@outage.example')");
fake_control($fake_port, 'delay', { after_ms => 8000 });
my $cus_req = $node->safe_psql('postgres', q{
	SELECT billing.customer_request(t) FROM billing.tenants t WHERE tenant_id = 'outage'});
my $creates = $stats->{creates}{customer};
ok(defined wait_for(sub { (fake_stats($fake_port)->{creates}{customer} // 0) == $creates + 1 }, 30),
	'long outage: Stripe created the customer (its answer held back)');
# (a synchronous commit that wrote WAL flushes the claim with it: the row is
# durably in flight)
is($node->safe_psql('postgres', qq{
	BEGIN;
	SELECT pg_logical_emit_message(true, 'qes_tap', 'flush') \\g /dev/null
	SELECT state || '/' || attempts FROM billing.stripe_requests WHERE request_id = $cus_req;
	COMMIT;}), 'in_flight/1', 'long outage: the request is in flight at the crash');
$node->stop('immediate');
fake_control($fake_port, 'delay', { after_ms => 0 });
$node->append_conf('postgresql.conf', "qes_billing.idempotency_window = '1s'");
sleep(2);
$node->start;
ok(defined wait_for(sub {
	my ($rc, $o) = $node->psql('postgres', "SELECT stripe_customer_id IS NOT NULL FROM billing.tenants WHERE tenant_id = 'outage'");
	$rc == 0 && $o eq 't' }, 60), 'long outage: the tenant is linked to a customer');
is($node->safe_psql('postgres', "SELECT state || '/' || (error ->> 'category') FROM billing.stripe_requests WHERE request_id = $cus_req"),
	'failed/expired', 'the request was not sent again: failed as expired');
$stats = fake_stats($fake_port);
my $cus_key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = $cus_req");
is(scalar(grep { $_->[1] eq '/v1/customers' && $_->[2] eq $cus_key } @{ $stats->{requests} }), 1,
	'its key went out once, before the crash');
is($stats->{creates}{customer}, $creates + 1, 'Stripe has one customer for the tenant');
is($node->safe_psql('postgres', q{
	SELECT t.stripe_customer_id = (SELECT r.response -> 'data' -> 0 ->> 'id' FROM billing.stripe_requests r
	                                WHERE r.kind = 'resolve.customer.list' AND r.state = 'succeeded')
	  FROM billing.tenants t WHERE t.tenant_id = 'outage'}), 't', 'the one the lookup found');
is($node->safe_psql('postgres', qq{
	SELECT string_agg(details ->> 'found', ',') FROM billing.audit_log
	 WHERE action = 'stripe.request_resolved' AND (details ->> 'request_id')::bigint = $cus_req}), 'true',
	'the resolution is audited');

# A claim lost in a crash, then a long outage.  The lost claim leaves its
# row pending as if never sent, though Stripe carried it out, and the
# server comes back past the window.  It did not start from a clean
# shutdown, so the reclaim dates every due row as possibly sent from when
# it fell due: the row is not sent blind after Stripe has forgotten its
# key; it fails as expired and the customer is looked up and linked.
# The server crashes as soon as Stripe has the request.  If the claim was
# written out all the same (the reclaim then finds the row in flight: the
# long outage above), the part goes again with another tenant, up to three
# times.
my ($lo_req, $lo_tenant, $lo_reclaim);
for my $try (1 .. 3)
{
	$lo_tenant = "lost_outage_$try";
	$node->safe_psql('postgres', "SELECT billing.upsert_tenant('$lo_tenant', 'Lost Outage $try', 'billing\@lost$try.example')");
	my $audited = $node->safe_psql('postgres', "SELECT coalesce(max(audit_id), 0) FROM billing.audit_log");
	$creates = fake_stats($fake_port)->{creates}{customer};
	fake_control($fake_port, 'delay', { after_ms => 8000 });
	$lo_req = $node->safe_psql('postgres', qq{
		SELECT billing.customer_request(t) FROM billing.tenants t WHERE tenant_id = '$lo_tenant'});
	ok(defined wait_for(sub { (fake_stats($fake_port)->{creates}{customer} // 0) == $creates + 1 }, 30),
		"lost claim, long outage, try $try: Stripe created the customer (its answer held back)");
	$node->stop('immediate');
	fake_control($fake_port, 'delay', { after_ms => 0 });
	sleep(2);	# (the window is still 1 s)
	$node->start;
	ok(defined wait_for(sub {
		my ($rc, $o) = $node->psql('postgres', "SELECT stripe_customer_id IS NOT NULL FROM billing.tenants WHERE tenant_id = '$lo_tenant'");
		$rc == 0 && $o eq 't' }, 60), "lost claim, long outage, try $try: the tenant is linked to a customer");
	$lo_reclaim = $node->safe_psql('postgres', qq{
		SELECT (details ->> 'stripe_requests') || '/' || (details ->> 'possibly_sent') FROM billing.audit_log
		 WHERE action = 'worker.reclaimed' AND audit_id > $audited ORDER BY audit_id LIMIT 1});
	last if $lo_reclaim =~ m{^0/};
	note("lost claim, long outage, try $try: the claim was written out before the crash (reclaimed $lo_reclaim); again");
}
like($lo_reclaim, qr{^0/[1-9]}, 'lost claim, long outage: the claim was lost (nothing in flight), and the reclaim dated the row');
is($node->safe_psql('postgres', "SELECT state || '/' || (error ->> 'category') FROM billing.stripe_requests WHERE request_id = $lo_req"),
	'failed/expired', 'lost claim, long outage: the request was not sent again, failed as expired');
$stats = fake_stats($fake_port);
my $lo_key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = $lo_req");
is(scalar(grep { $_->[1] eq '/v1/customers' && $_->[2] eq $lo_key } @{ $stats->{requests} }), 1,
	'lost claim, long outage: its key went out once, before the crash');
is($stats->{creates}{customer}, $creates + 1, 'lost claim, long outage: Stripe has one customer for the tenant');
is($node->safe_psql('postgres', "SELECT first_sent_at >= created_at FROM billing.stripe_requests WHERE request_id = $lo_req"),
	't', 'lost claim, long outage: dated no earlier than its creation (the last commit recovery replayed)');
ok(!-e $node->data_dir . '/qes_billing.unclean_start', 'lost claim, long outage: the mark of the start is gone once the reclaim committed');

# A crash, then a clean restart before the worker reconciled (paused, as
# for an upgrade): the start is still not clean when it does.  A request
# made days before the crash is dated from the last checkpoint before the
# crash (after which commits may be lost), not from its creation and not
# later than the crash; one made after the start is not dated.
$node->safe_psql('postgres', 'ALTER SYSTEM SET qes_billing.worker_paused = on');
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
my $old_req = $node->safe_psql('postgres', q{
	SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', '{"name": "Old backlog"}')});
$node->safe_psql('postgres', qq{
	UPDATE billing.stripe_requests SET created_at = now() - interval '2 days', next_attempt_at = now() + interval '1 hour'
	 WHERE request_id = $old_req});
$node->safe_psql('postgres', 'CHECKPOINT');
my $before_crash = $node->safe_psql('postgres', 'SELECT now()');
$node->stop('immediate');
$node->start;
ok(-e $node->data_dir . '/qes_billing.unclean_start', 'paused after a crash: the data directory keeps the mark');
my $new_req = $node->safe_psql('postgres', q{
	SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', '{"name": "After the start"}')});
sleep(2);	# (older than the 1 s window when it is claimed: dated, it would fail as expired)
$node->restart;
ok(-e $node->data_dir . '/qes_billing.unclean_start', 'and a clean restart keeps it');
my $audited_before = $node->safe_psql('postgres', "SELECT max(audit_id) FROM billing.audit_log");
$node->safe_psql('postgres', 'ALTER SYSTEM RESET qes_billing.worker_paused; SELECT pg_reload_conf();');
ok(defined wait_for(sub {
	$node->safe_psql('postgres', qq{
		SELECT count(*) FROM billing.audit_log WHERE audit_id > $audited_before AND action = 'worker.reclaimed'
		   AND (details ->> 'unclean_start')::boolean}) eq '1' }, 30),
	'resumed: the reclaim still knows the start was not clean');
ok(defined wait_for(sub { !-e $node->data_dir . '/qes_billing.unclean_start' }, 30), 'and then forgets it');
is($node->safe_psql('postgres', qq{
	SELECT first_sent_at > created_at + interval '1 day' AND first_sent_at <= '$before_crash'
	  FROM billing.stripe_requests WHERE request_id = $old_req}), 't',
	'the old request is dated from the last checkpoint before the crash');
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT state IN ('succeeded', 'failed') FROM billing.stripe_requests WHERE request_id = $new_req") eq 't' }, 30),
	'the request made after the start is done');
is($node->safe_psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $new_req"), 'succeeded',
	'it was not dated (past the 1 s window it would have failed as expired): sent');

$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET qes_billing.direct_lane;
	SELECT pg_reload_conf();});

# A request whose connection was never made (Stripe unreachable: here a
# port nothing listens on) did not reach Stripe: the worker says "not sent",
# its key's time does not start, and past the window (still 1 s) it is sent
# once Stripe is back, not failed as expired.
my $closed = PostgreSQL::Test::Cluster::get_free_port();
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET qes_billing.stripe_api_base = 'http://127.0.0.1:$closed';
	ALTER SYSTEM SET qes_billing.max_attempts = 100;
	SELECT pg_reload_conf();});
my $unreached = $node->safe_psql('postgres', q{
	SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                              jsonb_build_object('name', 'Unreachable', 'metadata', jsonb_build_object('n', 'unreachable')))});
ok(defined wait_for(sub {
	$node->safe_psql('postgres', qq{
		SELECT attempts >= 2 AND now() > created_at + interval '1.5 s'
		  FROM billing.stripe_requests WHERE request_id = $unreached}) eq 't' }, 30),
	'unreachable: attempted again and again, past the window');
# a clean restart (its shutdown checkpoint lost no claim) dates nothing
my $audited = $node->safe_psql('postgres', "SELECT max(audit_id) FROM billing.audit_log");
$node->restart;
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT pid IS NOT NULL AND extension_present FROM billing.worker_state()") eq 't' }, 30),
	'unreachable: the worker is back after a clean restart');
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM billing.audit_log WHERE audit_id > $audited AND action = 'worker.reclaimed'
	   AND (details ->> 'unclean_start')::boolean}), '0', 'unreachable: a clean restart is not taken for a crash');
is($node->safe_psql('postgres', qq{
	SELECT state || '/' || (first_sent_at IS NULL) || '/' || (error ->> 'message' LIKE 'not sent: %')
	  FROM billing.stripe_requests WHERE request_id = $unreached}), 'pending/true/true',
	'unreachable: not sent, so still pending, its key never used');
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET qes_billing.stripe_api_base = 'http://127.0.0.1:$fake_port';
	ALTER SYSTEM RESET qes_billing.max_attempts;
	SELECT pg_reload_conf();});
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $unreached") eq 'succeeded' }, 30),
	'unreachable: sent once Stripe is back, not failed as expired');
my $unreached_key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = $unreached");
is(scalar(grep { $_->[2] eq $unreached_key } @{ fake_stats($fake_port)->{requests} }), 1, 'unreachable: Stripe saw it once');

# A request of the direct lane (src/outbox_lane.c): claimed by the
# transaction that queued it, so its claim is as durable as the row.  Stripe
# carries it out, the server crashes before the answer comes: after
# recovery the row is in flight, reclaimed at start-up and sent again under
# its key (a second attempt), and Stripe replays its first answer.
ok(defined wait_for(sub {
	$node->safe_psql('postgres', 'SELECT open FROM billing.outbox_lane_state()') eq 't' }, 30),
	'direct lane: open again');
my $lane_sent = $node->safe_psql('postgres', 'SELECT sent FROM billing.outbox_lane_state()');
$creates = fake_stats($fake_port)->{creates}{customer};
fake_control($fake_port, 'delay', { after_ms => 8000 });
my $lane_req = $node->safe_psql('postgres', qq{
	SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
	                              jsonb_build_object('name', 'Lane crash', 'metadata', jsonb_build_object('n', 'lane')))});
ok(defined wait_for(sub { (fake_stats($fake_port)->{creates}{customer} // 0) == $creates + 1 }, 30),
	'direct lane: Stripe carried it out (its answer held back)');
is($node->safe_psql('postgres', 'SELECT sent FROM billing.outbox_lane_state()'), $lane_sent + 1,
	'direct lane: it went through the lane');
$node->stop('immediate');
fake_control($fake_port, 'delay', { after_ms => 0 });
$node->start;
ok(defined wait_for(sub {
	my ($rc, $o) = $node->psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $lane_req");
	$rc == 0 && $o eq 'succeeded' }, 60), 'direct lane: after the crash it is sent again and succeeds');
is($node->safe_psql('postgres', "SELECT attempts FROM billing.stripe_requests WHERE request_id = $lane_req"),
	'2', 'direct lane: the claim survived the crash (the row was in flight), the resend is its second attempt');
my $lane_key = $node->safe_psql('postgres', "SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = $lane_req");
$stats = fake_stats($fake_port);
is(scalar(grep { $_->[2] eq $lane_key } @{ $stats->{requests} }), 2, 'direct lane: its key went out twice');
is($stats->{creates}{customer}, $creates + 1, 'direct lane: Stripe has one customer for it');

unlike(slurp_file($node->logfile), qr/sk_test_tap_outbox_crash/, 'the secret key never reaches the log');
is($node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE params::text LIKE '%sk_test%' OR response::text LIKE '%sk_test%'"),
	'0', 'nor any stored row');

amcheck_all($node);
$node->stop;
$fake->kill_kill;
done_testing();
