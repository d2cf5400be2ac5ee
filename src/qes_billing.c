/*-------------------------------------------------------------------------
 *
 * qes_billing.c
 *	  Module entry point: settings, shared memory and the worker.
 *
 * The library must be in shared_preload_libraries: it owns shared memory
 * and a background worker, both of which exist only when the postmaster
 * loads it.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "fmgr.h"
#include "miscadmin.h"

#include "guc.h"
#include "shmem.h"
#include "worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("qes_billing must be loaded via shared_preload_libraries"),
				 errdetail("It needs shared memory and a background worker, which only the server can set up at start."),
				 errhint("Add qes_billing to shared_preload_libraries in postgresql.conf and restart the server.")));

	qes_define_gucs();
	qes_shmem_init();
	qes_register_worker();
}
