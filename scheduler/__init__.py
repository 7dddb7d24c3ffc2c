"""Consolidation scheduling (never imports `server/`): `jobs` (ConsolidationJob, EDF JobQueue), `policy`
(adaptive depth, deadlines, decode rate), `executor` (the in-process executor's queue and planning),
one module per way a sleep runs (`thread`, `process`, `interleaved`, `offload`; `isolation` picks one),
`remote` (Redis Stream jobs), `redis_state` (the session records of server/stores.py's RedisStore) and
`worker` (`sleepserve worker`)."""
