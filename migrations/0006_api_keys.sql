-- Bearer keys for the fleet API. A key is 256 random bits, so a fast hash is all the
-- protection it needs at rest (there is nothing to guess from it): the API looks a key
-- up by its SHA-256 and never stores or shows the key itself after creating it.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    account       text NOT NULL REFERENCES accounts (name),
    name          text NOT NULL DEFAULT '',
    scope         text NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    -- The key's first characters, to recognise it in lists and logs.
    prefix        text NOT NULL,
    sha256        bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    -- Written at most once a minute per key.
    last_used_at  timestamptz
);

CREATE INDEX api_keys_account ON api_keys (account, created_at);
