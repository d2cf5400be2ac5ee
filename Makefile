# qes_billing -- PGXS build.  See README.md for the developer targets.

EXTENSION  = qes_billing
# The version is written once, as default_version in qes_billing.control;
# the C code (QES_VERSION), the install script's name, the Debian package
# (make deb) and META.json's check all take it from there.
EXTVERSION := $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" $(EXTENSION).control)
ifeq ($(EXTVERSION),)
$(error no default_version found in $(EXTENSION).control)
endif

MODULE_big = qes_billing
OBJS = \
	src/qes_billing.o \
	src/guc.o \
	src/shmem.o \
	src/worker.o \
	src/worker_xact.o \
	src/worker_http.o \
	src/outbox_lane.o \
	src/audit.o \
	src/config.o \
	src/catalog_cache.o \
	src/counters.o \
	src/fence.o \
	src/siphash.o \
	src/usage.o \
	src/usage_store.o \
	src/insert_once.o \
	src/features.o \
	src/webhook_signature.o \
	src/stripe_form.o \
	src/webhook_intake.o \
	src/json_scan.o \
	src/postgrest.o \
	src/guard.o \
	src/outbox.o \
	src/redact.o \
	src/notify.o

# the current version's install script, built from sql/install/*.sql;
# released versions' install and upgrade scripts are frozen files in sql/
# that are never edited (docs/operations.md, "Upgrades")
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = sql/$(EXTENSION)--0.1.sql sql/$(EXTENSION)--0.1--0.2.sql
SCRIPTS = src/qes_billing_setup src/qes_billing_audit src/qes_billing_audit_verify
# for operators, installed into $(docdir)/extension (docs/operations.md, "Monitoring")
DOCS = docs/monitoring/qes_billing_queries.yaml docs/monitoring/qes_billing_alerts.yml \
	docs/monitoring/qes_billing_router_queries.yaml
INSTALL_SQL = $(sort $(wildcard sql/install/*.sql))

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -Isrc -Wall -Wextra -Werror -Wno-unused-parameter \
	-Wno-missing-field-initializers -Wno-sign-compare \
	-DQES_VERSION='"$(EXTVERSION)"'
SHLIB_LINK = -lcurl -lcrypto

# pg_regress: explicit list, so the install script pieces under sql/install
# are never mistaken for tests.
REGRESS = create_extension catalog settings tenants audit api usage webhook outbox metrics operations fences redact features zz_amcheck
REGRESS_OPTS = --temp-instance=./tmp_check_regress \
	--temp-config=test/regress.conf --dbname=contrib_regression
ISOLATION = wake audit_chain usage outbox webhook_intake caches usage_side_effects meters partition_fence zz_amcheck
ISOLATION_OPTS = --temp-instance=./tmp_check_iso \
	--temp-config=test/regress.conf --load-extension=qes_billing \
	--inputdir=test/isolation --outputdir=test/isolation/output \
	--dbname=contrib_regression
TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl
PROVE_FLAGS = -I ./test/t

EXTRA_CLEAN = tmp_check_regress tmp_check_iso test/isolation/output \
	results regression.diffs regression.out

# The scale-out extensions (docs/scaleout.md): qes_billing_router for the
# router database and qes_billing_shard for each shard database, their
# install scripts assembled from sql/router/*.sql and sql/shard/*.sql; their
# versions are their control files' default_version.
ROUTER_VERSION := $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" qes_billing_router.control)
SHARD_VERSION := $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" qes_billing_shard.control)
DATA_built += qes_billing_router--$(ROUTER_VERSION).sql qes_billing_shard--$(SHARD_VERSION).sql
DATA += qes_billing_router.control qes_billing_shard.control
.DEFAULT_GOAL := all

qes_billing_router--$(ROUTER_VERSION).sql: $(sort $(wildcard sql/router/*.sql))
	cat $^ > $@

qes_billing_shard--$(SHARD_VERSION).sql: $(sort $(wildcard sql/shard/*.sql))
	cat $^ > $@

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object is rebuilt when a header changes (shared-memory layouts)
$(OBJS): $(wildcard src/*.h)
# ... and when the version changes (QES_VERSION)
$(OBJS): $(EXTENSION).control

$(EXTENSION)--$(EXTVERSION).sql: $(INSTALL_SQL)
	cat $^ > $@

# ---------------------------------------------------------------------------
# Developer targets (README.md).  Everything runs through test/tools so that
# a fresh Debian machine, root or not, behaves the same.
.PHONY: deps run stop test bench valgrind test-periods deb

deps:
	bash test/tools/deps.sh

run:
	bash test/tools/run.sh start

stop:
	bash test/tools/run.sh stop

test:
	bash test/tools/test.sh

bench:
	bash test/tools/bench.sh

valgrind:
	bash test/tools/valgrind.sh

# the Debian package postgresql-15-qes-billing, into build/deb/ (.ci/deb.sh;
# packaging sources in .ci/debian)
deb:
	bash .ci/deb.sh

# the property-based period test, long and random (make test runs a fixed
# derandomized list); QES_PERIOD_EXAMPLES sets how many lifecycles
test-periods:
	bash test/tools/deps.sh
	$(MAKE) -s install
	QES_PERIOD_EXAMPLES=$${QES_PERIOD_EXAMPLES:-2000} QES_PERIOD_RANDOM=1 \
	  python3 -m pytest -q -p no:cacheprovider -s test/python/test_period_model.py
