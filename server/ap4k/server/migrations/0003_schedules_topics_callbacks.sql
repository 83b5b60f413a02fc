-- Recurring schedules, fan-out topics and delivery callbacks.

-- A schedule enqueues its message at each time its cron names. next_fire_at is the next
-- such time; every replica's scheduler fires the schedules that are due, each once: the
-- row is locked while it fires, and the message's dedup key names the schedule and the
-- fire time.
CREATE TABLE ap4k_schedules (
    name            text PRIMARY KEY,
    queue           text NOT NULL,
    cron            text NOT NULL,
    timezone        text NOT NULL DEFAULT 'UTC',
    message         text NOT NULL,          -- JSON: the message each firing enqueues
    paused          boolean NOT NULL DEFAULT false,
    next_fire_at    timestamptz,            -- NULL while paused
    last_fired_at   timestamptz,
    last_message_id bigint,
    last_error      text,                   -- why the last firing enqueued nothing
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT paused_or_due CHECK (paused = (next_fire_at IS NULL))
);
CREATE INDEX ap4k_schedules_due ON ap4k_schedules (next_fire_at) WHERE NOT paused;

-- A topic fans a published message out to its subscriptions: one message each.
CREATE TABLE ap4k_topics (
    name          text PRIMARY KEY,
    subscriptions text NOT NULL,            -- JSON array of {name, target, queue?, headers?}
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Where to POST when a message is delivered, or when it lands in the dead letters. NULL
-- for most messages: the outcome statements add work only for rows that have one.
ALTER TABLE ap4k_messages
    ADD COLUMN callback         text,
    ADD COLUMN failure_callback text;
