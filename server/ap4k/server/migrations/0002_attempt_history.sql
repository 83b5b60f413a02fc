-- Attempt history. A failed attempt is a row of its own (River keeps errors the same way:
-- only on failure); the successful attempt is two small columns on the message (its status
-- and duration), written by the same UPDATE that completes it: the success path inserts
-- nothing and widens the row by six bytes.

CREATE TABLE ap4k_attempts (
    seq              bigint GENERATED ALWAYS AS IDENTITY,
    -- No foreign key: its per-row trigger would tax every pruned message, failed or not.
    -- Purging dead letters deletes their attempts; the pruner sweeps those whose message
    -- is gone once they are past the retention period.
    message_id       bigint NOT NULL,
    queue            text NOT NULL,
    attempt          integer NOT NULL,
    at               timestamptz NOT NULL,   -- when the attempt was leased
    duration_ms      real,                   -- the HTTP call, when known
    outcome          text NOT NULL,          -- retried | dead
    status           smallint,               -- the HTTP status, when there was an answer
    error            text,
    response_excerpt text,                   -- the first 1 KiB of the answer's body
    made_by          text NOT NULL,          -- dispatcher/<host>/<pid> or carrier:<id>
    PRIMARY KEY (message_id, seq)
);
-- Failures per queue over the last minute (the console's failure rate), and the sweep.
CREATE INDEX ap4k_attempts_recent ON ap4k_attempts (at);

ALTER TABLE ap4k_messages
    ADD COLUMN delivered_status      smallint,
    ADD COLUMN delivered_duration_ms real;
