//! Supabase user tokens as credentials: HS256 with the project's secret and ES256 from a
//! JWKS served over HTTP; the account comes from a claim; every bad token is refused.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use flotilla::proto::{CreateEnrollmentTokenRequest, ListDropletsRequest, fleet_client::FleetClient};
use flotilla_control_plane::{api::auth::Scope, api::auth::jwt::JwtConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::{Code, Request};

use crate::helpers::{TestControlPlane, TestDb};

const SECRET: &[u8] = b"super-secret-jwt-token-with-at-least-32-characters-long";

fn claims(account: &str, aud: &str, exp_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": "0b7c6c1e-9f3a-4a43-8a59-0c8d0f0b1c2d",
        "aud": aud,
        "role": "authenticated",
        "exp": now + exp_in,
        "iat": now - 10,
        "app_metadata": {"flotilla_account": account},
    })
}

fn hs256(claims: &Value, secret: &[u8]) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))?)
}

fn list(token: &str) -> Request<ListDropletsRequest> {
    let mut request = Request::new(ListDropletsRequest::default());
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

/// Serves `jwks` at http://127.0.0.1:<port>/jwks.json until the test ends.
async fn serve_jwks(jwks: Value) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jwks.json", listener.local_addr()?);
    let app = axum::Router::new().route("/jwks.json", axum::routing::get(move || async move { axum::Json(jwks) }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_tokens_are_accepted_for_their_account_and_bad_ones_refused() -> anyhow::Result<()> {
    // An ES256 signing key, published in a JWKS as Supabase publishes its keys.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let point = pair.public_key_raw();
    anyhow::ensure!(point.len() == 65 && point[0] == 4, "an uncompressed P-256 point");
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "key-1",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..]),
    }]});
    let jwks_url = serve_jwks(jwks).await?;
    let es256 = |claims: &Value, kid: &str| -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?)?)
    };

    let db = TestDb::new().await?;
    let config = JwtConfig {
        secret: Some(SECRET.to_vec()),
        jwks_url: Some(jwks_url),
        audience: "authenticated".into(),
        issuer: None,
        account_claim: "app_metadata.flotilla_account".into(),
        scope: Scope::Write,
    };
    let cp = TestControlPlane::builder(&db.pool).jwt(config).start().await?;
    // A droplet of the account the users belong to, and one of another account.
    let acme = cp.fleet_as("acme", Scope::Write).await?;
    let mut acme = acme;
    let ours = acme.create_enrollment_token(CreateEnrollmentTokenRequest::default()).await?.into_inner();
    let ours = ours.enrollment_token.unwrap_or_default().droplet_id;
    cp.fleet_as("globex", Scope::Write).await?.create_enrollment_token(CreateEnrollmentTokenRequest::default()).await?;

    let mut bare = FleetClient::new(cp.channel().await?);
    for token in
        [hs256(&claims("acme", "authenticated", 600), SECRET)?, es256(&claims("acme", "authenticated", 600), "key-1")?]
    {
        let listed = bare.list_droplets(list(&token)).await?.into_inner().droplets;
        assert_eq!(listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [ours.as_str()], "only acme's droplet");
    }
    // The configured scope (write) lets a user create; the audit trail names the user.
    let mut request = Request::new(CreateEnrollmentTokenRequest::default());
    let token = hs256(&claims("acme", "authenticated", 600), SECRET)?;
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let created = bare.create_enrollment_token(request).await?.into_inner();
    assert_eq!(created.enrollment_token.unwrap_or_default().account, "acme");
    // A user of a new account: the account is made, and it owns nothing yet.
    let newcomer = hs256(&claims("initech", "authenticated", 600), SECRET)?;
    assert!(bare.list_droplets(list(&newcomer)).await?.into_inner().droplets.is_empty());

    let cases = [
        (
            hs256(&claims("acme", "authenticated", -120), SECRET)?,
            Code::Unauthenticated,
            "authorization: the token expired",
        ),
        (
            hs256(&claims("acme", "authenticated", 600), b"another-secret-another-secret-another")?,
            Code::Unauthenticated,
            "authorization: the token's signature does not verify",
        ),
        (
            hs256(&claims("acme", "anon", 600), SECRET)?,
            Code::Unauthenticated,
            "authorization: the token is not for this audience",
        ),
        (
            es256(&claims("acme", "authenticated", 600), "key-2")?,
            Code::Unauthenticated,
            "authorization: the token names an unknown key",
        ),
        (
            hs256(&json!({"sub": "x", "aud": "authenticated", "exp": chrono::Utc::now().timestamp() + 60}), SECRET)?,
            Code::PermissionDenied,
            "authorization: the token has no app_metadata.flotilla_account claim",
        ),
        (
            hs256(&claims("Not An Account", "authenticated", 600), SECRET)?,
            Code::PermissionDenied,
            "authorization: the token's account",
        ),
        ("a.b.c".to_owned(), Code::Unauthenticated, "authorization: not a JWT"),
    ];
    for (token, code, says) in cases {
        let status = bare.list_droplets(list(&token)).await.expect_err(says);
        assert_eq!(status.code(), code, "{says}: {status:?}");
        assert!(status.message().starts_with(says), "{says}: {}", status.message());
    }
    // An ES256 token with the HS256 secret's algorithm swapped in is not a way around keys.
    let forged = {
        let good = es256(&claims("acme", "authenticated", 600), "key-1")?;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[0] = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        parts.join(".")
    };
    assert_eq!(bare.list_droplets(list(&forged)).await.expect_err("alg none").code(), Code::Unauthenticated);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jwt_settings_tokens_are_refused_naming_why() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut bare = FleetClient::new(cp.channel().await?);
    let token = hs256(&claims("default", "authenticated", 600), SECRET)?;
    let status = bare.list_droplets(list(&token)).await.expect_err("no JWT settings");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("accepts no JWTs"), "{}", status.message());
    cp.stop().await?;
    Ok(())
}
