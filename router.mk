# The scale-out extensions (docs/scaleout.md): qes_billing_router for the
# router database and qes_billing_shard for each shard database, their
# install scripts assembled from sql/router/*.sql and sql/shard/*.sql.
# Included by the Makefile before PGXS.
ROUTER_VERSION = 0.2
DATA_built += qes_billing_router--$(ROUTER_VERSION).sql qes_billing_shard--$(ROUTER_VERSION).sql
DATA += qes_billing_router.control qes_billing_shard.control
.DEFAULT_GOAL := all

qes_billing_router--$(ROUTER_VERSION).sql: $(sort $(wildcard sql/router/*.sql))
	cat $^ > $@

qes_billing_shard--$(ROUTER_VERSION).sql: $(sort $(wildcard sql/shard/*.sql))
	cat $^ > $@
