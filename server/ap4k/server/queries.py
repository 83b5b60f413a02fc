"""Every SQL statement the server runs, in one place (the schema is in migrations/)."""

from __future__ import annotations

from ap4k.core import wire

# Group-committed enqueue: many messages, one statement, one commit. The messages come as
# one JSON document, an array of objects named like ENQUEUE_INPUT's columns (absent: NULL):
# one parameter for asyncpg to encode instead of sixteen arrays of a hundred elements each,
# which cost more than the rest of the request (docs/performance.md, "The enqueue path").
# Each body (JSON text) travels as a JSON string, so that it is stored byte for byte; a JSON
# value in the document would be decoded (a NUL escape in it refused, a bare null lost).
# Ids come from the sequence in input order (so FIFO by id is enqueue order). A row with a
# leased_by is handed straight to that dispatcher: inserted already leased (running, attempt
# 1), which saves the lease statement when a dispatcher of this process is idle and the
# queue empty.
ENQUEUE_INPUT = """
SELECT t.*, coalesce(t.not_before, now() + make_interval(secs => coalesce(t.delay, 0))) AS due
  FROM ROWS FROM (json_to_recordset($1::json) AS (
           queue text, target text, method text, headers json, body text, priority int,
           dedup_key text, ordering_key text, max_attempts int, timeout_seconds real,
           delay float8, not_before timestamptz, leased_by text, callback text,
           failure_callback text, flow_key text))
       WITH ORDINALITY AS t(queue, target, method, headers, body, priority, dedup_key,
                            ordering_key, max_attempts, timeout_seconds, delay, not_before,
                            leased_by, callback, failure_callback, flow_key, ord)
"""

_ENQUEUE_INSERT = """
INSERT INTO ap4k_messages (id, queue, state, target, method, headers, body, priority,
                           lease_order, dedup_key, ordering_key, max_attempts,
                           timeout_seconds, scheduled_at, attempt, leased_by,
                           attempted_at, lease_expires_at, callback, failure_callback, flow_key)
SELECT {id}, queue,
       (CASE WHEN leased_by IS NOT NULL THEN 'running'
             WHEN due > now() THEN 'scheduled'
             ELSE 'available' END)::ap4k_state,
       target, method, headers::text, convert_to(body, 'UTF8'), priority,
       ap4k_lease_order(priority), dedup_key, ordering_key, max_attempts, timeout_seconds,
       greatest(due, now()), CASE WHEN leased_by IS NULL THEN 0 ELSE 1 END, leased_by,
       CASE WHEN leased_by IS NOT NULL THEN now() END,
       CASE WHEN leased_by IS NOT NULL
            THEN now() + make_interval(secs => $2) END,
       callback, failure_callback, flow_key
  FROM {source}
 ORDER BY ord
"""

# The common case, no message with a dedup key: a plain INSERT. Without ON CONFLICT,
# PostgreSQL inserts each row once rather than speculatively, and nothing is joined back.
# The rows come back in insertion order, which is input order (ids ascending).
ENQUEUE_NEW = (
    _ENQUEUE_INSERT.format(
        id="nextval('ap4k_messages_id_seq')", source=f"({ENQUEUE_INPUT.strip()}) AS input"
    )
    + "RETURNING id, state::text AS state\n"
)

# The commonest batch, every message plain (a target, a body, the default method, priority
# and timing, nothing else; store.plain_timeout says which), all for one queue: the queue as
# one value and two typed arrays instead of the JSON document. PostgreSQL's CPU per row
# 5.4-5.6 -> 3.8-3.9 us (400 rows per statement on one connection, as the inserter sends
# them): json_to_recordset's sixteen columns and the CASE expressions over them cost more
# than asyncpg's encoding of the arrays. asyncpg encodes an array element by element and
# builds a Record per row returned, so the queue goes as one value and the ids come back as
# one array: 2.7-3.2 -> 1.9-2.0 us per row in the server (docs/performance.md, "The enqueue
# path", fourth and fifth passes). Every column is what ENQUEUE_NEW writes for such a message:
# available now, attempt 0. Ids are taken in input order (volatile expressions of the
# select list are evaluated after its ORDER BY), so the sorted ids are the rows' in order.
ENQUEUE_PLAIN = """
WITH inserted AS (
    INSERT INTO ap4k_messages (id, queue, state, target, method, body, priority, lease_order,
                               timeout_seconds, scheduled_at, attempt)
    SELECT nextval('ap4k_messages_id_seq'), $1::text, 'available', target, 'POST', body, 0,
           ap4k_lease_order(0), $4, now(), 0
      FROM unnest($2::text[], $3::bytea[]) WITH ORDINALITY AS t(target, body, ord)
     ORDER BY ord
    RETURNING id
)
SELECT array_agg(id ORDER BY id) FROM inserted
"""

# Some messages with a dedup key: one that already exists in the queue yields the existing
# message instead of a new one.
ENQUEUE = f"""
WITH input AS (
    SELECT nextval('ap4k_messages_id_seq') AS id, i.* FROM ({ENQUEUE_INPUT.strip()}) AS i
), inserted AS (
    {_ENQUEUE_INSERT.format(id="id", source="input").strip()}
        ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING id, state
)
SELECT coalesce(inserted.id, existing.id) AS id,
       coalesce(inserted.state, existing.state)::text AS state,
       inserted.id IS NULL AS duplicate
  FROM input
  LEFT JOIN inserted USING (id)
  LEFT JOIN ap4k_messages existing
         ON inserted.id IS NULL
        AND existing.queue = input.queue
        AND existing.dedup_key = input.dedup_key
 ORDER BY input.ord
"""

# A duplicate whose original was committed concurrently with our statement is not visible to
# it; look those up again afterwards.
FIND_BY_DEDUP_KEY = """
SELECT id, state::text AS state FROM ap4k_messages WHERE queue = $1 AND dedup_key = $2
"""

# Versioned (migrations/0004, 0006; 0007 gives v2 its flow limits): servers of two releases
# can run side by side in an upgrade.
LEASE = "SELECT * FROM ap4k_lease_v2($1, $2, $3, $4, $5, $6)"

# A message's callback: an ordinary message in the same queue (retried, signed, guarded,
# visible), with no callbacks of its own. Each outcome statement below inserts these in the
# statement that records the outcome, so a crash can neither lose one nor make two. `{rows}`
# is a query of the finished messages: (id, queue, state, attempt, status, excerpt, target,
# url); rows without a url (most) insert nothing.
CALLBACK_ROWS = "SELECT id, queue, state, attempt, status, excerpt, target, url FROM {source}"
# What both outcome statements return of the messages they finished (rows.FinishedRow).
FINISHED_ROWS = """
SELECT id, queue, state, ordering_key, extract(epoch FROM created_at)::float8 AS created_at,
       url IS NOT NULL AS called_back
  FROM {source}
"""
CALLBACKS = """
INSERT INTO ap4k_messages (id, queue, state, target, method, headers, body, priority,
                           lease_order, scheduled_at)
SELECT nextval('ap4k_messages_id_seq'), f.queue, 'available', f.url, 'POST',
       json_build_object('Ap4k-Callback-For', f.id::text)::text,
       convert_to(json_build_object(
           'message_id', f.id::text, 'queue', f.queue, 'state', f.state,
           'attempts', f.attempt, 'status', f.status, 'response_excerpt', f.excerpt,
           'target', f.target)::text, 'UTF8'),
       0, ap4k_lease_order(0), now()
  FROM ({rows}) AS f
 WHERE f.url IS NOT NULL
"""

# Outcomes of deliveries, batched, from dispatchers and carriers alike. The decision is made
# here, in one place: 2xx completes; a retryable failure waits out its backoff (Retry-After,
# else exponential with jitter) while attempts remain; everything else is a dead letter.
# The attempt number fences the lease: an outcome for a lease that expired (and was perhaps
# leased again) or that belongs to someone else matches nothing and changes nothing.
RECORD_OUTCOMES = f"""
WITH o AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::text[],
                         $7::int[], $8::float8[], $9::text[])
             AS o(id, attempt, verdict, retry_after, error, status, duration, excerpt)
), decided AS (
    SELECT m.id, m.attempt, o.error, o.status, o.duration, o.excerpt,
           CASE WHEN o.verdict = 'delivered' THEN 'completed'
                WHEN o.verdict = 'retry'
                 AND m.attempt < coalesce(m.max_attempts, q.max_attempts) THEN 'retryable'
                ELSE 'discarded' END AS state,
           coalesce(o.retry_after,
                    least(q.max_backoff_seconds,
                          q.min_backoff_seconds * power(2, least(m.attempt - 1, 60)))
                    * (0.5 + random() / 2)) AS delay
      FROM o
      JOIN ap4k_messages m ON m.id = o.id
      JOIN ap4k_queues q ON q.name = m.queue
     WHERE m.attempt = o.attempt
       AND m.state = 'running'
       AND m.leased_by = $6
       AND m.lease_expires_at > now()
), updated AS (
    UPDATE ap4k_messages m
       SET state = decided.state::ap4k_state,
           scheduled_at = CASE WHEN decided.state = 'retryable'
                               THEN now() + make_interval(secs => decided.delay)
                               ELSE m.scheduled_at END,
           finalized_at = CASE WHEN decided.state = 'retryable' THEN NULL ELSE now() END,
           leased_by = NULL,
           lease_expires_at = NULL,
           last_error = decided.error
      FROM decided
     WHERE m.id = decided.id
       AND m.attempt = decided.attempt
       AND m.state = 'running'
       AND m.leased_by = $6
    RETURNING m.id, m.queue, m.state::text AS state, m.ordering_key, m.attempt,
              m.attempted_at, m.created_at, decided.error, decided.status,
              decided.duration, decided.excerpt, m.target,
              CASE m.state WHEN 'completed' THEN m.callback
                           WHEN 'discarded' THEN m.failure_callback END AS url
), history AS (
    INSERT INTO ap4k_attempts (message_id, queue, attempt, at, duration_ms, outcome, status,
                               error, response_excerpt, made_by)
    SELECT id, queue, attempt, attempted_at, duration * 1000,
           CASE state WHEN 'retryable' THEN 'retried'
                      WHEN 'completed' THEN 'delivered'
                      ELSE 'dead' END,
           status, error, excerpt, $6
      FROM updated
), callbacks AS (
    {CALLBACKS.format(rows=CALLBACK_ROWS.format(source="updated"))}
)
{FINISHED_ROWS.format(source="updated")}"""

# The common case on its own: a batch of successful deliveries (fewer columns to send and
# no policy to look up). The success's status and duration are kept on the message itself:
# no history row.
COMPLETE = f"""
WITH completed AS (
    UPDATE ap4k_messages m
       SET state = 'completed', finalized_at = now(), leased_by = NULL,
           lease_expires_at = NULL, last_error = NULL, delivered_status = o.status,
           delivered_duration_ms = o.duration_ms
      FROM unnest($1::bigint[], $2::int[], $4::smallint[], $5::real[])
           AS o(id, attempt, status, duration_ms)
     WHERE m.id = o.id
       AND m.attempt = o.attempt
       AND m.state = 'running'
       AND m.leased_by = $3
       AND m.lease_expires_at > now()
    RETURNING m.id, m.queue, 'completed' AS state, m.ordering_key, m.created_at, m.attempt,
              m.target, o.status::int AS status, NULL::text AS excerpt, m.callback AS url
), callbacks AS (
    {CALLBACKS.format(rows=CALLBACK_ROWS.format(source="completed"))}
)
{FINISHED_ROWS.format(source="completed")}"""

# Give leased but undelivered messages back (drain, or a carrier letting go).
RELEASE = """
UPDATE ap4k_messages m
   SET state = 'available',
       attempt = m.attempt - 1,
       leased_by = NULL,
       lease_expires_at = NULL,
       lease_order = ap4k_lease_order(m.priority)
  FROM unnest($1::bigint[], $2::int[]) AS o(id, attempt)
 WHERE m.id = o.id
   AND m.attempt = o.attempt
   AND m.state = 'running'
   AND m.leased_by = $3
RETURNING m.id, m.queue
"""

# Heartbeat for slow deliveries: push a live lease's expiry out.
EXTEND = """
UPDATE ap4k_messages m
   SET lease_expires_at = now() + make_interval(secs => $4)
  FROM unnest($1::bigint[], $2::int[]) AS o(id, attempt)
 WHERE m.id = o.id
   AND m.attempt = o.attempt
   AND m.state = 'running'
   AND m.leased_by = $3
   AND m.lease_expires_at > now()
RETURNING m.id, m.lease_expires_at
"""

# The rescuer (Oban's Lifeline): leases that expired belong to a worker that died or hung.
# The attempt counts; the message is retried at once, or dead-lettered when attempts are spent.
RESCUE_EXPIRED = f"""
WITH expired AS (
    SELECT id, leased_by FROM ap4k_messages
     WHERE state = 'running' AND lease_expires_at < now()
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE ap4k_messages m
       SET state = (CASE WHEN m.attempt >= coalesce(m.max_attempts, q.max_attempts)
                         THEN 'discarded' ELSE 'retryable' END)::ap4k_state,
           finalized_at = CASE WHEN m.attempt >= coalesce(m.max_attempts, q.max_attempts)
                               THEN now() END,
           scheduled_at = now(),
           leased_by = NULL,
           lease_expires_at = NULL,
           last_error = 'lease expired: the dispatcher or carrier holding it stopped answering'
      FROM expired, ap4k_queues q
     WHERE m.id = expired.id AND q.name = m.queue
    RETURNING m.id, m.queue, m.state::text AS state, m.attempt, m.attempted_at, m.last_error,
              expired.leased_by, NULL::int AS status, NULL::text AS excerpt, m.target,
              CASE WHEN m.state = 'discarded' THEN m.failure_callback END AS url
), history AS (
    INSERT INTO ap4k_attempts (message_id, queue, attempt, at, outcome, error, made_by)
    SELECT id, queue, attempt, attempted_at,
           CASE state WHEN 'retryable' THEN 'retried' ELSE 'dead' END, last_error, leased_by
      FROM rescued
), callbacks AS (
    {CALLBACKS.format(rows=CALLBACK_ROWS.format(source="rescued"))}
)
SELECT queue, state FROM rescued
"""

# The scheduler: due scheduled and retryable messages become available, at the back of
# the line (a fresh lease_order).
PROMOTE_DUE = """
WITH due AS (
    SELECT id FROM ap4k_messages
     WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= now()
     ORDER BY scheduled_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE ap4k_messages m
   SET state = 'available', lease_order = ap4k_lease_order(m.priority)
  FROM due
 WHERE m.id = due.id
RETURNING m.queue
"""

SECONDS_UNTIL_NEXT_DUE = """
SELECT extract(epoch FROM min(scheduled_at) - now())::float8
  FROM ap4k_messages
 WHERE state IN ('scheduled', 'retryable')
"""

PRUNE_FINISHED = """
DELETE FROM ap4k_messages
 WHERE id IN (SELECT id FROM ap4k_messages
               WHERE state IN ('completed', 'cancelled')
                 AND finalized_at < now() - make_interval(secs => $1)
               LIMIT $2)
"""

# The history of messages the pruner deleted, once it is past the retention period too.
PRUNE_ORPHAN_ATTEMPTS = """
DELETE FROM ap4k_attempts a
 WHERE a.at < now() - make_interval(secs => $1)
   AND NOT EXISTS (SELECT 1 FROM ap4k_messages m WHERE m.id = a.message_id)
"""

# Messages per queue and state (the states the gauges and queue views count), with the age
# of the oldest; of every queue, or of one ($1).
QUEUE_DEPTHS_TEMPLATE = """
SELECT queue, state::text AS state, count(*) AS n,
       extract(epoch FROM now() - min(scheduled_at))::float8 AS oldest
  FROM ap4k_messages
 WHERE {queue_filter} state IN ('available', 'scheduled', 'running', 'retryable', 'discarded')
 GROUP BY queue, state
"""
QUEUE_DEPTHS = QUEUE_DEPTHS_TEMPLATE.format(queue_filter="")
QUEUE_DEPTHS_OF_ONE = QUEUE_DEPTHS_TEMPLATE.format(queue_filter="queue = $1 AND")

# Deliveries finished per queue over the last $1 seconds: the drain rate the operator scales
# carriers on, counted once whatever the number of server replicas. The finished rows' index
# (ap4k_messages_finished) bounds the scan to the window; rows pruned by retention are gone,
# so the window must stay below --retention-seconds.
COMPLETED_WITHIN = """
SELECT queue, count(*) AS n
  FROM ap4k_messages
 WHERE state = 'completed' AND finalized_at > now() - make_interval(secs => $1)
 GROUP BY queue
"""

# The last answer is the successful one, or else the last failed attempt's (one probe of the
# attempts' primary key per message, and only where a message failed at all).
MESSAGE_COLUMNS = """
id, queue, state::text AS state, target, method, headers, body, priority, dedup_key,
ordering_key, attempt, coalesce(max_attempts, (SELECT q.max_attempts FROM ap4k_queues q
WHERE q.name = queue)) AS max_attempts, timeout_seconds, last_error, created_at,
scheduled_at, attempted_at, finalized_at, callback, failure_callback, flow_key,
CASE WHEN state = 'completed' THEN delivered_status
     WHEN last_error IS NOT NULL THEN (SELECT a.status FROM ap4k_attempts a
          WHERE a.message_id = ap4k_messages.id ORDER BY a.seq DESC LIMIT 1) END AS last_status,
CASE WHEN last_error IS NOT NULL THEN (SELECT a.response_excerpt FROM ap4k_attempts a
          WHERE a.message_id = ap4k_messages.id ORDER BY a.seq DESC LIMIT 1) END
     AS last_response_excerpt
"""

GET_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}, delivered_status, delivered_duration_ms
  FROM ap4k_messages WHERE id = $1
"""

# A message's failed attempts, oldest first (its success, if any, is on the message row).
GET_ATTEMPTS = """
SELECT attempt, at, duration_ms, outcome, status, error, response_excerpt, made_by
  FROM ap4k_attempts
 WHERE message_id = $1
 ORDER BY seq
"""

# Browsing a queue, paged by id. The state is written into the statement (from the fixed
# list of states, never from the request) so that the planner can use the partial index
# of that state; the dedup key goes through the unique (queue, dedup_key) index.
LIST_MESSAGES_TEMPLATE = """
SELECT {columns} FROM ap4k_messages
 WHERE queue = $1 {state_filter}
   AND ($2::text IS NULL OR dedup_key = $2)
   AND id {after} $3
 ORDER BY id {direction}
 LIMIT $4
"""

# Failed attempts per queue over the last $1 seconds (with COMPLETED_WITHIN: the queue
# view's live rates).
FAILED_WITHIN = """
SELECT queue, count(*) AS n
  FROM ap4k_attempts
 WHERE at > now() - make_interval(secs => $1)
 GROUP BY queue
"""

CANCEL_MESSAGE = """
UPDATE ap4k_messages
   SET state = 'cancelled', finalized_at = now(), leased_by = NULL, lease_expires_at = NULL
 WHERE id = $1 AND state IN ('scheduled', 'available', 'running', 'retryable')
RETURNING id, queue, state::text AS state
"""

LIST_DEAD = f"""
SELECT {MESSAGE_COLUMNS} FROM ap4k_messages
 WHERE queue = $1 AND state = 'discarded' AND id > $2
 ORDER BY id
 LIMIT $3
"""

# Redriven messages start over with a full set of attempts.
REDRIVE_DEAD = """
UPDATE ap4k_messages
   SET state = 'available', attempt = 0, finalized_at = NULL, scheduled_at = now(),
       lease_order = ap4k_lease_order(priority)
 WHERE queue = $1 AND state = 'discarded' AND ($2::bigint[] IS NULL OR id = ANY($2))
RETURNING id
"""

PURGE_DEAD = """
WITH purged AS (
    DELETE FROM ap4k_messages
     WHERE queue = $1 AND state = 'discarded' AND ($2::bigint[] IS NULL OR id = ANY($2))
    RETURNING id
), history AS (
    DELETE FROM ap4k_attempts WHERE message_id IN (SELECT id FROM purged)
)
SELECT count(*) FROM purged
"""

ENSURE_QUEUES = """
INSERT INTO ap4k_queues (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING
"""

QUEUE_COLUMNS = """
name, max_attempts, min_backoff_seconds, max_backoff_seconds, rate_limit_per_second,
max_concurrency, paused, base_url, allowed_targets, signing_secret, signing_secrets,
circuit_breaker::text AS circuit_breaker, flow_limits::text AS flow_limits
"""

GET_QUEUE = f"SELECT {QUEUE_COLUMNS} FROM ap4k_queues WHERE name = $1"
LIST_QUEUES = f"SELECT {QUEUE_COLUMNS} FROM ap4k_queues ORDER BY name"
UNPAUSED_QUEUE_NAMES = "SELECT name FROM ap4k_queues WHERE NOT paused"

# Column names come from a fixed allow-list in the store, never from the request.
UPDATE_QUEUE_TEMPLATE = """
UPDATE ap4k_queues SET {assignments}, updated_at = now() WHERE name = $1
RETURNING {columns}
"""

# -- schedules --------------------------------------------------------------------------------

SCHEDULE_COLUMNS = """
name, queue, cron, timezone, message, paused, next_fire_at, last_fired_at, last_message_id,
last_error, created_at, updated_at
"""

# Saving a schedule sets its next fire time, except when it was running on the same cron
# and time zone and still is: then a time that is due but not fired yet is kept.
PUT_SCHEDULE = f"""
INSERT INTO ap4k_schedules AS s (name, queue, cron, timezone, message, paused, next_fire_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE
   SET queue = excluded.queue, cron = excluded.cron, timezone = excluded.timezone,
       message = excluded.message, paused = excluded.paused,
       next_fire_at = CASE WHEN NOT s.paused AND NOT excluded.paused
                            AND s.cron = excluded.cron AND s.timezone = excluded.timezone
                           THEN s.next_fire_at ELSE excluded.next_fire_at END,
       last_error = NULL, updated_at = now()
RETURNING {SCHEDULE_COLUMNS}
"""

GET_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM ap4k_schedules WHERE name = $1"
LIST_SCHEDULES = f"SELECT {SCHEDULE_COLUMNS} FROM ap4k_schedules ORDER BY name"
DELETE_SCHEDULE = "DELETE FROM ap4k_schedules WHERE name = $1"

# Locked for the firing's transaction: a replica that finds a schedule locked leaves it to
# the one firing it.
DUE_SCHEDULES = """
SELECT name, queue, cron, timezone, message, next_fire_at
  FROM ap4k_schedules
 WHERE NOT paused AND next_fire_at <= $1
 ORDER BY next_fire_at
 LIMIT 100
   FOR UPDATE SKIP LOCKED
"""

RECORD_FIRINGS = """
UPDATE ap4k_schedules s
   SET next_fire_at = f.next_fire_at,
       last_fired_at = f.fired_at,
       last_message_id = coalesce(f.message_id, s.last_message_id),
       last_error = f.error
  FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::text[])
       AS f(name, next_fire_at, fired_at, message_id, error)
 WHERE s.name = f.name
"""

# -- topics -----------------------------------------------------------------------------------

TOPIC_COLUMNS = "name, subscriptions, created_at, updated_at"

PUT_TOPIC = f"""
INSERT INTO ap4k_topics AS t (name, subscriptions) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET subscriptions = excluded.subscriptions, updated_at = now()
RETURNING {TOPIC_COLUMNS}
"""

GET_TOPIC = f"SELECT {TOPIC_COLUMNS} FROM ap4k_topics WHERE name = $1"
LIST_TOPICS = f"SELECT {TOPIC_COLUMNS} FROM ap4k_topics ORDER BY name"
DELETE_TOPIC = "DELETE FROM ap4k_topics WHERE name = $1"

# Rotation, one step at a time: a secret is added only while fewer than two are set (the
# caller generated it), and the oldest is dropped once receivers have moved to the newer.
ADD_SIGNING_SECRET = f"""
UPDATE ap4k_queues SET signing_secrets = signing_secrets || $2::text, updated_at = now()
 WHERE name = $1 AND cardinality(signing_secrets) < $3
RETURNING {QUEUE_COLUMNS}
"""

DROP_OLDEST_SIGNING_SECRET = f"""
UPDATE ap4k_queues SET signing_secrets = signing_secrets[2:], updated_at = now()
 WHERE name = $1
RETURNING {QUEUE_COLUMNS}
"""

# Circuit breakers (migrations/0006): outcomes of one queue's deliveries, and what is held.
RECORD_CIRCUITS = "SELECT * FROM ap4k_circuit_record($1, $2, $3)"

LIST_CIRCUITS = """
SELECT origin, state, opened_at, probe_at, failures, attempts
  FROM ap4k_circuits
 WHERE queue = $1 AND state <> 'closed'
 ORDER BY origin
"""

HELD_CIRCUITS = """
SELECT queue, count(*) AS n FROM ap4k_circuits WHERE state <> 'closed' GROUP BY queue
"""

# A queue's circuit breaker turned off: its circuits go, and what they held may go now.
FORGET_CIRCUITS = """
WITH gone AS (
    DELETE FROM ap4k_circuits WHERE queue = $1 RETURNING origin, state
)
UPDATE ap4k_messages m
   SET scheduled_at = now()
 WHERE m.queue = $1 AND m.state = 'retryable' AND m.scheduled_at > now()
   AND ap4k_origin(m.target) IN (SELECT origin FROM gone WHERE state <> 'closed')
"""

# Flow keys (migrations/0007): the busiest keys of a queue.
LIST_FLOW_KEYS = """
SELECT flow_key,
       count(*) FILTER (WHERE state = 'running') AS in_flight,
       count(*) FILTER (WHERE state = 'available') AS waiting
  FROM ap4k_messages
 WHERE queue = $1 AND flow_key IS NOT NULL AND state IN ('available', 'running')
 GROUP BY flow_key
 ORDER BY in_flight DESC, waiting DESC, flow_key
 LIMIT $2
"""

# A key's bucket that has refilled holds nothing worth keeping.
PRUNE_FLOW_BUCKETS = """
DELETE FROM ap4k_flow_keys b
 USING ap4k_queues q
 WHERE q.name = b.queue
   AND (q.flow_limits IS NULL
        OR b.refilled_at < now() - make_interval(secs => greatest(
               1.0, 1.0 / coalesce((q.flow_limits->>'rate_limit_per_second')::float8, 1.0))))
"""

NOTIFY = "SELECT pg_notify($1, $2)"
WAKEUP_CHANNEL = "ap4k_wakeup"
# Every server's LISTEN connection goes by this application_name, which pg_stat_activity
# shows to every role: how a server knows whether anyone else would hear its NOTIFY.
LISTENER_APPLICATION_NAME = "ap4k-listener"
OTHER_LISTENERS = f"""
SELECT count(*) FROM pg_stat_activity
 WHERE application_name = '{LISTENER_APPLICATION_NAME}'
   AND datname = current_database()
   AND pid <> $1
"""

# LIST_MESSAGES[(state or None, newest_first)]: one statement per state and direction.
LIST_MESSAGES = {
    (state, newest_first): LIST_MESSAGES_TEMPLATE.format(
        columns=MESSAGE_COLUMNS,
        state_filter="" if state is None else f"AND state = '{state}'",
        after="<" if newest_first else ">",
        direction="DESC" if newest_first else "ASC",
    )
    for state in (None, *wire.STATES)
    for newest_first in (True, False)
}
