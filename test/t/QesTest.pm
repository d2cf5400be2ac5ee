# Helpers shared by the qes_billing TAP tests.
package QesTest;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use Exporter 'import';
use HTTP::Tiny;
use JSON::PP;

our @EXPORT = qw(qes_node worker_state wait_for worker_pid amcheck_all amcheck_failures billing_indexes
				 fake_stats fake_control);

# A started node with the library preloaded; extra postgresql.conf lines
# may be given, and allows_streaming => 1 for a primary with standbys.
sub qes_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(allows_streaming => $opts{allows_streaming} // 0);
	$node->append_conf('postgresql.conf', join("\n",
		"shared_preload_libraries = 'qes_billing'",
		"qes_billing.database = 'postgres'",
		"restart_after_crash = on",
		"qes_billing.worker_naptime = '" . ($opts{naptime} // '200ms') . "'",
		@{ $opts{conf} // [] }) . "\n");
	$node->start unless $opts{no_start};
	return $node;
}

sub worker_state
{
	my ($node) = @_;
	my $row = $node->safe_psql('postgres',
		"SELECT pid, loops, wake_requests, wakes_served, naptime_ms, reclaimed, extension_present
		   FROM billing.worker_state()");
	my @f = split /\|/, $row;
	return { pid => $f[0], loops => $f[1], wake_requests => $f[2], wakes_served => $f[3],
			 naptime_ms => $f[4], reclaimed => $f[5], extension_present => $f[6] };
}

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'qes_billing worker'");
}

# What the fake Stripe (test/python/fake_stripe.py) listening on $port has
# seen: {creates => {...}, requests => [[method, path, key, status, time]], ...}
sub fake_stats
{
	my ($port) = @_;
	my $r = HTTP::Tiny->new->get("http://127.0.0.1:$port/_fake/stats");
	die "fake Stripe: $r->{status}" unless $r->{success};
	return decode_json($r->{content});
}

# POST a control request to the fake Stripe: fake_control($port, 'delay', { after_ms => 8000 })
sub fake_control
{
	my ($port, $path, $body) = @_;
	my $r = HTTP::Tiny->new->post("http://127.0.0.1:$port/_fake/$path",
		{ content => encode_json($body), headers => { 'Content-Type' => 'application/json' } });
	die "fake Stripe: $r->{status}" unless $r->{success};
	return decode_json($r->{content});
}

# Poll a Perl condition for up to $timeout seconds; returns the seconds it
# took, or undef on time-out.
sub wait_for
{
	my ($cond, $timeout) = @_;
	my $start = time;
	while (time - $start < ($timeout // 30))
	{
		return time - $start if $cond->();
		usleep(20_000);
	}
	return undef;
}

# The btree indexes of the schemas billing and api, as "oid|name|checkable"
# rows; checkable is false for an index that is not valid or not ready (a
# CREATE INDEX CONCURRENTLY that failed or is still running), which amcheck
# cannot be asked about.
sub billing_indexes
{
	my ($node, $db) = @_;
	my $rows = $node->safe_psql($db // 'postgres', q{
		SELECT c.oid, n.nspname || '.' || c.relname, i.indisvalid AND i.indisready
		  FROM pg_index i
		  JOIN pg_class c ON c.oid = i.indexrelid
		  JOIN pg_namespace n ON n.oid = c.relnamespace
		  JOIN pg_am am ON am.oid = c.relam
		 WHERE n.nspname IN ('billing', 'api') AND am.amname = 'btree' AND c.relkind = 'i'
		 ORDER BY 2});
	return map { [ split /\|/ ] } grep { $_ ne '' } split /\n/, $rows;
}

# amcheck every billing index of one node and database:
# bt_index_check(index, heapallindexed => true), so an index entry missing
# for a heap row (a direct write that skipped an index) or a broken page is
# found.  Returns (checked, skipped, [ "index: error", ... ]); an index that
# is not valid/ready is skipped with a note.  On a standby the amcheck
# extension must have been created on the primary (the helper creates it
# where it can write).
sub amcheck_failures
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	my $standby = $node->safe_psql($db, 'SELECT pg_is_in_recovery()') eq 't';
	$node->safe_psql($db, 'CREATE EXTENSION IF NOT EXISTS amcheck') unless $standby;
	my @failures;
	my ($checked, $skipped) = (0, 0);
	for my $idx (billing_indexes($node, $db))
	{
		my ($oid, $index, $checkable) = @$idx;
		if ($checkable ne 't')
		{
			note("amcheck " . $node->name . "/$db: skipping $index (not valid or not ready)");
			$skipped++;
			next;
		}
		my ($rc, $out, $err) = $node->psql($db, "SELECT bt_index_check($oid, true)");
		if ($rc != 0)
		{
			$err =~ s/\s+$//;
			push @failures, "$index: " . ($err ne '' ? $err : "psql exit code $rc");
		}
		$checked++;
	}
	return ($checked, $skipped, \@failures);
}

# amcheck_failures as one test, failing with every index's error (the end
# of every TAP script, on every node with the extension).  An optional
# label names the moment in the test name.  Returns the number of indexes
# checked.
sub amcheck_all
{
	my ($node, $db, $label) = @_;
	$db //= 'postgres';
	my $name = $node->name . "/$db" . (defined $label ? " ($label)" : '');
	my ($checked, $skipped, $failures) = amcheck_failures($node, $db);
	ok(@$failures == 0 && $checked > 0,
		"amcheck $name: $checked billing indexes with heapallindexed"
		. ($skipped ? ", $skipped not valid/ready skipped" : ''));
	diag("amcheck $name: $_") for @$failures;
	diag("amcheck $name: no billing index found (is the extension created in $db?)") if $checked == 0;
	return $checked;
}

1;
