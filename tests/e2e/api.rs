//! The fleet API over real gRPC: droplets by id and by page, and clear errors.

use flotilla::proto::{DropletStatus, GetDropletRequest, ListDropletsRequest};
use tonic::Code;

use crate::helpers::{TestControlPlane, TestDb};

async fn insert_droplets(db: &TestDb, n: usize, status: &str) -> anyhow::Result<Vec<uuid::Uuid>> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO droplets (id, account, status) VALUES ($1, 'default', $2)")
            .bind(id)
            .bind(status)
            .execute(&db.pool)
            .await?;
        ids.push(id);
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_droplet_names_what_is_wrong() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut fleet = cp.fleet().await?;

    let status = fleet.get_droplet(GetDropletRequest { id: "not-a-uuid".into() }).await.expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("id:"), "{}", status.message());

    let missing = uuid::Uuid::new_v4();
    let status = fleet.get_droplet(GetDropletRequest { id: missing.to_string() }).await.expect_err("missing");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&missing.to_string()));

    let [id] = insert_droplets(&db, 1, "pending").await?[..] else { unreachable!() };
    let droplet = fleet.get_droplet(GetDropletRequest { id: id.to_string() }).await?.into_inner();
    assert_eq!(droplet.status(), DropletStatus::Pending);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_droplets_pages_through_everything_once_in_a_stable_order() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut fleet = cp.fleet().await?;
    let mut expected = insert_droplets(&db, 25, "offline").await?;
    expected.extend(insert_droplets(&db, 5, "pending").await?);
    expected.sort();

    let mut seen = Vec::new();
    let mut added = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = fleet
            .list_droplets(ListDropletsRequest { page_size: 7, page_token: token.clone(), ..Default::default() })
            .await?
            .into_inner();
        assert!(page.droplets.len() <= 7);
        seen.extend(page.droplets.iter().map(|d| d.id.parse::<uuid::Uuid>().expect("uuid")));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // Rows added between pages (random ids: before and after the position) move
        // nothing: no droplet is skipped or shown twice.
        added.extend(insert_droplets(&db, 2, "pending").await?);
    }
    assert!(pages >= 5);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "pages come in id order, nothing twice");
    let original: Vec<_> = seen.iter().copied().filter(|id| !added.contains(id)).collect();
    assert_eq!(original, expected, "every droplet there from the start, once");

    let pending = fleet
        .list_droplets(ListDropletsRequest { status: DropletStatus::Pending as i32, ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(pending.droplets.len(), 5 + added.len());
    assert!(pending.droplets.iter().all(|d| d.status() == DropletStatus::Pending));

    for (request, field) in [
        (ListDropletsRequest { page_token: "garbage".into(), ..Default::default() }, "page_token"),
        (ListDropletsRequest { page_size: 5000, ..Default::default() }, "page_size"),
        (ListDropletsRequest { status: 99, ..Default::default() }, "status"),
    ] {
        let status = fleet.list_droplets(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    cp.stop().await?;
    Ok(())
}
