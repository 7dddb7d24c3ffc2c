"""Consolidation scheduling (never imports `server/`): `jobs` (ConsolidationJob, EDF JobQueue), `policy`
(adaptive depth, deadlines, decode rate), `executor` (in-process worker threads), `remote` (Redis Stream
jobs), `redis_state` (the session records of server/stores.py's RedisStore) and `worker` (`sleepserve
worker`)."""
