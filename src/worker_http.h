/*-------------------------------------------------------------------------
 *
 * worker_http.h
 *	  The worker's one libcurl multi handle and the event loop that drives
 *	  it, shared by the outbox (src/outbox.c) and the notifications
 *	  (src/notify.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_WORKER_HTTP_H
#define QES_WORKER_HTTP_H

#include <curl/curl.h>

typedef struct QesHttpTransfer QesHttpTransfer;

/* called once a transfer has finished, or could not start */
typedef void (*QesHttpDone) (QesHttpTransfer *xfer);

/*
 * One transfer: embedded (first) in its owner's struct, which must stay in
 * place while curl has it.
 */
struct QesHttpTransfer
{
	CURL	   *easy;			/* kept by the owner, reused or cleaned up */
	QesHttpDone done;
	bool		in_flight;		/* handed to curl, not finished yet */
	CURLcode	result;			/* when finished */
	long		response_code;	/* the HTTP status, or the last SMTP reply */
	/*
	 * A connection existed for the request, so that it may have been sent
	 * (a curl built before 7.80 cannot tell: always true).  Stays true once
	 * set: curl may retry a request that died on a reused connection on a
	 * new one, and a refused retry does not unsend the first copy.
	 */
	bool		connected;
	char		errbuf[CURL_ERROR_SIZE];
};

extern bool qes_http_transfer_init(QesHttpTransfer *xfer, QesHttpDone done);
extern void qes_http_set_protocols(CURL *easy, const char *names);
extern void qes_http_start(QesHttpTransfer *xfer);
extern void qes_http_cancel(QesHttpTransfer *xfer);
extern void qes_http_drive(void);
extern void qes_http_wait(long timeout_ms);
extern int	qes_http_in_flight(void);
extern bool qes_http_forget_connections(void);

#endif							/* QES_WORKER_HTTP_H */
