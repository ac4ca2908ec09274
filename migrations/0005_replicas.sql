-- Several control-plane processes (replicas) on one database. Each records itself and
-- keeps `last_seen_at` fresh; a replica silent for longer than the failover limit is dead,
-- and the sessions it held are released (their droplets get the reconnect grace).
CREATE TABLE replicas (
    id            uuid PRIMARY KEY,
    hostname      text NOT NULL DEFAULT '',
    -- Where the other replicas reach this one's API, to forward live requests.
    api_address   text NOT NULL DEFAULT '',
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

-- The replica holding a droplet's session, and an epoch that grows with every new
-- session: a newer session on any replica takes over, and the older one is closed.
ALTER TABLE droplets
    ADD COLUMN session_replica uuid,
    ADD COLUMN session_epoch bigint NOT NULL DEFAULT 0,
    -- New sessions in the current rate-limit window (see `claim_droplet`).
    ADD COLUMN session_window_start timestamptz,
    ADD COLUMN session_window_count integer NOT NULL DEFAULT 0;

CREATE INDEX droplets_session_replica ON droplets (session_replica) WHERE session_replica IS NOT NULL;
