-- The fleet's CAs. Every control-plane process on this database signs with the active one;
-- the trust bundle agents receive is every CA not yet retired. A rotation stages a 'next'
-- CA (trusted, not yet signing), activates it (the old one is 'retiring': still trusted),
-- then retires the old. The private key is encrypted with the master key
-- (FLOTILLA_MASTER_KEY or the master key file), which the database never holds.
CREATE TABLE certificate_authorities (
    id              uuid PRIMARY KEY,
    cert_pem        text NOT NULL,
    sha256          text NOT NULL UNIQUE,
    key_ciphertext  bytea NOT NULL,
    state           text NOT NULL CHECK (state IN ('next', 'active', 'retiring', 'retired')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    retired_at      timestamptz
);

-- At most one CA signs.
CREATE UNIQUE INDEX certificate_authorities_one_active
    ON certificate_authorities (state) WHERE state = 'active';

-- One-time enrollment tokens. Only a hash of the secret is stored.
CREATE TABLE enrollment_tokens (
    id           uuid PRIMARY KEY,
    account      text NOT NULL REFERENCES accounts (name),
    droplet_id   uuid NOT NULL REFERENCES droplets (id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    revoked_at   timestamptz
);

CREATE INDEX enrollment_tokens_droplet ON enrollment_tokens (droplet_id);

-- Every certificate issued to a droplet.
CREATE TABLE certificates (
    serial       text PRIMARY KEY,
    droplet_id   uuid NOT NULL,
    ca_id        uuid NOT NULL REFERENCES certificate_authorities (id),
    not_before   timestamptz NOT NULL,
    not_after    timestamptz NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    -- 'enrollment', 'renewal' or 'operator'.
    reason       text NOT NULL,
    revoked_at   timestamptz
);

CREATE INDEX certificates_droplet ON certificates (droplet_id);
-- Handshakes consult the revoked, unexpired ones (cached in memory).
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE revoked_at IS NOT NULL;
