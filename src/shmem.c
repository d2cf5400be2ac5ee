/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Shared memory of qes_billing: request and startup hooks.
 *
 * Shared memory is a cache, never the source of truth (docs/architecture.md, rule 1):
 * everything in it can be rebuilt from tables, and it is lost at a restart.
 *
 * LOCKING RULES
 *
 * - QesWorkerState is protected by its own LWLock, qes_worker_state->lock,
 *   from the named tranche "qes_billing".  The worker takes it EXCLUSIVE to
 *   publish its pid, latch and counters; readers (the worker_state() SQL
 *   function, backends waking the worker) take it SHARED.
 * - The lock is held only to copy a few fields: never across I/O, SPI, an
 *   ereport, or another LWLock.  Nothing is allocated while it is held.
 * - wake_requests, outbox_wakes and other_wakes are atomics and need no
 *   lock; a commit counts other_wakes before wake_requests.
 * - The usage counters have locks of their own: see counters.c; so do the
 *   partition fences (fence.c), the rejection counters and rate-limit
 *   buckets (guard.c), and the outbox's direct lane (outbox_lane.c).
 * - Waking the worker reads the latch pointer under the SHARED lock and sets
 *   it after releasing the lock.  Setting a stale latch (worker gone, PGPROC
 *   reused) is harmless: at worst a spurious wake-up of some process.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/xlog.h"
#include "catalog/pg_control.h"
#include "common/controldata_utils.h"
#include "common/file_perm.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#include "counters.h"
#include "fence.h"
#include "guard.h"
#include "outbox_lane.h"
#include "shmem.h"

#define QES_TRANCHE "qes_billing"

QesWorkerState *qes_worker_state = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * Did this server start where every commit before it is on disk?  A claim
 * of the outbox commits without waiting for its WAL flush (src/outbox.c),
 * and a promoted standby or a restored backup may lack any commit; so
 * after such a start billing.worker_reclaim() dates the requests that may
 * have gone out (docs/architecture.md, "One Stripe request").  Known in the
 * postmaster only, from what it finds before the startup process runs:
 * pg_control saying a primary was shut down cleanly, and no standby.signal,
 * recovery.signal or backup_label (a standby, a recovery or a restored
 * backup, even of a cleanly stopped server); and from how often shared
 * memory was made (more than once: a crash and a restart of every
 * process, which loses the WAL buffers; the postmaster's memory outlives
 * those restarts, shared memory does not).
 *
 * What may be lost came after the last checkpoint pg_control names: its
 * record is on disk, and its time was taken before the record was
 * written.  That time is the lower bound the reclaim dates from.  A start
 * that is not clean writes it to QES_UNCLEAN_FILE in the data directory,
 * which stays until the worker's reclaim has committed
 * (qes_unclean_start_done): a clean restart before that (the worker
 * paused, the extension not yet updated) is still not clean, and keeps
 * the earliest bound.  (Nothing is sent while the file exists: the worker
 * sends only after its reclaim.)  This reads files: it runs before
 * AddinShmemInitLock is taken.
 */
static int	shmem_inits = 0;

static bool
file_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 || errno != ENOENT;
}

/* what a QES_UNCLEAN_FILE holds (false: none, or not readable) */
static bool
read_unclean_file(TimestampTz *lost_after, TimestampTz *started_at)
{
	FILE	   *f = fopen(QES_UNCLEAN_FILE, "r");
	long long	a;
	long long	b;
	bool		ok;

	if (f == NULL)
		return false;
	ok = fscanf(f, "%lld %lld", &a, &b) == 2;
	fclose(f);
	if (ok)
	{
		*lost_after = (TimestampTz) a;
		*started_at = (TimestampTz) b;
	}
	return ok;
}

/* write QES_UNCLEAN_FILE, durably (a failure is a warning: the flag still holds) */
static void
write_unclean_file(TimestampTz lost_after, TimestampTz started_at)
{
	char		buf[64];
	int			len = snprintf(buf, sizeof(buf), "%lld %lld\n", (long long) lost_after, (long long) started_at);
	int			fd = open(QES_UNCLEAN_FILE, O_CREAT | O_TRUNC | O_WRONLY | PG_BINARY, pg_file_create_mode);

	if (fd < 0 || write(fd, buf, len) != len || pg_fsync(fd) != 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not write file \"%s\": %m", QES_UNCLEAN_FILE),
				 errdetail("A clean restart before the qes_billing worker has reconciled the outbox would forget that this start was not clean.")));
	if (fd >= 0)
		close(fd);
	(void) fsync_fname_ext(".", true, false, WARNING);
}

/*
 * *lost_after: the earliest time a commit may have been lost (DT_NOBEGIN
 * when pg_control cannot say); *started_at: the start after which
 * requests were made, so never sent by lost work -- when the start is not
 * clean.  DT_NOEND when the server starts in recovery (a standby, a
 * recovery, a restored backup): rows made elsewhere, by another server's
 * clock, keep arriving until recovery ends, so every row made before the
 * worker's reclaim counts (which is after recovery: nothing is claimed
 * before it).  A file left by an earlier start that was not
 * clean keeps its start (the earlier, or DT_NOEND if either is), and the
 * earlier of the two bounds (nothing was sent since that start: the worker
 * sends only after its reclaim, which removes the file).
 */
static bool
claims_may_be_lost(TimestampTz *lost_after, TimestampTz *started_at)
{
	bool		crc_ok;
	ControlFileData *cf;
	TimestampTz checkpoint_at;
	TimestampTz kept_after;
	TimestampTz kept_start;
	bool		had_file;
	bool		in_recovery;
	bool		clean;

	*lost_after = DT_NOBEGIN;
	*started_at = GetCurrentTimestamp();
	if (IsUnderPostmaster)
		return true;			/* not the postmaster: not known, assume the worst */
	cf = get_controlfile(DataDir, &crc_ok);
	checkpoint_at = crc_ok ? time_t_to_timestamptz(cf->checkPointCopy.time) : DT_NOBEGIN;
	had_file = file_exists(QES_UNCLEAN_FILE);
	in_recovery = file_exists(STANDBY_SIGNAL_FILE) || file_exists(RECOVERY_SIGNAL_FILE) ||
		file_exists(BACKUP_LABEL_FILE);
	clean = shmem_inits++ == 0 && crc_ok && cf->state == DB_SHUTDOWNED && !had_file && !in_recovery;
	pfree(cf);
	if (clean)
		return false;
	*lost_after = checkpoint_at;
	if (in_recovery)
		*started_at = DT_NOEND;
	if (had_file)
	{
		/* none readable: the worst bound, and this start */
		if (read_unclean_file(&kept_after, &kept_start))
			*started_at = (*started_at == DT_NOEND || kept_start == DT_NOEND) ? DT_NOEND :
				Min(*started_at, kept_start);
		else
			kept_after = DT_NOBEGIN;
		*lost_after = Min(*lost_after, kept_after);
	}
	write_unclean_file(*lost_after, *started_at);
	return true;
}

/*
 * The worker's reclaim after a start that was not clean has committed:
 * later starts are judged on their own.  (Run by the worker: its working
 * directory is the data directory too.)
 */
void
qes_unclean_start_done(void)
{
	(void) durable_unlink(QES_UNCLEAN_FILE, LOG);
}

static Size
qes_shmem_size(void)
{
	return MAXALIGN(sizeof(QesWorkerState));
}

static void
qes_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(qes_shmem_size());
	RequestNamedLWLockTranche(QES_TRANCHE, 1);
	qes_counters_request();
	qes_fence_request();
	qes_guard_request();
	qes_lane_request();
}

static void
qes_shmem_startup(void)
{
	bool		found;
	bool		lost;
	TimestampTz lost_after;
	TimestampTz started_at;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	/* (files: before the lock; used only when the segment is new) */
	lost = claims_may_be_lost(&lost_after, &started_at);
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	qes_worker_state = ShmemInitStruct("qes_billing worker state",
									   sizeof(QesWorkerState), &found);
	if (!found)
	{
		memset(qes_worker_state, 0, sizeof(QesWorkerState));
		pg_atomic_init_u64(&qes_worker_state->wake_requests, 0);
		pg_atomic_init_u64(&qes_worker_state->outbox_wakes, 0);
		pg_atomic_init_u64(&qes_worker_state->other_wakes, 0);
		qes_worker_state->lock = &(GetNamedLWLockTranche(QES_TRANCHE))[0].lock;
		qes_worker_state->claims_may_be_lost = lost;
		qes_worker_state->lost_after = lost_after;
		qes_worker_state->unclean_started_at = started_at;
	}
	qes_counters_startup();
	qes_fence_startup();
	qes_guard_startup();
	qes_lane_startup();
	LWLockRelease(AddinShmemInitLock);
}

void
qes_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = qes_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = qes_shmem_startup;
}

/*
 * Wake the worker now.  Callers that queue work use qes_wake_at_commit()
 * instead, so the worker never sees a row that is not yet committed.
 */
void
qes_set_worker_latch(void)
{
	Latch	   *latch;

	if (qes_worker_state == NULL)
		return;
	pg_atomic_fetch_add_u64(&qes_worker_state->wake_requests, 1);
	LWLockAcquire(qes_worker_state->lock, LW_SHARED);
	latch = qes_worker_state->latch;
	LWLockRelease(qes_worker_state->lock);
	if (latch)
		SetLatch(latch);
}
