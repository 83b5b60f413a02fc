"""Every SQL statement the server runs, in one place (the schema is in migrations/)."""

from __future__ import annotations

# Group-committed enqueue: many messages, one statement, one commit. Ids come from the
# sequence in input order (so FIFO by id is enqueue order); a dedup_key that already exists
# in the queue yields the existing message instead of a new one. A row with a leased_by is
# handed straight to that dispatcher: inserted already leased (running, attempt 1), which
# saves the lease statement when a dispatcher of this process is idle and the queue empty.
ENQUEUE = """
WITH input AS (
    SELECT nextval('ap4k_messages_id_seq') AS id, t.*,
           coalesce(t.not_before, now() + make_interval(secs => coalesce(t.delay, 0))) AS due
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::int[],
                  $7::text[], $8::text[], $9::int[], $10::real[], $11::float8[],
                  $12::timestamptz[], $13::text[])
           WITH ORDINALITY AS t(queue, target, method, headers, body, priority, dedup_key,
                                ordering_key, max_attempts, timeout_seconds, delay,
                                not_before, leased_by, ord)
), inserted AS (
    INSERT INTO ap4k_messages (id, queue, state, target, method, headers, body, priority,
                               lease_order, dedup_key, ordering_key, max_attempts,
                               timeout_seconds, scheduled_at, attempt, leased_by,
                               attempted_at, lease_expires_at)
    SELECT id, queue,
           (CASE WHEN leased_by IS NOT NULL THEN 'running'
                 WHEN due > now() THEN 'scheduled'
                 ELSE 'available' END)::ap4k_state,
           target, method, headers, body, priority, ap4k_lease_order(priority), dedup_key,
           ordering_key, max_attempts, timeout_seconds, greatest(due, now()),
           CASE WHEN leased_by IS NULL THEN 0 ELSE 1 END, leased_by,
           CASE WHEN leased_by IS NOT NULL THEN now() END,
           CASE WHEN leased_by IS NOT NULL
                THEN now() + make_interval(secs => greatest($14, 2 * timeout_seconds + 1)) END
      FROM input
     ORDER BY ord
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

# Versioned (migrations/0002): replicas of two releases can run side by side in an upgrade.
LEASE = "SELECT * FROM ap4k_lease_v1($1, $2, $3, $4, $5, $6)"

# Outcomes of deliveries, batched, from dispatchers and carriers alike. The decision is made
# here, in one place: 2xx completes; a retryable failure waits out its backoff (Retry-After,
# else exponential with jitter) while attempts remain; everything else is a dead letter.
# The attempt number fences the lease: an outcome for a lease that expired (and was perhaps
# leased again) or that belongs to someone else matches nothing and changes nothing.
RECORD_OUTCOMES = """
WITH o AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::text[])
             AS o(id, attempt, verdict, retry_after, error)
), decided AS (
    SELECT m.id, m.attempt, o.error,
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
)
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
RETURNING m.id, m.queue, m.state::text AS state, m.ordering_key,
          extract(epoch FROM m.created_at)::float8 AS created_at
"""

# The common case on its own: a batch of successful deliveries (fewer columns to send and
# no policy to look up).
COMPLETE = """
UPDATE ap4k_messages m
   SET state = 'completed', finalized_at = now(), leased_by = NULL, lease_expires_at = NULL,
       last_error = NULL
  FROM unnest($1::bigint[], $2::int[]) AS o(id, attempt)
 WHERE m.id = o.id
   AND m.attempt = o.attempt
   AND m.state = 'running'
   AND m.leased_by = $3
   AND m.lease_expires_at > now()
RETURNING m.id, m.queue, 'completed' AS state, m.ordering_key,
          extract(epoch FROM m.created_at)::float8 AS created_at
"""

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
RESCUE_EXPIRED = """
WITH expired AS (
    SELECT id FROM ap4k_messages
     WHERE state = 'running' AND lease_expires_at < now()
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
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
RETURNING m.queue, m.state::text AS state
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

QUEUE_DEPTHS = """
SELECT queue, state::text AS state, count(*) AS n,
       extract(epoch FROM now() - min(scheduled_at))::float8 AS oldest
  FROM ap4k_messages
 WHERE state IN ('available', 'scheduled', 'running', 'retryable', 'discarded')
 GROUP BY queue, state
"""

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

QUEUE_DEPTHS_OF_ONE = """
SELECT queue, state::text AS state, count(*) AS n,
       extract(epoch FROM now() - min(scheduled_at))::float8 AS oldest
  FROM ap4k_messages
 WHERE queue = $1
   AND state IN ('available', 'scheduled', 'running', 'retryable', 'discarded')
 GROUP BY queue, state
"""

MESSAGE_COLUMNS = """
id, queue, state::text AS state, target, method, headers, body, priority, dedup_key,
ordering_key, attempt, coalesce(max_attempts, (SELECT q.max_attempts FROM ap4k_queues q
WHERE q.name = queue)) AS max_attempts, timeout_seconds, last_error, created_at,
scheduled_at, attempted_at, finalized_at
"""

GET_MESSAGE = f"SELECT {MESSAGE_COLUMNS} FROM ap4k_messages WHERE id = $1"

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
DELETE FROM ap4k_messages
 WHERE queue = $1 AND state = 'discarded' AND ($2::bigint[] IS NULL OR id = ANY($2))
"""

ENSURE_QUEUES = """
INSERT INTO ap4k_queues (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING
"""

QUEUE_COLUMNS = """
name, max_attempts, min_backoff_seconds, max_backoff_seconds, rate_limit_per_second,
max_concurrency, paused, base_url, allowed_targets, signing_secret
"""

GET_QUEUE = f"SELECT {QUEUE_COLUMNS} FROM ap4k_queues WHERE name = $1"
LIST_QUEUES = f"SELECT {QUEUE_COLUMNS} FROM ap4k_queues ORDER BY name"
UNPAUSED_QUEUE_NAMES = "SELECT name FROM ap4k_queues WHERE NOT paused"

# Column names come from a fixed allow-list in the store, never from the request.
UPDATE_QUEUE_TEMPLATE = """
UPDATE ap4k_queues SET {assignments}, updated_at = now() WHERE name = $1
RETURNING {columns}
"""

NOTIFY = "SELECT pg_notify($1, $2)"
WAKEUP_CHANNEL = "ap4k_wakeup"
