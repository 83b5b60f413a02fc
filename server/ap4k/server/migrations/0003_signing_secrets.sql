-- Standard Webhooks secrets (whsec_…), oldest first, at most two: a rotation adds the new
-- one, moves receivers over, then drops the old. The older signing_secret column keeps
-- making Ap4k-Signature headers for one version.
ALTER TABLE ap4k_queues ADD COLUMN signing_secrets text[] NOT NULL DEFAULT '{}';
