# The server crashes while the worker applies webhook events.  Each event
# is applied in the same transaction as its state change, so after crash
# recovery and restart every event is applied exactly once: none lost,
# none applied twice (attempts = 1 for all), every invoice mirrored once.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use QesTest;

my $node = qes_node('webhook_crash');
$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
my $tenants = 20;
my $events = 4000;
$node->safe_psql('postgres', qq{
	SELECT count(billing.upsert_tenant('wc' || i, 'WC ' || i, 'wc' || i || '\@t.example')) FROM generate_series(1, $tenants) i;
	UPDATE billing.tenants SET stripe_customer_id = 'cus_' || tenant_id WHERE tenant_id LIKE 'wc%';
});

# a burst of events, committed at once: the worker starts on them at commit
$node->safe_psql('postgres', qq{
	INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload)
	SELECT 'evt_crash_' || n, 'invoice.paid', false, to_timestamp(1700000000 + n),
	       json_build_object('id', 'evt_crash_' || n, 'object', 'event', 'type', 'invoice.paid',
	                         'created', 1700000000 + n, 'livemode', false,
	                         'data', json_build_object('object', json_build_object(
	                            'id', 'in_crash_' || n, 'object', 'invoice', 'customer', 'cus_wc' || (1 + n % $tenants),
	                            'status', 'paid', 'amount_due', 2900, 'amount_paid', 2900, 'amount_remaining', 0,
	                            'currency', 'usd', 'created', 1700000000 + n,
	                            'period_start', 1700000000, 'period_end', 1702592000)))
	  FROM generate_series(1, $events) n;
});

# crash in the middle of it
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE state = 'applied'") > 0 }, 30),
	'the worker is applying events');
my $applied_before = $node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE state = 'applied'");
my $worker = $node->safe_psql('postgres', 'SELECT pid FROM billing.worker_state()');
note("killing the worker ($worker) after $applied_before of $events events");
cmp_ok($applied_before, '<', $events, 'the crash comes before the worker is done');
kill 'KILL', $worker;
ok(defined wait_for(sub { slurp_file($node->logfile) =~ /all server processes terminated; reinitializing/ }, 30),
	'the server went through crash recovery');

ok(defined wait_for(sub {
	my ($rc, $out) = $node->psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE state = 'received'");
	$rc == 0 && $out eq '0' }, 120), 'after restart the worker applies the rest');

is($node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE state = 'applied' AND attempts = 1"),
	$events, 'every event applied exactly once');
is($node->safe_psql('postgres', "SELECT count(*), count(DISTINCT stripe_invoice_id) FROM billing.invoices WHERE tenant_id LIKE 'wc%'"),
	"$events|$events", 'every invoice mirrored once');

# and a clean restart with events waiting
$node->safe_psql('postgres', qq{
	UPDATE billing.webhook_events SET state = 'received', attempts = 0, next_attempt_at = now() + interval '2 seconds'
	 WHERE stripe_event_id LIKE 'evt_crash_%' AND stripe_created > to_timestamp(1700000000 + $events - 500);
});
$node->restart;
ok(defined wait_for(sub {
	$node->safe_psql('postgres', "SELECT count(*) FROM billing.webhook_events WHERE state = 'received'") eq '0' }, 60),
	'events waiting across a restart are applied');
is($node->safe_psql('postgres', "SELECT count(*) FROM billing.invoices WHERE tenant_id LIKE 'wc%'"),
	$events, 'replayed events change nothing: still one invoice each');

amcheck_all($node);
$node->stop;
done_testing();
