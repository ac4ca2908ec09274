-- Deployments hold the desired spec (sealed with the master key: it may carry secret env
-- values and registry credentials), its generation and desired run state.
CREATE TABLE deployments (
    id             uuid PRIMARY KEY,
    account        text NOT NULL REFERENCES accounts (name),
    droplet_id     uuid NOT NULL REFERENCES droplets (id) ON DELETE CASCADE,
    name           text NOT NULL DEFAULT '',
    generation     bigint NOT NULL CHECK (generation >= 1),
    desired_state  text NOT NULL CHECK (desired_state IN ('running', 'stopped', 'removed')),
    spec_sealed    bytea NOT NULL,
    last_error     text NOT NULL DEFAULT '',
    -- The agent gave up on it (crash-looping past its restart cap) until its spec changes
    -- or a restart is asked for.
    failed         boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX deployments_droplet ON deployments (droplet_id);

-- The container of each deployment as its droplet last reported it.
CREATE TABLE containers (
    deployment_id  uuid PRIMARY KEY REFERENCES deployments (id) ON DELETE CASCADE,
    droplet_id     uuid NOT NULL,
    status         bytea NOT NULL,  -- flotilla.v1.ContainerStatus, protobuf-encoded
    state          text NOT NULL,
    generation     bigint NOT NULL,
    reported_at    timestamptz NOT NULL DEFAULT now()
);

-- What a deployment's MCP server said of itself the last time the probe reached it.
CREATE TABLE mcp_servers (
    deployment_id  uuid PRIMARY KEY REFERENCES deployments (id) ON DELETE CASCADE,
    name           text NOT NULL,
    version        text NOT NULL,
    discovered_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mcp_tools (
    deployment_id  uuid NOT NULL REFERENCES mcp_servers (deployment_id) ON DELETE CASCADE,
    name           text NOT NULL,
    description    text NOT NULL,
    input_schema   jsonb NOT NULL,
    PRIMARY KEY (deployment_id, name)
);

-- Append-only record of what happened, with why.
CREATE TABLE events (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    account        text NOT NULL REFERENCES accounts (name),
    droplet_id     uuid,
    deployment_id  uuid,
    kind           text NOT NULL,
    message        text NOT NULL DEFAULT ''
);

CREATE INDEX events_deployment ON events (deployment_id, id);
