"""Every SQL statement of the outbox, in one place, written for asyncpg (`$n` parameters).

The outbox lives in the APPLICATION's database, next to its own tables, so that a message
is written in the same transaction as the data it is about. `psycopg_sql` turns a statement
into psycopg's `%s` style for the synchronous path.
"""

from __future__ import annotations

import re

CHANNEL = "ap4k_outbox"  # LISTEN/NOTIFY channel the forwarder wakes on

# Numbered migrations, applied in order, each once, recorded in ap4k_outbox_migrations.
# Never edit a released migration: add the next number.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "outbox table",
        """
        CREATE TABLE ap4k_outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue text NOT NULL CHECK (queue <> ''),
            -- The message in the server's API form, minus the delay (kept below).
            message jsonb NOT NULL,
            -- Copied out of `message` for the forwarders' ordering check.
            ordering_key text,
            -- Absolute, fixed at enqueue: a server outage must not stretch a delay.
            not_before timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            -- Set when the server refused the message for good (a 4xx); such rows are
            -- kept for inspection and skipped by the forwarders.
            rejected_at timestamptz,
            last_error text
        );
        CREATE INDEX ap4k_outbox_ordering_idx ON ap4k_outbox (queue, ordering_key, id)
            WHERE ordering_key IS NOT NULL;
        -- Rows are deleted as fast as they are inserted: vacuum often so that the head of
        -- the primary key does not fill with dead entries (docs/performance.md, trap 2).
        ALTER TABLE ap4k_outbox SET (
            autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 5000,
            autovacuum_vacuum_insert_scale_factor = 0.0,
            autovacuum_vacuum_insert_threshold = 5000
        );
        -- One identity per outbox: dedup keys built from row ids must not collide with
        -- those of another application's outbox sending to the same queue.
        CREATE TABLE ap4k_outbox_identity (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            id uuid NOT NULL DEFAULT gen_random_uuid(),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO ap4k_outbox_identity DEFAULT VALUES;
        """,
    ),
    (
        2,
        "sleeping forwarders",
        """
        -- Forwarder workers waiting on LISTEN register here; an enqueue sends its NOTIFY
        -- only while one does. A busy forwarder needs no wake-up, and a NOTIFY serialises
        -- commits (docs/performance.md, trap 1), so under load no NOTIFY is sent at all.
        -- Unlogged: it is only a hint, rebuilt by the forwarders within seconds.
        CREATE UNLOGGED TABLE ap4k_outbox_sleepers (
            worker text PRIMARY KEY,
            heartbeat timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)

# A sleeper whose heartbeat is older than this is gone (killed while asleep); the live ones
# refresh theirs every SLEEPER_HEARTBEAT_SECONDS.
SLEEPER_STALE_SECONDS = 30
SLEEPER_HEARTBEAT_SECONDS = 10

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS ap4k_outbox_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

# Serialises concurrent `init` runs (several forwarder replicas starting at once).
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('ap4k_outbox_migrations'))"

APPLIED_VERSIONS = "SELECT version FROM ap4k_outbox_migrations ORDER BY version"

RECORD_MIGRATION = "INSERT INTO ap4k_outbox_migrations (version, name) VALUES ($1, $2)"

IDENTITY = "SELECT id::text FROM ap4k_outbox_identity"

# The wake-up: a NOTIFY only while some forwarder worker sleeps. PostgreSQL folds identical
# notifications of one transaction into one, so a transaction that enqueues a thousand
# messages still sends at most one NOTIFY, at commit.
NOTIFY = f"""
SELECT pg_notify('{CHANNEL}', '') FROM ap4k_outbox_sleepers
WHERE heartbeat > now() - interval '{SLEEPER_STALE_SECONDS} seconds'
LIMIT 1
"""

# One message; the conditional NOTIFY rides in the same statement (one round trip).
_ENQUEUE = """
WITH row AS (
    INSERT INTO ap4k_outbox (queue, message, ordering_key, not_before)
    VALUES ($1, $2::jsonb, $3, COALESCE($4::timestamptz, now() + make_interval(secs => $5)))
    RETURNING id
)
SELECT id{wake} FROM row
"""
ENQUEUE = _ENQUEUE.format(wake="")
ENQUEUE_NOTIFY = _ENQUEUE.format(wake=f", ({NOTIFY.strip()}) AS woken")

# Many messages in one statement; ids are assigned in list order.
ENQUEUE_MANY = """
WITH rows AS (
    INSERT INTO ap4k_outbox (queue, message, ordering_key, not_before)
    SELECT $1, m.message::jsonb, m.ordering_key,
           COALESCE(m.not_before::timestamptz, now() + make_interval(secs => m.delay::float8))
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
         WITH ORDINALITY AS m(message, ordering_key, not_before, delay, n)
    ORDER BY m.n
    RETURNING id
)
SELECT id FROM rows ORDER BY id
"""

# Forwarder workers going to sleep, waking up, and leaving.
SLEEP = """
INSERT INTO ap4k_outbox_sleepers (worker) VALUES ($1)
ON CONFLICT (worker) DO UPDATE SET heartbeat = now()
"""
WAKE = "DELETE FROM ap4k_outbox_sleepers WHERE worker = ANY($1::text[])"
FORGET_STALE_SLEEPERS = """
DELETE FROM ap4k_outbox_sleepers WHERE heartbeat < now() - interval '1 hour'
"""

# The forwarders' claim: the oldest rows nobody else holds. The lock lasts until the batch
# is acknowledged and deleted (or the forwarder dies and PostgreSQL rolls back).
CLAIM = """
SELECT id, queue, message::text AS message, ordering_key,
       GREATEST(0, EXTRACT(EPOCH FROM (not_before - now())))::float8 AS delay_seconds
FROM ap4k_outbox
WHERE rejected_at IS NULL
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# For each ordering key of a claimed batch: the oldest row of that key that is NOT in the
# batch but older than the batch's newest row of the key — held by another forwarder, or
# skipped by SKIP LOCKED. Sending our rows past it would overtake it, so only the rows
# before it go now; the rest wait for their turn.
ORDERING_GAPS = """
SELECT k.queue, k.ordering_key, min(o.id) AS first_outside
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(queue, ordering_key, last_id)
JOIN ap4k_outbox o
  ON o.queue = k.queue AND o.ordering_key = k.ordering_key
 AND o.id < k.last_id AND o.rejected_at IS NULL AND o.id <> ALL($4::bigint[])
GROUP BY k.queue, k.ordering_key
"""

DELETE_FORWARDED = "DELETE FROM ap4k_outbox WHERE id = ANY($1::bigint[])"

REJECT = "UPDATE ap4k_outbox SET rejected_at = now(), last_error = $2 WHERE id = $1"

STATS = """
SELECT count(*) FILTER (WHERE rejected_at IS NULL) AS backlog,
       count(*) FILTER (WHERE rejected_at IS NOT NULL) AS rejected,
       COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at) FILTER (WHERE rejected_at IS NULL))),
                0)::float8 AS oldest_age_seconds
FROM ap4k_outbox
"""

# Give rejected rows another chance (after fixing the queue's allow-list, say).
RETRY_REJECTED = """
UPDATE ap4k_outbox SET rejected_at = NULL, last_error = NULL WHERE rejected_at IS NOT NULL
"""

_PARAM = re.compile(r"\$(\d+)")


def psycopg_sql(statement: str) -> str:
    """`$1 … $n` (each used once, in order) → psycopg's `%s`."""
    numbers = [int(n) for n in _PARAM.findall(statement)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError("psycopg_sql needs each $n once, in order")
    return _PARAM.sub("%s", statement.replace("%", "%%"))
