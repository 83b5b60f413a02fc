-- The queue: one table of messages with a small explicit state machine (River's names),
-- one table of per-queue settings, and the sequences that order them.

CREATE TYPE ap4k_state AS ENUM (
    'scheduled',   -- waiting for not_before / delay
    'available',   -- ready to be leased
    'running',     -- leased by a dispatcher or a carrier until lease_expires_at
    'retryable',   -- failed, waiting for its backoff to pass
    'completed',   -- delivered (2xx)
    'discarded',   -- the dead letters: permanent failure or attempts spent
    'cancelled'    -- cancelled by a user before it finished
);

CREATE TABLE ap4k_queues (
    name                  text PRIMARY KEY,
    max_attempts          integer NOT NULL DEFAULT 25,
    min_backoff_seconds   double precision NOT NULL DEFAULT 0.1,
    max_backoff_seconds   double precision NOT NULL DEFAULT 3600,
    rate_limit_per_second double precision,          -- NULL: unlimited
    max_concurrency       integer,                   -- NULL: unlimited
    paused                boolean NOT NULL DEFAULT false,
    base_url              text,
    allowed_targets       text[] NOT NULL DEFAULT '{}',
    signing_secret        text,
    -- token bucket shared by every dispatcher and carrier leasing from this queue
    rate_tokens           double precision NOT NULL DEFAULT 0,
    rate_refilled_at      timestamptz NOT NULL DEFAULT now(),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE ap4k_messages_id_seq;
-- Dequeue order within a queue: a message gets a new lease_order each time it becomes
-- available, so a retried message queues up behind the work that arrived meanwhile and
-- the head of the queue only ever moves forward (see ap4k_lease_order below).
CREATE SEQUENCE ap4k_lease_order_seq;

-- Priority in the high bits, arrival in the low bits: ORDER BY lease_order is "higher
-- priority first, then first come first served", and a single bigint lets leases start
-- from a lower bound (the head pointer) instead of walking dead index entries.
CREATE FUNCTION ap4k_lease_order(priority integer) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT ((1000 - priority)::bigint << 42) | nextval('ap4k_lease_order_seq')
$$;

CREATE TABLE ap4k_messages (
    id               bigint PRIMARY KEY,
    queue            text NOT NULL,
    state            ap4k_state NOT NULL,
    target           text NOT NULL,
    method           text NOT NULL DEFAULT 'POST',
    headers          text,                  -- JSON object, as sent
    body             bytea,                 -- the JSON body, serialised once at enqueue
    priority         smallint NOT NULL DEFAULT 0,
    lease_order      bigint NOT NULL,
    dedup_key        text,
    ordering_key     text,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer,               -- NULL: the queue's setting
    timeout_seconds  real NOT NULL DEFAULT 30,
    scheduled_at     timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempted_at     timestamptz,
    finalized_at     timestamptz,
    leased_by        text,
    lease_expires_at timestamptz,
    last_error       text,
    CONSTRAINT finalized_only_when_terminal CHECK (
        (state IN ('completed', 'discarded', 'cancelled')) = (finalized_at IS NOT NULL)),
    CONSTRAINT leased_only_when_running CHECK (
        (state = 'running') = (lease_expires_at IS NOT NULL))
);

-- The lease path: only available rows, in dequeue order.
CREATE INDEX ap4k_messages_available ON ap4k_messages (queue, lease_order)
    WHERE state = 'available';
-- The promoter: scheduled and retryable rows by due time.
CREATE INDEX ap4k_messages_due ON ap4k_messages (scheduled_at)
    WHERE state IN ('scheduled', 'retryable');
-- The rescuer and concurrency limits: running rows.
CREATE INDEX ap4k_messages_running ON ap4k_messages (queue, lease_expires_at)
    WHERE state = 'running';
CREATE UNIQUE INDEX ap4k_messages_dedup ON ap4k_messages (queue, dedup_key)
    WHERE dedup_key IS NOT NULL;
-- Per-ordering-key FIFO: is there an earlier unfinished message with the same key?
CREATE INDEX ap4k_messages_ordering ON ap4k_messages (queue, ordering_key, id)
    WHERE ordering_key IS NOT NULL
      AND state IN ('scheduled', 'available', 'running', 'retryable');
CREATE INDEX ap4k_messages_dead ON ap4k_messages (queue, id)
    WHERE state = 'discarded';
-- Retention: finished rows by age.
CREATE INDEX ap4k_messages_finished ON ap4k_messages (finalized_at)
    WHERE state IN ('completed', 'cancelled');

-- Queue tables churn: every delivery turns an index entry at the head of the queue dead.
-- Vacuum early and often so that leases do not walk an ever longer trail of them.
ALTER TABLE ap4k_messages SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.2,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 90
);

-- Lease up to p_limit available messages of one queue for p_leased_by, honouring the
-- queue's pause switch, concurrency limit and rate limit (a token bucket on the queue row),
-- and per-ordering-key FIFO. p_floor is the caller's head pointer: no available row of
-- this queue has a lower lease_order that the caller has not already passed (0: no hint).
-- With p_cover_timeout the lease lasts at least twice the message's timeout + 1 s: the
-- server's dispatchers never extend a lease, and a message may wait in their buffer behind
-- one delivery before its own starts. Carriers lease for p_lease_seconds and heartbeat.
CREATE FUNCTION ap4k_lease(
    p_queue text,
    p_limit integer,
    p_leased_by text,
    p_lease_seconds double precision,
    p_floor bigint,
    p_cover_timeout boolean
) RETURNS TABLE (
    id bigint, target text, method text, headers text, body bytea, attempt integer,
    max_attempts integer, timeout_seconds real, created_at timestamptz,
    ordering_key text, lease_order bigint, lease_expires_at timestamptz
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q ap4k_queues%ROWTYPE;
    allowance integer := p_limit;
    running integer;
    leased integer;
BEGIN
    SELECT * INTO q FROM ap4k_queues WHERE name = p_queue;
    IF NOT FOUND OR q.paused THEN
        RETURN;
    END IF;
    IF q.rate_limit_per_second IS NOT NULL OR q.max_concurrency IS NOT NULL THEN
        -- Limits hold across every dispatcher and carrier: serialise on the queue's row.
        SELECT * INTO q FROM ap4k_queues WHERE name = p_queue FOR UPDATE;
        IF q.paused THEN
            RETURN;
        END IF;
        IF q.max_concurrency IS NOT NULL THEN
            SELECT count(*) INTO running FROM ap4k_messages m
             WHERE m.queue = p_queue AND m.state = 'running';
            allowance := least(allowance, q.max_concurrency - running);
        END IF;
        IF q.rate_limit_per_second IS NOT NULL THEN
            -- Refill: at most one second's worth of tokens (and at least one) can be banked.
            q.rate_tokens := least(
                greatest(q.rate_limit_per_second, 1.0),
                q.rate_tokens + extract(epoch FROM clock_timestamp() - q.rate_refilled_at)
                              * q.rate_limit_per_second);
            allowance := least(allowance, floor(q.rate_tokens)::integer);
        END IF;
    END IF;
    IF allowance <= 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH picked AS (
        SELECT m.id
          FROM ap4k_messages m
         WHERE m.state = 'available'
           AND m.queue = p_queue
           AND m.lease_order >= p_floor
           AND (m.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM ap4k_messages e
                 WHERE e.queue = m.queue
                   AND e.ordering_key = m.ordering_key
                   AND e.id < m.id
                   AND e.state IN ('scheduled', 'available', 'running', 'retryable')))
         ORDER BY m.lease_order
         LIMIT allowance
           FOR UPDATE SKIP LOCKED
    )
    UPDATE ap4k_messages m
       SET state = 'running',
           attempt = m.attempt + 1,
           leased_by = p_leased_by,
           attempted_at = now(),
           lease_expires_at = now() + make_interval(secs => CASE
               WHEN p_cover_timeout THEN greatest(p_lease_seconds, 2 * m.timeout_seconds + 1)
               ELSE p_lease_seconds END)
      FROM picked
     WHERE m.id = picked.id
    RETURNING m.id, m.target, m.method, m.headers, m.body, m.attempt,
              coalesce(m.max_attempts, q.max_attempts), m.timeout_seconds, m.created_at,
              m.ordering_key, m.lease_order, m.lease_expires_at;

    GET DIAGNOSTICS leased = ROW_COUNT;
    IF q.rate_limit_per_second IS NOT NULL THEN
        UPDATE ap4k_queues
           SET rate_tokens = q.rate_tokens - leased, rate_refilled_at = clock_timestamp()
         WHERE name = p_queue;
    END IF;
END
$$;
