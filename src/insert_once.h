/*-------------------------------------------------------------------------
 *
 * insert_once.h
 *	  Insert a row unless its primary key exists: the write of record_usage
 *	  and of webhook intake (src/insert_once.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_INSERT_ONCE_H
#define QES_INSERT_ONCE_H

/*
 * What a caller inserts into: the table, the columns it fills (in the order
 * of its values) and their types, how many of them are the primary key,
 * whether to look for the key before inserting, and the name of the
 * extension's own statement trigger on that table whose work the caller
 * does itself (NULL for none).
 */
typedef struct QesInsertTarget
{
	const char *nspname;
	const char *relname;
	int			ncolumns;
	const char *const *columns;
	const Oid  *types;			/* the type of each value, as the caller makes it */
	int			nkey;			/* the first nkey columns are the primary key */
	bool		probe_first;	/* repeats are common: look before inserting */
	const char *own_trigger;
	const char *own_trigger_function;
	/* kept by insert_once.c: the table's shape as of its last invalidation */
	struct InsertShape *shape;
} QesInsertTarget;

typedef enum QesInsertResult
{
	QES_INSERTED,				/* the row is in */
	QES_INSERT_EXISTS,			/* a row with its primary key exists (or was
								 * committed while we waited for it) */
} QesInsertResult;

extern QesInsertResult qes_insert_once(QesInsertTarget *target, const Datum *values, const bool *nulls);
extern void qes_insert_once_init(void);
extern void qes_insert_once_at_xact_end(void);

#endif							/* QES_INSERT_ONCE_H */
