-- Flow keys without a walk of every key. 0007 read every key that had a message ready on
-- each lease (and sorted them by their oldest message) before taking the first hundred: with
-- 5,000 keys waiting that was 0.1-0.8 s a lease against 4 ms without flow limits
-- (docs/performance.md). The keys are now served in turn, in key order from a cursor kept
-- on the queue's row (flow_cursor: the last key looked at; the row is locked while leasing
-- with limits, so replicas and carriers share one cursor): each key found with one index
-- probe, a saturated key passed over after counting at most max_concurrency of its running
-- messages and reading its bucket, and the walk stops as soon as the batch is full or every
-- key has been seen once. So a lease costs what its batch needs (plus one probe per
-- saturated key on the way), a key waits at most one turn of the keys, and no key, however
-- deep its backlog, holds up the rest.
--
-- ap4k_lease_v2 keeps its arguments and results (ap4k_lease_v1 and ap4k_lease run it too:
-- one lease body). The recursive walk's index serves the probes unchanged.

ALTER TABLE ap4k_queues ADD COLUMN flow_cursor text;

CREATE OR REPLACE FUNCTION ap4k_lease_v2(
    p_queue text,
    p_limit integer,
    p_leased_by text,
    p_lease_seconds double precision,
    p_floor bigint,
    p_cover_timeout boolean
) RETURNS TABLE (
    id bigint, target text, method text, headers text, body bytea, attempt integer,
    max_attempts integer, timeout_seconds real, created_at timestamptz,
    ordering_key text, lease_order bigint, lease_expires_at timestamptz, probe boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q ap4k_queues%ROWTYPE;
    allowance integer := p_limit;
    running integer;
    leased integer := 0;
    n integer;
    r record;
    k record;
    ids bigint[];
    picked bigint[];
    probes bigint[];
    parked integer;
    rounds integer := 0;
    recheck double precision;
    guarded boolean;
    key_rate double precision;
    key_concurrency integer;
    key_tokens double precision;
    room integer;
    key_running integer;
    walked integer := 0;
    next_key text;
    cursor_key text;
    lap_start text;
    wrapped boolean := false;
    lap_done boolean := false;
BEGIN
    SELECT * INTO q FROM ap4k_queues WHERE name = p_queue;
    IF NOT FOUND OR q.paused THEN
        RETURN;
    END IF;
    IF q.rate_limit_per_second IS NOT NULL OR q.max_concurrency IS NOT NULL
       OR q.flow_limits IS NOT NULL THEN
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
    guarded := q.circuit_breaker IS NOT NULL AND EXISTS (
        SELECT 1 FROM ap4k_circuits c WHERE c.queue = p_queue AND c.state <> 'closed');

    IF q.flow_limits IS NULL AND NOT guarded THEN
        -- The common case, in one statement.
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
                  m.ordering_key, m.lease_order, m.lease_expires_at, false;
        GET DIAGNOSTICS leased = ROW_COUNT;
    ELSE
        recheck := least((q.circuit_breaker->>'open_seconds')::float8, 1.0);
        key_rate := (q.flow_limits->>'rate_limit_per_second')::float8;
        key_concurrency := (q.flow_limits->>'max_concurrency')::integer;
        cursor_key := q.flow_cursor;
        lap_start := q.flow_cursor;
        LOOP
            rounds := rounds + 1;
            ids := '{}';
            probes := '{}';
            parked := 0;
            -- 1. Candidates.
            IF q.flow_limits IS NOT NULL THEN
                LOOP
                    EXIT WHEN lap_done OR leased + cardinality(ids) >= allowance;
                    -- The next key with a message ready after the cursor: one index probe
                    -- (a bound, not an OR, so that the index starts there; keys are never '').
                    SELECT m.flow_key INTO next_key FROM ap4k_messages m
                     WHERE m.queue = p_queue AND m.state = 'available'
                       AND m.flow_key > coalesce(cursor_key, '')
                     ORDER BY m.flow_key
                     LIMIT 1;
                    IF NOT FOUND THEN
                        -- Past the last key: go round from the first, once.
                        IF wrapped OR lap_start IS NULL THEN
                            lap_done := true;
                        ELSE
                            wrapped := true;
                            cursor_key := NULL;
                        END IF;
                        CONTINUE;
                    END IF;
                    IF wrapped AND next_key > lap_start THEN
                        lap_done := true;  -- back where this call began: every key seen
                        CONTINUE;
                    END IF;
                    cursor_key := next_key;
                    walked := walked + 1;
                    room := allowance - leased - cardinality(ids);
                    IF key_concurrency IS NOT NULL THEN
                        -- Counted up to the limit only: a saturated key costs that much.
                        SELECT count(*) INTO key_running FROM (
                            SELECT 1 FROM ap4k_messages m
                             WHERE m.queue = p_queue AND m.state = 'running'
                               AND m.flow_key = next_key
                             LIMIT key_concurrency) busy;
                        room := least(room, key_concurrency - key_running);
                        CONTINUE WHEN room <= 0;
                    END IF;
                    IF key_rate IS NOT NULL THEN
                        SELECT b.tokens, b.refilled_at INTO k FROM ap4k_flow_keys b
                         WHERE b.queue = p_queue AND b.flow_key = next_key;
                        key_tokens := greatest(key_rate, 1.0);
                        IF FOUND THEN
                            key_tokens := least(key_tokens,
                                k.tokens + extract(epoch FROM clock_timestamp() - k.refilled_at)
                                         * key_rate);
                        END IF;
                        room := least(room, floor(key_tokens)::integer);
                    END IF;
                    CONTINUE WHEN room <= 0;
                    picked := ARRAY(
                        SELECT m.id FROM ap4k_messages m
                         WHERE m.queue = p_queue AND m.state = 'available'
                           AND m.flow_key = next_key
                           AND (m.ordering_key IS NULL OR NOT EXISTS (
                                SELECT 1 FROM ap4k_messages e
                                 WHERE e.queue = m.queue
                                   AND e.ordering_key = m.ordering_key
                                   AND e.id < m.id
                                   AND e.state IN ('scheduled', 'available', 'running',
                                                   'retryable')))
                         ORDER BY m.lease_order
                         LIMIT room
                           FOR UPDATE SKIP LOCKED);
                    ids := ids || picked;
                    IF key_rate IS NOT NULL AND cardinality(picked) > 0 THEN
                        INSERT INTO ap4k_flow_keys AS b (queue, flow_key, tokens, refilled_at)
                        VALUES (p_queue, next_key, key_tokens - cardinality(picked),
                                clock_timestamp())
                        ON CONFLICT (queue, flow_key) DO UPDATE
                           SET tokens = EXCLUDED.tokens, refilled_at = EXCLUDED.refilled_at;
                    END IF;
                END LOOP;
            END IF;
            IF leased + cardinality(ids) < allowance THEN
                -- Without flow limits: every message; with them, those without a key. The
                -- head pointer serves only the former (keyed picks pass it by).
                ids := ids || ARRAY(
                    SELECT m.id FROM ap4k_messages m
                     WHERE m.state = 'available'
                       AND m.queue = p_queue
                       AND (q.flow_limits IS NULL OR m.flow_key IS NULL)
                       AND m.lease_order >= CASE WHEN q.flow_limits IS NULL THEN p_floor
                                                 ELSE 0 END
                       AND NOT m.id = ANY(ids)
                       AND (m.ordering_key IS NULL OR NOT EXISTS (
                            SELECT 1 FROM ap4k_messages e
                             WHERE e.queue = m.queue
                               AND e.ordering_key = m.ordering_key
                               AND e.id < m.id
                               AND e.state IN ('scheduled', 'available', 'running',
                                               'retryable')))
                     ORDER BY m.lease_order
                     LIMIT allowance - leased - cardinality(ids)
                       FOR UPDATE SKIP LOCKED);
            END IF;
            -- 2. Circuits: hold the candidates of open origins, or let one probe through.
            IF guarded THEN
                picked := ids;
                ids := '{}';
                FOR r IN
                    SELECT m.id, ap4k_origin(m.target) AS origin, c.state AS circuit,
                           c.probe_at, c.probe_id
                      FROM ap4k_messages m
                      LEFT JOIN ap4k_circuits c
                             ON c.queue = p_queue
                            AND c.origin = ap4k_origin(m.target)
                            AND c.state <> 'closed'
                     WHERE m.id = ANY(picked)
                     ORDER BY m.lease_order
                LOOP
                    IF r.circuit IS NULL THEN
                        ids := ids || r.id;
                        CONTINUE;
                    END IF;
                    IF (r.circuit = 'open' AND r.probe_at <= now())
                       OR (r.circuit = 'half_open' AND NOT EXISTS (
                            SELECT 1 FROM ap4k_messages p
                             WHERE p.id = r.probe_id AND p.state = 'running')) THEN
                        -- The probe: one per circuit, across every replica (the row's lock).
                        UPDATE ap4k_circuits c
                           SET state = 'half_open', probe_id = r.id, probe_at = now()
                         WHERE c.queue = p_queue AND c.origin = r.origin
                           AND c.state = r.circuit
                           AND c.probe_id IS NOT DISTINCT FROM r.probe_id;
                        IF FOUND THEN
                            ids := ids || r.id;
                            probes := probes || r.id;
                            CONTINUE;
                        END IF;
                    END IF;
                    -- Held: waiting like a retry, but with its attempts unspent.
                    UPDATE ap4k_messages m
                       SET state = 'retryable',
                           scheduled_at = CASE WHEN r.circuit = 'open' AND r.probe_at > now()
                                               THEN r.probe_at
                                               ELSE now() + make_interval(secs => recheck) END
                     WHERE m.id = r.id;
                    parked := parked + 1;
                END LOOP;
            END IF;
            -- 3. The lease.
            RETURN QUERY
            UPDATE ap4k_messages m
               SET state = 'running',
                   attempt = m.attempt + 1,
                   leased_by = p_leased_by,
                   attempted_at = now(),
                   lease_expires_at = now() + make_interval(secs => CASE
                       WHEN p_cover_timeout
                       THEN greatest(p_lease_seconds, 2 * m.timeout_seconds + 1)
                       ELSE p_lease_seconds END)
             WHERE m.id = ANY(ids)
            RETURNING m.id, m.target, m.method, m.headers, m.body, m.attempt,
                      coalesce(m.max_attempts, q.max_attempts), m.timeout_seconds,
                      m.created_at, m.ordering_key, m.lease_order, m.lease_expires_at,
                      m.id = ANY(probes);
            GET DIAGNOSTICS n = ROW_COUNT;
            leased := leased + n;
            -- Held rows made room: look again, a few times at most per call.
            EXIT WHEN parked = 0 OR leased >= allowance OR rounds >= 4;
        END LOOP;
    END IF;

    IF q.rate_limit_per_second IS NOT NULL THEN
        UPDATE ap4k_queues
           SET rate_tokens = q.rate_tokens - leased, rate_refilled_at = clock_timestamp()
         WHERE name = p_queue;
    END IF;
    IF walked > 0 THEN
        UPDATE ap4k_queues SET flow_cursor = cursor_key WHERE name = p_queue;
    END IF;
END
$$;
