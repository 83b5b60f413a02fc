-- The lease function's name carries its version, so that replicas of two ap4k versions can
-- run side by side during a rolling upgrade: a new version whose lease changes its
-- arguments or its result adds ap4k_lease_v2 and leaves v1 to the replicas still calling it.
-- The unversioned ap4k_lease of 0001 is kept for replicas older than this migration (it now
-- runs v1); a later migration drops it once no such replica can remain (see the README's
-- upgrade notes).

-- Lease up to p_limit available messages of one queue for p_leased_by, honouring the
-- queue's pause switch, concurrency limit and rate limit (a token bucket on the queue row),
-- and per-ordering-key FIFO. p_floor is the caller's head pointer: no available row of
-- this queue has a lower lease_order that the caller has not already passed (0: no hint).
-- With p_cover_timeout the lease lasts at least twice the message's timeout + 1 s: the
-- server's dispatchers never extend a lease, and a message may wait in their buffer behind
-- one delivery before its own starts. Carriers lease for p_lease_seconds and heartbeat.
CREATE FUNCTION ap4k_lease_v1(
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

CREATE OR REPLACE FUNCTION ap4k_lease(
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
LANGUAGE sql AS $$
    SELECT * FROM ap4k_lease_v1(p_queue, p_limit, p_leased_by, p_lease_seconds, p_floor,
                                p_cover_timeout)
$$;
