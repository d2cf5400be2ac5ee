# The seed's environment variables: read by the server, keys of the wrong
# mode refused with an error naming the variable, values never shown or
# logged.  And loading without shared_preload_libraries.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use QesTest;

my $live_key = 'sk_live_51TopSecretValueThatMustNeverShow';
my $test_key = 'sk_test_51AnotherSecretThatMustNeverShow';

# development with a live key in the test variable
{
	local $ENV{QES_ENVIRONMENT} = 'development';
	local $ENV{STRIPE_TEST_SECRET_KEY} = $live_key;
	local $ENV{STRIPE_TEST_PUBLISHABLE_KEY} = 'pk_test_51Public';
	local $ENV{STRIPE_TEST_WEBHOOK_SECRET} = 'whsec_abc';
	local $ENV{QES_BASE_URL} = 'https://sign.example.com';
	my $node = qes_node('env_dev');
	$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');

	my ($rc, $out, $err) = $node->psql('postgres', 'SELECT billing.require_stripe_keys()');
	isnt($rc, 0, 'a live key in development is refused');
	like($err, qr/STRIPE_TEST_SECRET_KEY holds a live-mode Stripe secret key, but QES_ENVIRONMENT is "development"/,
		'the error names the variable and the environment');
	unlike($err, qr/TopSecret/, 'the error does not show the key');
	is($node->safe_psql('postgres', "SELECT api.health() -> 'stripe' ->> 'configured'"), 'false',
		'health reports Stripe as not configured');
	is($node->safe_psql('postgres', "SELECT api.config() ->> 'webhook_url'"),
		'https://sign.example.com/api/v1/billing/webhooks/stripe', 'QES_BASE_URL gives the webhook URL');
	is($node->safe_psql('postgres', "SELECT api.config() ->> 'publishable_key'"), 'pk_test_51Public',
		'the publishable key comes from the environment');

	# a setting overrides the environment variable.  (PostgreSQL logs the new
	# value of a setting changed in the configuration at reload, and the text
	# of logged statements: set key settings at start-up, with statement
	# logging off, or better use the environment -- see README.md.)
	$node->safe_psql('postgres', "SET log_statement = 'none';\nALTER SYSTEM SET qes_billing.stripe_test_secret_key = '$test_key'");
	$node->restart;
	is($node->safe_psql('postgres', 'SELECT billing.stripe_key_problem($$secret$$) IS NULL'), 't',
		'qes_billing.stripe_test_secret_key overrides STRIPE_TEST_SECRET_KEY');
	is($node->safe_psql('postgres', 'SHOW qes_billing.stripe_test_secret_key'), '(set)', 'SHOW masks the key');
	is($node->safe_psql('postgres', "SELECT count(*) FROM pg_settings WHERE setting LIKE '%SecretThat%'"), '0',
		'no view shows the key');
	amcheck_all($node);
	$node->stop;
	my $log = slurp_file($node->logfile);
	unlike($log, qr/TopSecret|AnotherSecret/, 'the server log never shows a key');
}

# production with a test key in the live variable
{
	local $ENV{QES_ENVIRONMENT} = 'production';
	local $ENV{STRIPE_LIVE_SECRET_KEY} = $test_key;
	my $node = qes_node('env_prod');
	$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
	is($node->safe_psql('postgres', 'SELECT billing.stripe_mode()'), 'live', 'production uses live mode');
	my ($rc, $out, $err) = $node->psql('postgres', 'SELECT billing.require_stripe_keys()');
	like($err, qr/STRIPE_LIVE_SECRET_KEY holds a test-mode Stripe secret key, but QES_ENVIRONMENT is "production"/,
		'a test key in production is refused, naming the variable');
	like($err, qr/HINT:.*starts with sk_live_/, 'with a hint');
	($rc, $out, $err) = $node->psql('postgres', 'SELECT billing.set_clock($$1 day$$)');
	like($err, qr/cannot be moved in production/, 'the clock stays put in production');
	amcheck_all($node);
	$node->stop;
}

# an invalid QES_ENVIRONMENT
{
	local $ENV{QES_ENVIRONMENT} = 'prod';
	my $node = qes_node('env_bad');
	$node->safe_psql('postgres', 'CREATE EXTENSION qes_billing');
	my ($rc, $out, $err) = $node->psql('postgres', 'SELECT billing.environment()');
	like($err, qr/QES_ENVIRONMENT has an invalid value: "prod".*\n.*HINT:  Use development, staging or production/,
		'an invalid QES_ENVIRONMENT is a clear error');
	amcheck_all($node);
	$node->stop;
}

# without shared_preload_libraries: a clear error, not a crash
{
	my $node = PostgreSQL::Test::Cluster->new('no_preload');
	$node->init;
	$node->start;
	my ($rc, $out, $err) = $node->psql('postgres', 'CREATE EXTENSION qes_billing');
	isnt($rc, 0, 'CREATE EXTENSION fails without preloading');
	like($err, qr/qes_billing must be loaded via shared_preload_libraries/, 'with a clear message');
	like($err, qr/HINT:  Add qes_billing to shared_preload_libraries/, 'and a hint');
	is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server is still up');
	# the one cluster without amcheck_all: the extension could not be
	# created, so it has no billing index and no billing row
	is($node->safe_psql('postgres', "SELECT count(*) FROM pg_namespace WHERE nspname IN ('billing', 'api')"),
		'0', 'nothing of the extension exists');
	$node->stop;
}

done_testing();
