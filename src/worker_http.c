/*-------------------------------------------------------------------------
 *
 * worker_http.c
 *	  The worker's one libcurl multi handle and the event loop that drives
 *	  it, shared by the outbox (src/outbox.c, Stripe requests) and the
 *	  notifications (src/notify.c, email and the platform's webhook).
 *
 * The chain is: the loop, a queue, events (docs/architecture.md, "The
 * worker loop").  The loop (src/worker.c) turns the pumps; a pump
 * claims rows in a short transaction and queues each as a transfer on the
 * multi handle (qes_http_start); the loop then waits here
 * (qes_http_wait) on a WaitEventSet that holds the worker's latch, the
 * postmaster's death and an epoll set of curl's sockets, with curl's own
 * timer as the longest wait -- a commit that sets the latch, a socket that
 * becomes ready or curl's timer ends the wait at once; qes_http_drive()
 * lets curl work on the sockets that are ready (found in the epoll set
 * without waiting) and on its timer, and hands each finished transfer to
 * its owner through the callback the owner gave (the event), which only
 * notes it: the owner's next turn records it in a transaction.  Nothing
 * here runs SQL or calls back into the loop or the pumps except through
 * those callbacks.
 *
 * curl tells which sockets to watch for what through its socket callback
 * (kept in the epoll set: a descriptor closed behind our back leaves the set
 * by itself, and its number may come back), and when it wants to be called
 * back through its timer callback.  Neither may ereport.
 *
 * The multi handle keeps the connections alive between transfers.
 * qes_http_forget_connections() drops them all (a new multi handle), which
 * it can do only while nothing is in flight.
 *
 * All state lives in this process (the worker); nothing here is shared.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <errno.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "worker_http.h"

static bool curl_ready = false; /* curl_global_init done */
static CURLM *multi = NULL;
static int	n_in_flight = 0;

/* waiting: the latch and curl's sockets (an epoll set of their own) */
static int	curl_epoll = -1;
static WaitEventSet *wait_set = NULL;
static TimestampTz curl_timer_at = 0;	/* curl wants socket_action(TIMEOUT) then */
static bool curl_timer_armed = false;

/* ---- curl callbacks (must not ereport) ---------------------------------- */

/*
 * curl tells which of its sockets to watch for what: kept in our epoll set.
 * socketp is non-NULL once the socket is in the set.
 */
static int
socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct epoll_event ev;

	if (what == CURL_POLL_REMOVE)
	{
		if (socketp != NULL)
			(void) epoll_ctl(curl_epoll, EPOLL_CTL_DEL, s, NULL);
		curl_multi_assign(multi, s, NULL);
		return 0;
	}
	memset(&ev, 0, sizeof(ev));
	ev.data.fd = s;
	if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
		ev.events |= EPOLLIN;
	if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
		ev.events |= EPOLLOUT;
	/* a closed descriptor leaves the set by itself, and its number may come back */
	if (epoll_ctl(curl_epoll, socketp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &ev) != 0)
	{
		if (errno == ENOENT)
			(void) epoll_ctl(curl_epoll, EPOLL_CTL_ADD, s, &ev);
		else if (errno == EEXIST)
			(void) epoll_ctl(curl_epoll, EPOLL_CTL_MOD, s, &ev);
	}
	curl_multi_assign(multi, s, (void *) 1);
	return 0;
}

/* curl asks to be called back after timeout_ms (-1: no timer) */
static int
timer_cb(CURLM *m, long timeout_ms, void *userp)
{
	if (timeout_ms < 0)
		curl_timer_armed = false;
	else
	{
		curl_timer_armed = true;
		curl_timer_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	}
	return 0;
}

/* ---- set-up --------------------------------------------------------------- */

static void
http_init(void)
{
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			elog(ERROR, "qes_billing worker: curl_global_init failed");
		curl_ready = true;
	}
	if (curl_epoll < 0)
	{
		curl_epoll = epoll_create1(EPOLL_CLOEXEC);
		if (curl_epoll < 0)
			elog(ERROR, "qes_billing worker: epoll_create1 failed: %m");
	}
	if (wait_set == NULL)
	{
		wait_set = CreateWaitEventSet(TopMemoryContext, 3);
		AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		AddWaitEventToSet(wait_set, WL_SOCKET_READABLE, curl_epoll, NULL, NULL);
	}
	if (multi == NULL)
	{
		multi = curl_multi_init();
		if (multi == NULL)
			elog(ERROR, "qes_billing worker: curl_multi_init failed");
		curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
		curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);
	}
}

#if LIBCURL_VERSION_NUM >= 0x075000
/* curl has a connection for the request and is about to send it */
static int
prereq_cb(void *clientp, char *primary_ip, char *local_ip, int primary_port, int local_port)
{
	(void) primary_ip;
	(void) local_ip;
	(void) primary_port;
	(void) local_port;
	((QesHttpTransfer *) clientp)->connected = true;
	return CURL_PREREQFUNC_OK;
}
#endif

/*
 * A new easy handle for xfer, with what every transfer of the worker has:
 * TLS verified, no signals, no redirects, curl's error text in xfer->errbuf,
 * our User-Agent.  done is called when the transfer has finished.  False
 * when curl could not make the handle.
 */
bool
qes_http_transfer_init(QesHttpTransfer *xfer, QesHttpDone done)
{
	http_init();
	memset(xfer, 0, sizeof(*xfer));
	xfer->done = done;
	xfer->easy = curl_easy_init();
	if (xfer->easy == NULL)
		return false;
	curl_easy_setopt(xfer->easy, CURLOPT_USERAGENT,
					 "qes_billing/" QES_VERSION " (PostgreSQL " PG_VERSION ")");
	curl_easy_setopt(xfer->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(xfer->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(xfer->easy, CURLOPT_SSL_VERIFYHOST, 2L);
	curl_easy_setopt(xfer->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(xfer->easy, CURLOPT_ERRORBUFFER, xfer->errbuf);
	curl_easy_setopt(xfer->easy, CURLOPT_PRIVATE, xfer);
#if LIBCURL_VERSION_NUM >= 0x075000
	curl_easy_setopt(xfer->easy, CURLOPT_PREREQFUNCTION, prereq_cb);
	curl_easy_setopt(xfer->easy, CURLOPT_PREREQDATA, xfer);
#endif
	return true;
}

/* Only the protocols named ("http,https", "smtp,smtps") for this handle. */
void
qes_http_set_protocols(CURL *easy, const char *names)
{
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, names);
#else
	static const struct
	{
		const char *name;
		long		bit;
	}			protocols[] = {
		{"http", CURLPROTO_HTTP}, {"https", CURLPROTO_HTTPS},
		{"smtp", CURLPROTO_SMTP}, {"smtps", CURLPROTO_SMTPS}
	};
	long		mask = 0;

	for (const char *p = names; *p;)
	{
		size_t		len = strcspn(p, ",");

		for (int i = 0; i < lengthof(protocols); i++)
			if (strlen(protocols[i].name) == len && strncmp(p, protocols[i].name, len) == 0)
				mask |= protocols[i].bit;
		p += len;
		if (*p == ',')
			p++;
	}
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS, mask);
#endif
}

/* ---- transfers ------------------------------------------------------------ */

static void
finished(QesHttpTransfer *xfer, CURLcode result, long response_code)
{
	xfer->in_flight = false;
	xfer->result = result;
	xfer->response_code = response_code;
	xfer->done(xfer);
}

/*
 * Hand the transfer to curl; it starts at the next qes_http_drive().  When
 * curl refuses it, it has finished at once (a transport error, retried like
 * any): xfer->done is called before this returns.
 */
void
qes_http_start(QesHttpTransfer *xfer)
{
	CURLMcode	rc;

	http_init();
	xfer->errbuf[0] = '\0';
#if LIBCURL_VERSION_NUM >= 0x075000
	xfer->connected = false;
#else
	xfer->connected = true;
#endif
	rc = curl_multi_add_handle(multi, xfer->easy);
	if (rc != CURLM_OK)
	{
		snprintf(xfer->errbuf, sizeof(xfer->errbuf), "curl_multi_add_handle: %s",
				 curl_multi_strerror(rc));
		finished(xfer, CURLE_FAILED_INIT, 0);
		return;
	}
	xfer->in_flight = true;
	n_in_flight++;
}

/* Take back a transfer that has not finished (its done is not called). */
void
qes_http_cancel(QesHttpTransfer *xfer)
{
	if (!xfer->in_flight)
		return;
	curl_multi_remove_handle(multi, xfer->easy);
	xfer->in_flight = false;
	n_in_flight--;
}

/* transfers handed to curl and not finished yet */
int
qes_http_in_flight(void)
{
	return n_in_flight;
}

/* the finished transfers, each to its owner */
static void
collect_finished(void)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		QesHttpTransfer *xfer = NULL;
		CURLcode	result;
		long		code = 0;

		if (msg->msg != CURLMSG_DONE)
			continue;
		/* (msg is gone once the handle is removed) */
		result = msg->data.result;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &xfer);
		curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &code);
		curl_multi_remove_handle(multi, msg->easy_handle);
		n_in_flight--;
		finished(xfer, result, code);
	}
}

/*
 * Let curl work, without waiting: on the sockets that are ready (found in
 * our epoll set), and on its timer when it has come; then hand over what
 * finished.
 */
void
qes_http_drive(void)
{
	struct epoll_event events[64];
	int			running;
	int			n;

	if (multi == NULL)
		return;
	/* (nothing in flight: no socket can be ready, and no timer runs for one) */
	if (n_in_flight == 0 && !curl_timer_armed)
		return;
	do
	{
		n = epoll_wait(curl_epoll, events, lengthof(events), 0);
		for (int i = 0; i < n; i++)
		{
			int			flags = 0;

			if (events[i].events & (EPOLLIN | EPOLLHUP))
				flags |= CURL_CSELECT_IN;
			if (events[i].events & EPOLLOUT)
				flags |= CURL_CSELECT_OUT;
			if (events[i].events & EPOLLERR)
				flags |= CURL_CSELECT_ERR;
			curl_multi_socket_action(multi, events[i].data.fd, flags, &running);
		}
	} while (n == lengthof(events));
	if (curl_timer_armed && GetCurrentTimestamp() >= curl_timer_at)
	{
		curl_timer_armed = false;
		curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
	}
	collect_finished();
}

/*
 * Sleep for at most timeout_ms, or until the latch is set, one of curl's
 * sockets is ready or curl's timer has come.  Does not reset the latch.
 */
void
qes_http_wait(long timeout_ms)
{
	WaitEvent	event;
	long		wait_ms = Max(timeout_ms, 0);

	http_init();
	if (curl_timer_armed)
		wait_ms = Min(wait_ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), curl_timer_at));
	(void) WaitEventSetWait(wait_set, wait_ms, &event, 1, PG_WAIT_EXTENSION);
}

/*
 * Close every connection curl keeps (they were made under settings that
 * changed): possible only while nothing is in flight.  Returns whether it
 * was done.
 */
bool
qes_http_forget_connections(void)
{
	if (n_in_flight > 0)
		return false;
	if (multi != NULL)
	{
		curl_multi_cleanup(multi);
		multi = NULL;
		curl_timer_armed = false;
	}
	return true;
}
