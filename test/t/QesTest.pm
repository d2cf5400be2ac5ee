# Helpers shared by the qes_billing TAP tests.
package QesTest;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use Exporter 'import';

our @EXPORT = qw(qes_node worker_state wait_for worker_pid);

# A started node with the library preloaded; extra postgresql.conf lines
# may be given.
sub qes_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
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

1;
