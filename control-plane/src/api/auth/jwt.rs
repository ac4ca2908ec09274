//! Supabase user tokens as API credentials, so an Edge Function can pass its user's
//! `Authorization` header straight through.
//!
//! Tokens signed with the project's JWT secret (HS256) and with the project's asymmetric
//! signing keys (from its JWKS URL) are accepted when they are unexpired, for the
//! configured audience (and issuer, when set). A configured claim names the account; every
//! such caller has the configured scope.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde_json::Value;
use tokio::sync::RwLock;
use tonic::Status;

use crate::api::auth::scope::Scope;

/// A JWKS is fetched again at most this often when a token names an unknown key.
const REFETCH_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct JwtConfig {
    /// HS256 secret (Supabase: Project Settings → API → JWT secret).
    pub secret: Option<Vec<u8>>,
    /// The project's JWKS (Supabase: `https://<project>.supabase.co/auth/v1/.well-known/jwks.json`).
    pub jwks_url: Option<String>,
    /// Required `aud` (Supabase signs user tokens for `authenticated`).
    pub audience: String,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// A dotted path to the claim holding the account, e.g. `app_metadata.flotilla_account`.
    pub account_claim: String,
    pub scope: Scope,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("jwks_url", &self.jwks_url)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("account_claim", &self.account_claim)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone)]
pub struct TokenCaller {
    pub account: String,
    pub subject: String,
}

/// Verifies tokens; holds the JWKS it last fetched.
#[derive(Clone)]
pub struct Verifier {
    config: Arc<JwtConfig>,
    http: reqwest::Client,
    jwks: Arc<RwLock<(JwkSet, Option<Instant>)>>,
}

impl Verifier {
    pub fn new(config: JwtConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.secret.is_some() || config.jwks_url.is_some(),
            "JWTs need --jwt-secret or --jwt-jwks-url"
        );
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http =
            reqwest::Client::builder().tls_backend_preconfigured(tls).timeout(Duration::from_secs(10)).build()?;
        Ok(Self { config: Arc::new(config), http, jwks: Arc::new(RwLock::new((JwkSet { keys: vec![] }, None))) })
    }

    pub fn scope(&self) -> Scope {
        self.config.scope
    }

    /// The caller a token speaks for, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<TokenCaller, Status> {
        let refused = |why: &str| Status::unauthenticated(format!("authorization: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused("not a JWT"))?;
        let key = match header.alg {
            Algorithm::HS256 => {
                let secret = self.config.secret.as_deref().ok_or_else(|| {
                    refused("HS256 tokens are not accepted here (the control plane has no --jwt-secret)")
                })?;
                DecodingKey::from_secret(secret)
            }
            Algorithm::HS384 | Algorithm::HS512 => return Err(refused("only HS256 among shared-secret algorithms")),
            _ => self.key(header.kid.as_deref()).await?,
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.config.audience]);
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|error| {
            refused(match error.kind() {
                ErrorKind::ExpiredSignature => "the token expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidAudience => "the token is not for this audience",
                ErrorKind::InvalidIssuer => "the token is from another issuer",
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => "the token's signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks exp, aud or sub",
                _ => "the token cannot be read",
            })
        })?;
        let claims = claims.claims;
        let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
        let account = self
            .config
            .account_claim
            .split('.')
            .try_fold(&claims, |value, part| value.get(part))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "authorization: the token has no {} claim naming an account",
                    self.config.account_claim
                ))
            })?
            .to_owned();
        Ok(TokenCaller { account, subject })
    }

    /// The JWKS key named `kid`, fetching the set when it is unknown (at most every 30 s).
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, Status> {
        let Some(url) = &self.config.jwks_url else {
            return Err(Status::unauthenticated(
                "authorization: asymmetric tokens are not accepted here (the control plane has no --jwt-jwks-url)",
            ));
        };
        let kid = kid.ok_or_else(|| Status::unauthenticated("authorization: the token names no key (kid)"))?;
        let found = |set: &JwkSet| set.find(kid).map(DecodingKey::from_jwk);
        {
            let jwks = self.jwks.read().await;
            if let Some(key) = found(&jwks.0) {
                return key.map_err(|_| Status::unauthenticated("authorization: the signing key cannot be used"));
            }
            if jwks.1.is_some_and(|at| at.elapsed() < REFETCH_AFTER) {
                return Err(Status::unauthenticated("authorization: the token names an unknown key"));
            }
        }
        let mut jwks = self.jwks.write().await;
        jwks.1 = Some(Instant::now());
        let fetched = async { self.http.get(url).send().await?.error_for_status()?.json::<JwkSet>().await };
        match fetched.await {
            Ok(set) => jwks.0 = set,
            Err(error) => {
                tracing::warn!(%error, %url, "could not fetch the JWKS");
                return Err(Status::unavailable("authorization: the signing keys cannot be fetched now; try again"));
            }
        }
        match found(&jwks.0) {
            Some(key) => key.map_err(|_| Status::unauthenticated("authorization: the signing key cannot be used")),
            None => Err(Status::unauthenticated("authorization: the token names an unknown key")),
        }
    }
}
