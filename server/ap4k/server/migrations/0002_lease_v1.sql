-- The lease function's name carries its version, so that servers of two releases can run
-- side by side during a rolling upgrade: a release whose lease changes its arguments or its
-- results adds ap4k_lease_v2 and leaves v1 to the servers still calling it.
--
-- ap4k_lease_v1 is 0001's ap4k_lease, renamed (its body and comments are there). The name
-- ap4k_lease stays for servers older than this migration, now running v1; a later
-- migration drops it, once no such server can remain (see the README's upgrade notes).

ALTER FUNCTION ap4k_lease(text, integer, text, double precision, bigint, boolean)
    RENAME TO ap4k_lease_v1;

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
LANGUAGE sql AS $$
    SELECT * FROM ap4k_lease_v1(p_queue, p_limit, p_leased_by, p_lease_seconds, p_floor,
                                p_cover_timeout)
$$;
