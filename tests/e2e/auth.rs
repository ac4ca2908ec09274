//! Who may call the fleet API, and what each key reaches: every way a credential can be
//! wrong, scopes, and accounts fenced from one another (another account's id answers
//! exactly as a missing one does).

use flotilla::proto::{
    CreateApiKeyRequest, CreateEnrollmentTokenRequest, DeleteDropletRequest, GetDropletRequest, ListApiKeysRequest,
    ListDeploymentsRequest, ListDropletsRequest, ListEnrollmentTokensRequest, RevokeApiKeyRequest,
    UpdateDropletLabelsRequest, fleet_client::FleetClient,
};
use flotilla_control_plane::{
    api::auth::{self, Scope},
    store,
};
use tonic::{Code, Request};

use crate::helpers::{TestControlPlane, TestDb};

/// A droplet of `account`, made through the API with a key of that account.
async fn droplet_of(cp: &TestControlPlane, account: &str) -> anyhow::Result<String> {
    let mut fleet = cp.fleet_as(account, Scope::Write).await?;
    let created = fleet.create_enrollment_token(CreateEnrollmentTokenRequest::default()).await?.into_inner();
    let token = created.enrollment_token.unwrap_or_default();
    assert_eq!(token.account, account, "a token is made in the key's account");
    Ok(token.droplet_id)
}

fn get(id: &str, authorization: Option<&str>) -> Request<GetDropletRequest> {
    let mut request = Request::new(GetDropletRequest { id: id.to_owned() });
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().expect("ascii"));
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_credential_is_refused_with_unauthenticated() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = droplet_of(&cp, "default").await?;
    let mut bare = FleetClient::new(cp.channel().await?);

    let revoked = auth::create(&db.pool, "default", Scope::Admin, "old", None).await?;
    store::revoke_api_key(&db.pool, revoked.id).await?;
    let expired =
        auth::create(&db.pool, "default", Scope::Admin, "short", Some(std::time::Duration::from_secs(1))).await?;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(expired.id)
        .execute(&db.pool)
        .await?;
    let unknown = format!("{}{}", auth::KEY_PREFIX, "A".repeat(43));
    let cases = [
        (None, "authorization: missing".to_owned()),
        (Some(cp.admin_key.clone()), "authorization: expected `Bearer <API key>`".to_owned()),
        (Some(format!("Basic {}", cp.admin_key)), "authorization: expected `Bearer <API key>`".to_owned()),
        (Some("Bearer not-a-key".to_owned()), "authorization: not a Flotilla API key".to_owned()),
        (Some(format!("Bearer {unknown}")), "authorization: unknown API key".to_owned()),
        (Some(format!("Bearer {}", revoked.key)), "authorization: this API key was revoked".to_owned()),
        (Some(format!("Bearer {}", expired.key)), "authorization: this API key expired".to_owned()),
    ];
    for (authorization, says) in cases {
        let status = bare.get_droplet(get(&droplet, authorization.as_deref())).await.expect_err(&says);
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}: {status:?}");
        assert!(status.message().starts_with(&says), "{authorization:?}: {}", status.message());
    }
    // The right key, the same call: it works, and its use is recorded.
    let ok = bare.get_droplet(get(&droplet, Some(&format!("Bearer {}", cp.admin_key)))).await?.into_inner();
    assert_eq!(ok.id, droplet);
    let used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE name = 'tests'").fetch_one(&db.pool).await?;
    assert!(used.is_some(), "last_used_at is recorded");
    // Health and reflection need no key (load balancers and grpcurl's `list` use them).
    let health = tonic_health::pb::health_client::HealthClient::new(cp.channel().await?)
        .check(tonic_health::pb::HealthCheckRequest { service: "flotilla.v1.Fleet".into() })
        .await?;
    assert_eq!(health.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reaches_only_its_own_account_and_its_scope() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let ours = droplet_of(&cp, "acme").await?;
    let theirs = droplet_of(&cp, "globex").await?;
    let mut acme = cp.fleet_as("acme", Scope::Write).await?;
    let mut reader = cp.fleet_as("acme", Scope::Read).await?;

    // Another account's droplet answers as a missing one does, word for word.
    let foreign = acme.get_droplet(GetDropletRequest { id: theirs.clone() }).await.expect_err("foreign");
    let missing_id = uuid::Uuid::new_v4().to_string();
    let missing = acme.get_droplet(GetDropletRequest { id: missing_id.clone() }).await.expect_err("missing");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(foreign.message(), format!("droplet {theirs} not found"));
    assert_eq!(missing.message(), format!("droplet {missing_id} not found"));
    let deleted = acme.delete_droplet(DeleteDropletRequest { id: theirs.clone() }).await.expect_err("delete");
    assert_eq!(deleted.code(), Code::NotFound);
    let labelled = acme
        .update_droplet_labels(UpdateDropletLabelsRequest {
            id: theirs.clone(),
            labels: [("a".into(), "b".into())].into(),
        })
        .await
        .expect_err("labels");
    assert_eq!(labelled.code(), Code::NotFound);
    let token = acme
        .create_enrollment_token(CreateEnrollmentTokenRequest { droplet_id: theirs.clone(), ..Default::default() })
        .await
        .expect_err("token for another account's droplet");
    assert_eq!(token.code(), Code::NotFound);
    let other_account = acme
        .list_droplets(ListDropletsRequest { account: "globex".into(), ..Default::default() })
        .await
        .expect_err("listing another account");
    assert_eq!(other_account.code(), Code::PermissionDenied);
    // The other account's droplet is untouched.
    let still = cp.fleet().await?.get_droplet(GetDropletRequest { id: theirs.clone() }).await?.into_inner();
    assert!(still.labels.is_empty());

    // Lists hold only the key's own account; the admin key sees both, or one when asked.
    let listed = acme.list_droplets(ListDropletsRequest::default()).await?.into_inner().droplets;
    assert_eq!(listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [ours.as_str()]);
    let tokens = acme.list_enrollment_tokens(ListEnrollmentTokensRequest::default()).await?.into_inner();
    assert!(tokens.enrollment_tokens.iter().all(|t| t.account == "acme"));
    let mut admin = cp.fleet().await?;
    let all = admin.list_droplets(ListDropletsRequest::default()).await?.into_inner().droplets;
    assert_eq!(all.len(), 2);
    let one = admin
        .list_droplets(ListDropletsRequest { account: "globex".into(), ..Default::default() })
        .await?
        .into_inner()
        .droplets;
    assert_eq!(one.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [theirs.as_str()]);
    let deployments = acme.list_deployments(ListDeploymentsRequest::default()).await?.into_inner();
    assert!(deployments.deployments.is_empty());

    // A read key reads, and is refused every change with PermissionDenied naming the scope.
    reader.get_droplet(GetDropletRequest { id: ours.clone() }).await?;
    let refused = reader.delete_droplet(DeleteDropletRequest { id: ours.clone() }).await.expect_err("read key");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(refused.message(), "DeleteDroplet needs the write scope; this key has read");
    let refused = reader
        .create_enrollment_token(CreateEnrollmentTokenRequest::default())
        .await
        .expect_err("read key creating a token");
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Keys are for admins only.
    let refused = acme.list_api_keys(ListApiKeysRequest::default()).await.expect_err("write key");
    assert_eq!(refused.code(), Code::PermissionDenied);
    reader.get_droplet(GetDropletRequest { id: ours.clone() }).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_create_list_and_revoke_keys_and_the_key_is_shown_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut admin = cp.fleet().await?;
    let created = admin
        .create_api_key(CreateApiKeyRequest {
            account: "initech".into(),
            scope: "read".into(),
            name: "dashboard".into(),
            expires_in: Some(prost_types::Duration { seconds: 90 * 86400, nanos: 0 }),
        })
        .await?
        .into_inner();
    let row = created.api_key.clone().unwrap_or_default();
    assert!(created.key.starts_with(auth::KEY_PREFIX) && created.key.len() > 40);
    assert!(created.key.starts_with(&row.prefix));
    assert_eq!((row.account.as_str(), row.scope.as_str()), ("initech", "read"));
    assert!(row.expires_at.is_some());
    // Stored only as a hash.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE sha256 = sha256(convert_to($1, 'UTF8'))")
        .bind(&created.key)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(stored, 1);
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM api_keys t").fetch_one(&db.pool).await?;
    assert!(!dump.contains(&created.key), "the key itself is not stored");
    let listed = admin.list_api_keys(ListApiKeysRequest { account: "initech".into() }).await?.into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].id, row.id);

    let mut theirs = cp.fleet_with(&created.key).await?;
    let empty = theirs.list_droplets(ListDropletsRequest::default()).await?.into_inner();
    assert!(empty.droplets.is_empty(), "a new account owns nothing");
    for bad in [("scope", "owner"), ("account", "Not An Account")] {
        let mut request = CreateApiKeyRequest { scope: "read".into(), ..Default::default() };
        match bad.0 {
            "scope" => request.scope = bad.1.into(),
            _ => request.account = bad.1.into(),
        }
        let status = admin.create_api_key(request).await.expect_err(bad.0);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(bad.0), "{}", status.message());
    }

    let revoked = admin.revoke_api_key(RevokeApiKeyRequest { id: row.id.clone() }).await?.into_inner();
    assert!(revoked.revoked_at.is_some());
    let refused = theirs.list_droplets(ListDropletsRequest::default()).await.expect_err("revoked");
    assert_eq!(refused.code(), Code::Unauthenticated);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_replaced_checked_and_selected() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut fleet = cp.fleet().await?;
    let a = droplet_of(&cp, "default").await?;
    let b = droplet_of(&cp, "default").await?;
    let label = |id: &str, pairs: &[(&str, &str)]| UpdateDropletLabelsRequest {
        id: id.to_owned(),
        labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    fleet.update_droplet_labels(label(&a, &[("tier", "edge"), ("region", "fra1")])).await?;
    let updated = fleet.update_droplet_labels(label(&b, &[("tier", "edge"), ("gpu", "yes")])).await?.into_inner();
    assert_eq!(updated.labels.get("gpu").map(String::as_str), Some("yes"));
    let select = |selector: &str| ListDropletsRequest { label_selector: selector.into(), ..Default::default() };
    for (selector, expected) in [
        ("tier=edge", vec![&a, &b]),
        ("tier=edge,region!=fra1", vec![&b]),
        ("gpu", vec![&b]),
        ("!gpu", vec![&a]),
        ("tier=core", vec![]),
    ] {
        let mut ids: Vec<String> =
            fleet.list_droplets(select(selector)).await?.into_inner().droplets.into_iter().map(|d| d.id).collect();
        ids.sort();
        let mut expected: Vec<String> = expected.into_iter().cloned().collect();
        expected.sort();
        assert_eq!(ids, expected, "{selector}");
    }
    // A NUL character cannot be stored: the caller is told, not "database unavailable".
    let nul = ListDropletsRequest { account: "a\u{0}b".into(), ..Default::default() };
    assert_eq!(fleet.list_droplets(nul).await.expect_err("NUL").code(), Code::InvalidArgument);
    let bad = fleet.list_droplets(select("tier=,=x")).await.expect_err("bad selector");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("label_selector:"), "{}", bad.message());
    let bad = fleet.update_droplet_labels(label(&a, &[("-bad", "v"), ("ok", "line\nbreak")])).await.expect_err("bad");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&bad).expect("a BadRequest detail");
    assert_eq!(details.field_violations.len(), 2, "{details:?}");
    // Refused labels leave the stored ones as they were.
    let kept = fleet.get_droplet(GetDropletRequest { id: a.clone() }).await?.into_inner();
    assert_eq!(kept.labels.get("region").map(String::as_str), Some("fra1"));
    cp.stop().await?;
    Ok(())
}
