-- Accounts own everything. Until API keys arrive there is one: `default`.
CREATE TABLE accounts (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO accounts (name) VALUES ('default');

-- One row per droplet. Facts come from the agent's `Hello`; load from its heartbeats,
-- written in batches (see control-plane/src/liveness.rs), so last_seen_at and the load
-- columns lag the truth by at most one flush interval.
CREATE TABLE droplets (
    id                  uuid PRIMARY KEY,
    account             text NOT NULL REFERENCES accounts (name),
    status              text NOT NULL CHECK (status IN (
                            'pending', 'provisioning', 'online', 'unreachable',
                            'offline', 'error', 'deleting')),
    status_message      text NOT NULL DEFAULT '',
    labels              jsonb NOT NULL DEFAULT '{}'::jsonb,

    agent_version       text NOT NULL DEFAULT '',
    protocol_major      integer NOT NULL DEFAULT 0,
    protocol_minor      integer NOT NULL DEFAULT 0,
    hostname            text NOT NULL DEFAULT '',
    os                  text NOT NULL DEFAULT '',
    kernel_version      text NOT NULL DEFAULT '',
    architecture        text NOT NULL DEFAULT '',
    cpu_count           integer NOT NULL DEFAULT 0,
    memory_total_bytes  bigint NOT NULL DEFAULT 0,
    disk_total_bytes    bigint NOT NULL DEFAULT 0,
    docker_version      text NOT NULL DEFAULT '',

    load_average_1m     double precision NOT NULL DEFAULT 0,
    load_average_5m     double precision NOT NULL DEFAULT 0,
    load_average_15m    double precision NOT NULL DEFAULT 0,
    memory_used_bytes   bigint NOT NULL DEFAULT 0,
    disk_used_bytes     bigint NOT NULL DEFAULT 0,
    disk_free_bytes     bigint NOT NULL DEFAULT 0,
    container_count     integer NOT NULL DEFAULT 0,

    -- The session that currently holds this droplet, if any.
    session_id          uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    connected_at        timestamptz,
    last_seen_at        timestamptz,
    disconnected_at     timestamptz
);

CREATE INDEX droplets_account_id ON droplets (account, id);
-- The offline sweep looks only at droplets whose session has closed.
CREATE INDEX droplets_disconnected ON droplets (disconnected_at)
    WHERE session_id IS NULL AND status IN ('online', 'unreachable');
