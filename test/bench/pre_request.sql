-- a GET /rpc/config as PostgREST runs it, with db-pre-request = api.pre_request
-- (a rate-limit token from the bucket of one of 100,000 client addresses)
\set a random(1, 100000)
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('search_path', '"api", "public"', true), set_config('request.jwt.claims', '{"role":"qes_anon"}', true),
       set_config('request.method', 'GET', true), set_config('request.path', '/rpc/config', true),
       set_config('request.headers', '{"x-forwarded-for": "198.51.100.1, 10.' || (:a / 65536) || '.' || (:a / 256 % 256) || '.' || (:a % 256) || '"}', true);
SELECT api.pre_request();
SELECT api.config();
COMMIT;
