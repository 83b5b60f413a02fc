-- A circuit breaker per target origin (scheme://host:port) per queue, off unless the queue's
-- circuit_breaker setting is set. Its state lives here, shared by every replica and carrier:
-- outcomes update it (ap4k_circuit_record) and leasing consults it (ap4k_lease_v2), which
-- holds the messages of an open origin back until its probe may go, so that they
-- spend no attempts and do not sit in the way of other origins' messages. Held messages
-- wait as `retryable` (their attempts unspent); when the circuit closes they go at once.

ALTER TABLE ap4k_queues ADD COLUMN circuit_breaker jsonb;  -- NULL: off

CREATE TABLE ap4k_circuits (
    queue             text NOT NULL,
    origin            text NOT NULL,
    state             text NOT NULL DEFAULT 'closed'
                      CHECK (state IN ('closed', 'open', 'half_open')),
    -- closed: outcomes counted since window_started_at (a tumbling window)
    window_started_at timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,
    failures          integer NOT NULL DEFAULT 0,
    opened_at         timestamptz,
    -- open: when the probe may go; half_open: when it went
    probe_at          timestamptz,
    probe_id          bigint,
    PRIMARY KEY (queue, origin)
);
CREATE INDEX ap4k_circuits_held ON ap4k_circuits (queue) WHERE state <> 'closed';

-- "scheme://host:port" of an absolute http(s) URL, the port spelled out.
CREATE FUNCTION ap4k_origin(target text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT lower(m[1]) || '://' || lower(m[2]) || ':'
           || coalesce(nullif(m[3], ''), CASE lower(m[1]) WHEN 'https' THEN '443' ELSE '80' END)
      FROM regexp_match(target,
                        '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]]*\]|[^:/?#]*)(?::([0-9]*))?')
           AS m
$$;

-- Count outcomes of one queue's deliveries (p_failed: a retry-class failure) towards their
-- origins' circuits; returns the circuits that changed state. A half-open circuit is decided
-- by its probe alone; outcomes arriving while open (deliveries already under way) count not.
CREATE FUNCTION ap4k_circuit_record(p_queue text, p_ids bigint[], p_failed boolean[])
RETURNS TABLE (origin text, state text, previous text, failures integer, attempts integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cb jsonb;
    o record;
    c ap4k_circuits%ROWTYPE;
    next_state text;
BEGIN
    SELECT q.circuit_breaker INTO cb FROM ap4k_queues q WHERE q.name = p_queue;
    IF cb IS NULL THEN
        RETURN;
    END IF;
    FOR o IN
        SELECT ap4k_origin(m.target) AS origin, count(*)::integer AS n,
               (count(*) FILTER (WHERE x.failed))::integer AS bad,
               coalesce(array_agg(m.id) FILTER (WHERE x.failed), '{}') AS bad_ids,
               coalesce(array_agg(m.id) FILTER (WHERE NOT x.failed), '{}') AS ok_ids
          FROM unnest(p_ids, p_failed) AS x(id, failed)
          JOIN ap4k_messages m ON m.id = x.id
         GROUP BY 1
         ORDER BY 1  -- one lock order for every replica: no deadlocks
    LOOP
        CONTINUE WHEN o.origin IS NULL;
        INSERT INTO ap4k_circuits (queue, origin) VALUES (p_queue, o.origin)
            ON CONFLICT DO NOTHING;
        SELECT * INTO c FROM ap4k_circuits
         WHERE ap4k_circuits.queue = p_queue AND ap4k_circuits.origin = o.origin FOR UPDATE;
        next_state := c.state;
        IF c.state = 'half_open' THEN
            IF c.probe_id = ANY(o.ok_ids) THEN
                next_state := 'closed';
            ELSIF c.probe_id = ANY(o.bad_ids) THEN
                next_state := 'open';
            END IF;
        ELSIF c.state = 'closed' THEN
            IF c.window_started_at
               < now() - make_interval(secs => (cb->>'window_seconds')::float8) THEN
                c.attempts := 0;
                c.failures := 0;
                c.window_started_at := now();
            END IF;
            c.attempts := c.attempts + o.n;
            c.failures := c.failures + o.bad;
            IF c.attempts >= (cb->>'min_attempts')::integer
               AND c.failures >= (cb->>'failure_ratio')::float8 * c.attempts THEN
                next_state := 'open';
            END IF;
        END IF;
        IF next_state = 'open' AND c.state = 'half_open' THEN
            -- A failed probe waits out the next probes, the longer the more attempts it
            -- has spent (4, 8, 16… times open_seconds): probes take turns among the held
            -- messages instead of spending a few messages' attempts on every probe. The
            -- wait ends when the circuit closes (everything held is released then).
            UPDATE ap4k_messages m
               SET scheduled_at = greatest(m.scheduled_at, now() + make_interval(
                       secs => least(86400, 4 * (cb->>'open_seconds')::float8
                                            * 2 ^ (least(m.attempt, 20) - 1))))
             WHERE m.id = c.probe_id AND m.state IN ('retryable', 'scheduled');
        END IF;
        IF next_state = 'open' AND c.state <> 'open' THEN
            UPDATE ap4k_circuits
               SET state = 'open', opened_at = now(), probe_id = NULL,
                   probe_at = now() + make_interval(secs => (cb->>'open_seconds')::float8),
                   attempts = c.attempts, failures = c.failures
             WHERE ap4k_circuits.queue = p_queue AND ap4k_circuits.origin = o.origin;
        ELSIF next_state = 'closed' AND c.state <> 'closed' THEN
            -- Recovered: what waits for this origin (held, or backing off) may go now.
            UPDATE ap4k_messages m
               SET scheduled_at = now()
             WHERE m.queue = p_queue AND m.state = 'retryable' AND m.scheduled_at > now()
               AND ap4k_origin(m.target) = o.origin;
            UPDATE ap4k_circuits
               SET state = 'closed', opened_at = NULL, probe_at = NULL, probe_id = NULL,
                   attempts = 0, failures = 0, window_started_at = now()
             WHERE ap4k_circuits.queue = p_queue AND ap4k_circuits.origin = o.origin;
        ELSIF c.state = 'closed' THEN
            UPDATE ap4k_circuits
               SET attempts = c.attempts, failures = c.failures,
                   window_started_at = c.window_started_at
             WHERE ap4k_circuits.queue = p_queue AND ap4k_circuits.origin = o.origin;
        END IF;
        IF next_state <> c.state THEN
            origin := o.origin;
            state := next_state;
            previous := c.state;
            failures := c.failures;
            attempts := c.attempts;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- The lease, version 2: ap4k_lease_v1's body (0001, renamed in 0004) and, with circuits: the
-- messages of an origin whose circuit is open are held (retryable, attempt unspent) until its
-- probe may go; the first message of such an origin once it may is the probe (half-open);
-- while a probe is out the others are parked for a second at a time. The new result column
-- `probe` says which leased message is a probe. Without a circuit breaker, or with every
-- circuit of the queue closed, it is v1's one statement.
CREATE FUNCTION ap4k_lease_v2(
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
    ids bigint[];
    probes bigint[];
    parked integer;
    rounds integer := 0;
    recheck double precision;
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

    IF q.circuit_breaker IS NULL OR NOT EXISTS (
        SELECT 1 FROM ap4k_circuits c WHERE c.queue = p_queue AND c.state <> 'closed'
    ) THEN
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
        LOOP
            rounds := rounds + 1;
            ids := '{}';
            probes := '{}';
            parked := 0;
            FOR r IN
                SELECT m.id, ap4k_origin(m.target) AS origin, c.state AS circuit, c.probe_at,
                       c.probe_id
                  FROM ap4k_messages m
                  LEFT JOIN ap4k_circuits c
                         ON c.queue = p_queue
                        AND c.origin = ap4k_origin(m.target)
                        AND c.state <> 'closed'
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
                 LIMIT allowance - leased
                   FOR UPDATE OF m SKIP LOCKED
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
                     WHERE c.queue = p_queue AND c.origin = r.origin AND c.state = r.circuit
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
            -- Parked rows made room: look again, a few times at most per call.
            EXIT WHEN parked = 0 OR leased >= allowance OR rounds >= 4;
        END LOOP;
    END IF;

    IF q.rate_limit_per_second IS NOT NULL THEN
        UPDATE ap4k_queues
           SET rate_tokens = q.rate_tokens - leased, rate_refilled_at = clock_timestamp()
         WHERE name = p_queue;
    END IF;
END
$$;

-- One lease body: replicas of the previous release, still calling ap4k_lease_v1 (or
-- ap4k_lease, which runs v1), now lease through this one, so they too hold the messages of
-- open circuits. Their outcomes do not count towards circuits (only this release's servers
-- call ap4k_circuit_record), so a circuit opens on the new replicas' counts alone.
CREATE OR REPLACE FUNCTION ap4k_lease_v1(
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
    SELECT v.id, v.target, v.method, v.headers, v.body, v.attempt, v.max_attempts,
           v.timeout_seconds, v.created_at, v.ordering_key, v.lease_order, v.lease_expires_at
      FROM ap4k_lease_v2(p_queue, p_limit, p_leased_by, p_lease_seconds, p_floor,
                         p_cover_timeout) AS v
$$;
