-- Droplets made by a provider: which one, its id for the machine, and its addresses.
ALTER TABLE droplets
    ADD COLUMN provider      text NOT NULL DEFAULT 'byo',
    ADD COLUMN cloud_id      text,
    ADD COLUMN public_ipv4   text NOT NULL DEFAULT '',
    ADD COLUMN private_ipv4  text NOT NULL DEFAULT '';

-- Work on a droplet's machine that outlives the request that asked for it: creating it
-- (until its agent connects, or the deadline passes and what was made is cleaned up) and
-- destroying it (retried until the provider confirms). A replica works a job under a
-- lease it renews; when a replica dies its lease runs out and another takes the job.
-- Every step is safe to run again.
CREATE TABLE provisioning_jobs (
    droplet_id   uuid PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('create', 'delete')),
    attempts     integer NOT NULL DEFAULT 0,
    not_before   timestamptz NOT NULL DEFAULT now(),
    owner        uuid,
    lease_until  timestamptz,
    last_error   text NOT NULL DEFAULT '',
    -- create: the agent must have connected by then.
    deadline     timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX provisioning_jobs_due ON provisioning_jobs (not_before);
