-- The command ledger: every command is a row before it is a message, written in the same
-- transaction as the change it serves, and delivered in `seq` order per droplet.
--
--   queued -> sent -> acked -> succeeded | failed
--   queued | sent -> expired    (the deadline passed before the agent ran it)
--   queued | sent -> cancelled  (superseded: a newer generation of the same deployment)
--
-- A `Deploy` command's payload carries no spec: the spec (which may hold secrets) stays
-- sealed in `deployments` and is attached when the command is sent, for the generation the
-- command names.
ALTER TABLE droplets ADD COLUMN command_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE commands (
    id               uuid PRIMARY KEY,
    account          text NOT NULL REFERENCES accounts (name),
    droplet_id       uuid NOT NULL REFERENCES droplets (id) ON DELETE CASCADE,
    deployment_id    uuid REFERENCES deployments (id) ON DELETE SET NULL,
    seq              bigint NOT NULL,
    kind             text NOT NULL,
    payload          bytea NOT NULL,  -- flotilla.v1.Command, protobuf-encoded, without secrets
    idempotency_key  text,
    requested_by     text NOT NULL DEFAULT '',
    state            text NOT NULL DEFAULT 'queued' CHECK (state IN (
                         'queued', 'sent', 'acked', 'succeeded', 'failed', 'expired', 'cancelled')),
    message          text NOT NULL DEFAULT '',
    -- The container the command left behind (flotilla.v1.ContainerStatus).
    result           bytea,
    attempts         integer NOT NULL DEFAULT 0,
    deadline         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    acked_at         timestamptz,
    finished_at      timestamptz,
    UNIQUE (droplet_id, seq),
    UNIQUE (droplet_id, idempotency_key)
);

-- What delivery reads: a droplet's unfinished commands in order.
CREATE INDEX commands_open ON commands (droplet_id, seq) WHERE state IN ('queued', 'sent', 'acked');
CREATE INDEX commands_deployment ON commands (deployment_id, seq);
CREATE INDEX commands_finished ON commands (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX events_at ON events (at);
