# The server crashes while Stripe requests are in flight.  Each outbox row
# is claimed and committed before it is sent, and keeps its Idempotency-Key,
# so after crash recovery the rows left in flight are sent again with the
# same key: the (stateful, fake) Stripe replays its first answer, and every
# logical request creates exactly one object -- none lost, none doubled.
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
# (read in a transaction that commits synchronously: the claims it sees are
# flushed with its commit, whereas a claim's own commit does not wait)
my $in_flight = $node->safe_psql('postgres', q{
	BEGIN;
	SELECT txid_current() \g /dev/null
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
fake_control($fake_port, 'delay', { after_ms => 8000 });	# carried out at once, answered 8 s later
# The WAL writer's round may write the claim out before the crash (then it
# survives, as any claim did before): a request whose claim is still in
# the WAL buffers just before the crash is what this part needs, so it
# takes up to three requests to get one.
my ($lost, $unwritten);
for my $try (1 .. 3)
{
	$lost = $node->safe_psql('postgres', qq{
		SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
		                              jsonb_build_object('name', 'Lost claim', 'metadata', jsonb_build_object('n', 'lost$try')))});
	ok(defined wait_for(sub { (fake_stats($fake_port)->{creates}{customer} // 0) == $n + $try }, 30),
		"request $try: Stripe carried it out (its answer held back)");
	is($node->safe_psql('postgres', "SELECT state || '/' || attempts FROM billing.stripe_requests WHERE request_id = $lost"),
		'in_flight/1', "request $try: the row is claimed and in flight");
	# nothing but the claim was written since the last synchronous commit
	$unwritten = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn() < pg_current_wal_insert_lsn()');
	last if $unwritten eq 't';
	note("request $try: its claim was written out before the crash; another one");
	ok(defined wait_for(sub {
		$node->safe_psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $lost") eq 'succeeded' }, 30),
		"request $try is answered and recorded");
}
is($unwritten, 't', 'a claim is still in the WAL buffers at the crash');
$node->stop('immediate');
fake_control($fake_port, 'delay', { after_ms => 0 });
$node->start;
ok(defined wait_for(sub {
	my ($rc, $o) = $node->psql('postgres', "SELECT state FROM billing.stripe_requests WHERE request_id = $lost");
	$rc == 0 && $o eq 'succeeded' }, 60), 'after the crash the request is sent again and succeeds');
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

unlike(slurp_file($node->logfile), qr/sk_test_tap_outbox_crash/, 'the secret key never reaches the log');
is($node->safe_psql('postgres', "SELECT count(*) FROM billing.stripe_requests WHERE params::text LIKE '%sk_test%' OR response::text LIKE '%sk_test%'"),
	'0', 'nor any stored row');

amcheck_all($node);
$node->stop;
$fake->kill_kill;
done_testing();
