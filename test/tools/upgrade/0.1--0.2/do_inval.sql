-- (upgrade) the cache trigger of the table made again (the others keep theirs)
CREATE TRIGGER invalidate_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.subscriptions
  FOR EACH STATEMENT EXECUTE FUNCTION billing.invalidate_cache_on_commit();
